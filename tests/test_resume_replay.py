"""kill -9 a real `flow run` mid-build whose tool output differs every time; `flow resume` must
not buy again any turn the provider already answered (issue 8.9).

The provider is the test server with its own bill. Both builders (one model, two scopes) run
`date +%s%N` on their first two turns, so every later request of the resumed run carries tool
output that the first run never sent. The server holds each builder's fourth request until
both are waiting there, the test kills the process group, and then resumes the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import yaml
from conftest import git, untouched

from orchestrator.demo import prepare_demo
from orchestrator.testing.demo_http import demo_scripts, http_config
from orchestrator.testing.server import ChatServer, ServerReply, scripted_handler

DEMO = Path(__file__).resolve().parent.parent / "orchestrator" / "demo"
HOLD_TURN = 3  # turns 0-2 are answered before the kill: two `date` runs and a read
BUILDERS = 2
PRICES = (2e-6, 8e-6)


def turns(request: dict[str, Any]) -> int:
    return sum(1 for m in request.get("messages") or [] if m.get("role") == "assistant")


def turn_of(request: dict[str, Any]) -> tuple[str, int, str]:
    """The server's own name for a turn: the model, how many replies the conversation holds,
    and its prompts (system and user text). Tool output is not part of it."""
    prompts = [
        m.get("content")
        for m in request.get("messages") or []
        if m.get("role") in ("system", "developer", "user")
    ]
    digest = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]
    return str(request.get("model")), turns(request), digest


class Gate:
    """Answers as scripted; while closed, holds each builder's request for HOLD_TURN and
    signals once every builder is held there (all earlier replies were then received)."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.closed = True
        self.held = 0
        self.all_held = threading.Event()
        self.release = threading.Event()
        self.answered: list[tuple[str, int, str]] = []
        self.asked: list[tuple[str, int, str]] = []
        self._lock = threading.Lock()

    def __call__(self, request: dict[str, Any]) -> dict[str, Any] | ServerReply:
        held = self.closed and request.get("model") == "glm-sim" and turns(request) >= HOLD_TURN
        with self._lock:
            self.asked.append(turn_of(request))
            if held:
                self.held += 1
                if self.held == BUILDERS:
                    self.all_held.set()
        if held:
            self.release.wait()  # the client is killed meanwhile; this reply goes nowhere
            return self.inner(request)
        reply = self.inner(request)
        with self._lock:
            self.answered.append(turn_of(request))
        return reply


def test_resume_after_kill_pays_only_for_turns_never_answered(tmp_path: Path) -> None:
    demo = prepare_demo(tmp_path)
    stamp = {"tool_calls": [{"name": "run", "arguments": {"command": "date +%s%N"}}]}
    good = yaml.safe_load((DEMO / "scripts" / "builder_good.yaml").read_text())["replies"]
    script = tmp_path / "stamping.yaml"
    script.write_text(yaml.safe_dump({"replies": [stamp, stamp, *good]}))
    cfg = yaml.safe_load(demo.config.read_text())
    cfg["models"]["glm-sim"]["script"] = str(script)
    cfg["stages"]["builders"] = [{"model": "glm-sim"}] * BUILDERS
    demo.config.write_text(yaml.safe_dump(cfg))
    gate = Gate(scripted_handler(demo_scripts(demo)))
    env = {**os.environ, "FLOW_CACHE_DIR": str(tmp_path / "cache")}
    with ChatServer(gate, prices=PRICES) as srv:
        config = tmp_path / "http.yaml"
        config.write_text(yaml.safe_dump(http_config(demo, srv.base_url)))
        cmd = [sys.executable, "-m", "orchestrator", "run", str(demo.spec), "--config", str(config)]
        with untouched(demo.repo):
            proc = subprocess.Popen(
                cmd,
                cwd=demo.repo,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            try:
                assert gate.all_held.wait(120), "the builders never reached the held turn"
            finally:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
                gate.closed = False
                gate.release.set()
        answered_before = Counter(gate.answered)
        asked_before = len(gate.asked)
        bills_before = len(srv.bills)
        # The first run really sent varying tool output: the two stamps differ.
        stamps = [
            m["content"]
            for r in srv.requests
            if r.get("model") == "glm-sim" and turns(r) == 2
            for m in r["messages"]
            if m.get("role") == "tool"
        ]
        assert len(stamps) == 2 * BUILDERS and len(set(stamps)) == 2 * BUILDERS, stamps

        db = sqlite3.connect(demo.repo / ".flow" / "ledger.sqlite")
        (run_id,) = db.execute("SELECT run_id FROM runs").fetchone()
        db.close()
        with untouched(demo.repo):
            resumed = subprocess.run(
                [sys.executable, "-m", "orchestrator", "resume", run_id, "--json"],
                cwd=demo.repo,
                env=env,
                capture_output=True,
                text=True,
                timeout=180,
            )
        asked_after = Counter(gate.asked[asked_before:])
        new_bills = srv.bills[bills_before:]

    assert resumed.returncode == 0, resumed.stderr
    assert "def median" in git(demo.repo, "show", "flow/add-median:stats.py")
    # Not one turn the server had answered was asked, or billed, again ...
    assert not answered_before & asked_after, sorted((answered_before & asked_after).elements())
    # ... and the resume asked exactly for what was never answered: each builder's turns
    # from the held one to its finish, and the four reviews (two reviewers, two candidates).
    builder_turns = len(yaml.safe_load(script.read_text())["replies"])
    expected = BUILDERS * (builder_turns - HOLD_TURN) + 2 * BUILDERS
    assert sum(asked_after.values()) == len(new_bills) == expected, asked_after
    assert all(model == "glm-sim" and n >= HOLD_TURN for model, n, _ in asked_after if n)
    # Tool output changed between the runs, yet every answered builder turn was replayed.
    db = sqlite3.connect(demo.repo / ".flow" / "ledger.sqlite")
    replayed = db.execute(
        "SELECT COUNT(*) FROM calls WHERE outcome = 'replayed' AND stage = 'build'"
    ).fetchone()[0]
    db.close()
    assert replayed == BUILDERS * HOLD_TURN
