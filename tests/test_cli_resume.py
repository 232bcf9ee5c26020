"""kill -9 a real `flow run` whose builders are two OpenCode CLIs, once one candidate is
checkpointed and while the other is mid-conversation; `flow resume RUN` keeps the finished
candidate and runs the other CLI again from the base.

The kill comes from the outside world: the slow builder's upstream model takes flow down,
but only once the fast builder's result is in the run's checkpoint (a pending write of the
build superstep, what `runner._passed_before` reads on resume)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import git, untouched
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

from orchestrator.demo import prepare_demo
from orchestrator.llm.messages import Message, ToolSpec
from orchestrator.llm.scripted import ScriptedModel
from orchestrator.runner import STATE_TYPES
from orchestrator.state import Candidate
from orchestrator.testing import ChatServer, scripted_handler
from tests.test_cli_mixed import GOOD

KEY = "sk-resume-provider-key-5e0b7d"
SLOW_MARK = "# median by slow"
SLOW_GOOD = GOOD.replace("# median by claude", SLOW_MARK)


def turn(messages: list[Message]) -> int:
    return sum(1 for m in messages if m.role == "assistant")


def fast(messages: list[Message], tools: list[ToolSpec], choice: str | None) -> Any:
    if "write" not in {t.name for t in tools}:
        return {"content": "A title"}  # OpenCode's first call names the session
    if turn(messages) == 0:
        edit = {"filePath": "stats.py", "content": GOOD}
        return {"tool_calls": [{"name": "write", "arguments": edit}]}
    return {"content": "Done: median added."}


class Slow:
    """Looks around for two turns, then writes its median. On the first run its turn-2
    request waits until the fast candidate is checkpointed and then kills flow."""

    def __init__(self, checkpointed: threading.Event) -> None:
        self.checkpointed = checkpointed
        self.server: ChatServer | None = None
        self.flow_pid: int | None = None
        self.killed_at: int | None = None
        """How many requests the server had received when flow was killed."""

    def __call__(self, messages: list[Message], tools: list[ToolSpec], choice: str | None) -> Any:
        if "write" not in {t.name for t in tools}:
            return {"content": "A title"}
        step = turn(messages)
        if step < 2:
            command = ["cat stats.py", "python3 -m unittest -q"][step]
            call = {"command": command, "description": "look"}
            return {"tool_calls": [{"name": "bash", "arguments": call}]}
        if step == 2:
            if self.killed_at is None:
                self._kill_flow()
            edit = {"filePath": "stats.py", "content": SLOW_GOOD}
            return {"tool_calls": [{"name": "write", "arguments": edit}]}
        return {"content": "Done: median added."}

    def _kill_flow(self) -> None:
        assert self.checkpointed.wait(45), "the fast candidate was never checkpointed"
        assert self.server is not None and self.flow_pid is not None
        self.killed_at = len(self.server.requests)
        os.kill(self.flow_pid, signal.SIGKILL)


def checkpointed_candidates(db: Path) -> list[Candidate]:
    """Candidates in the checkpoint's pending writes: build nodes finished and saved."""
    if not db.exists():
        return []
    serde = JsonPlusSerializer(allowed_msgpack_modules=STATE_TYPES)
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        rows = conn.execute("SELECT type, value FROM writes WHERE channel = 'candidates'")
        return [c for kind, value in rows for c in serde.loads_typed((kind, value))]
    except sqlite3.OperationalError:  # the table is not made yet
        return []
    finally:
        conn.close()


def watch(db: Path, seen: threading.Event, stop: threading.Event) -> None:
    """Sets `seen` once candidate 0 (fast's) is in the checkpoint."""
    while not stop.is_set():
        if any(c.index == 0 and c.status == "ok" for c in checkpointed_candidates(db)):
            seen.set()
            return
        stop.wait(0.05)  # polling interval of the observer, not synchronisation


def processes_under(root: Path) -> list[str]:
    """Processes (other than this one) whose working directory or argv is under `root`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(entry / "cwd")
        except OSError:  # gone, or a zombie
            continue
        if cwd.startswith(str(root)) or str(root) in argv:
            found.append(f"{entry.name}: {argv[:200]}")
    return found


@pytest.fixture(autouse=True)
def key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_TEST_KEY", KEY)


def test_kill_mid_cli_build_and_resume_keeps_the_finished_cli_candidate(tmp_path: Path) -> None:
    demo = prepare_demo(tmp_path)
    base = git(demo.repo, "rev-parse", "HEAD")
    checkpointed, stop = threading.Event(), threading.Event()
    slow = Slow(checkpointed)
    upstream = {"fast": ScriptedModel("fast", fast), "slow": ScriptedModel("slow", slow)}
    (tmp_path / "tmp").mkdir()
    env = {
        **os.environ,
        "FLOW_CACHE_DIR": str(tmp_path / "cache"),
        "TMPDIR": str(tmp_path / "tmp"),  # the CLIs' private homes are made here
    }
    data = yaml.safe_load(demo.config.read_text())
    with ChatServer(scripted_handler(upstream)) as server:
        slow.server = server
        data["providers"] = {
            "local": {
                "api": "openai",
                "base_url": server.base_url,
                "api_key": "LOCAL_TEST_KEY",
                "max_concurrency": 4,
            }
        }
        for name in ("fast", "slow"):
            data["models"][name] = {
                "provider": "local",
                "id": name,
                "family": "zhipu-cli",
                "price": {"input": 1.0, "output": 2.0},
            }
        data["stages"]["builders"] = [
            {"agent": "opencode", "model": "fast"},
            {"agent": "opencode", "model": "slow"},
        ]
        demo.config.write_text(yaml.safe_dump(data))
        flow = [sys.executable, "-m", "orchestrator"]
        run = [*flow, "run", str(demo.spec), "--config", str(demo.config), "--json"]
        db = demo.repo / ".flow" / "checkpoints.sqlite"
        watcher = threading.Thread(target=watch, args=(db, checkpointed, stop), daemon=True)
        watcher.start()
        try:
            with untouched(demo.repo), open(tmp_path / "run.out", "wb") as out:
                proc = subprocess.Popen(
                    run, cwd=demo.repo, env=env, stdout=out, stderr=subprocess.STDOUT
                )
                slow.flow_pid = proc.pid
                first = proc.wait(timeout=90)
        finally:
            stop.set()
            watcher.join()
        output = (tmp_path / "run.out").read_text(errors="replace")
        assert first == -signal.SIGKILL, f"flow was not killed (exit {first}):\n{output[-3000:]}"
        assert slow.killed_at is not None
        before = list(server.requests[: slow.killed_at])
        ledger = sqlite3.connect(demo.repo / ".flow" / "ledger.sqlite")
        try:
            [(run_id, status)] = ledger.execute("SELECT run_id, status FROM runs").fetchall()
        finally:
            ledger.close()
        assert status == "running"  # as it was when the process died
        worktrees = tmp_path / "cache" / "worktrees"
        # The killed CLI's private home was left with its checkout, for the resume to remove.
        assert list(worktrees.glob(f"*/{run_id}/flow-opencode-home-*"))

        with untouched(demo.repo):
            resumed = subprocess.run(
                [*flow, "resume", run_id, "--json"],
                cwd=demo.repo,
                env=env,
                capture_output=True,
                text=True,
                timeout=90,
            )
        after = list(server.requests[slow.killed_at :])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    events = [json.loads(line) for line in resumed.stdout.splitlines() if line.startswith("{")]
    [finished] = [e for e in events if e["kind"] == "run_finished"]
    assert finished["outcome"] == "applied", finished
    # The resume neither built nor checked fast's candidate again; it did slow's.
    # (Builder 0 is shown as finished before the interruption, never running again.)
    running = {e["index"] for e in events if e["kind"] == "builder" and e["status"] == "running"}
    assert running == {1}, events
    assert {e["candidate"]: e["passed"] for e in events if e["kind"] == "check"} == {1: True}

    # Before the kill: fast finished its conversation; slow was in its turn 2.
    def turns_of(requests: list[dict[str, Any]], model: str) -> list[int]:
        return [
            sum(1 for m in r["messages"] if m.get("role") == "assistant")
            for r in requests
            if r.get("model") == model and r.get("tools")
        ]

    assert turns_of(before, "fast") == [0, 1]
    assert turns_of(before, "slow") == [0, 1, 2]
    # After it: fast's finished candidate was kept, not a single call of it again; slow
    # started again from the base, a fresh conversation from turn 0 to its end.
    assert [r for r in after if r.get("model") == "fast"] == []
    assert turns_of(after, "slow") == [0, 1, 2, 3]

    # The branch was applied exactly once, on the base, in the one run.
    branches = git(demo.repo, "for-each-ref", "--format=%(refname)", "refs/heads/flow/")
    assert branches.splitlines() == ["refs/heads/flow/add-median"]
    assert git(demo.repo, "rev-parse", "flow/add-median^") == base
    assert "def median" in git(demo.repo, "show", "flow/add-median:stats.py")
    ledger = sqlite3.connect(demo.repo / ".flow" / "ledger.sqlite")
    try:
        runs = ledger.execute("SELECT run_id, status FROM runs").fetchall()
    finally:
        ledger.close()
    assert runs == [(run_id, "applied")]

    report = (demo.repo / ".flow" / "runs" / run_id / "report.md").read_text()
    assert "builder #1 (opencode CLI) ran again from the base on resume" in report, report
    assert "builder #0 (opencode CLI) ran again" not in report

    # Nothing left behind: no flow or OpenCode process, no checkout, no private home ...
    assert processes_under(tmp_path) == []
    assert [p for p in worktrees.rglob("*") if p.parent != worktrees] == []
    # ... but the killed proxy's socket directory (no data in it: a socket only).
    left = sorted(p.relative_to(tmp_path / "tmp") for p in (tmp_path / "tmp").rglob("*"))
    assert [p for p in left if p.name != "proxy.sock" and len(p.parts) > 1] == [], left
    assert all(p.parts[0].startswith("flow-proxy-") for p in left), left
