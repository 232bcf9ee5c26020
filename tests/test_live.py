"""The live view as people see it: on a real terminal (a pty), in a log, and after a resume."""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console
from terminal import run_on_pty
from test_cli_resume import checkpointed_candidates

from orchestrator import events
from orchestrator.demo import DemoPaths, prepare_demo
from orchestrator.events import (
    BatchStarted,
    BuilderUpdate,
    CheckDone,
    CheckStarted,
    ModelCall,
    ReviewDone,
    ReviewStarted,
    RunFinished,
    RunStarted,
)
from orchestrator.fmt import clip
from orchestrator.ui import BatchView, LiveView

DEMO = Path(__file__).resolve().parent.parent / "orchestrator" / "demo"
HEADER = "flow Add a median function to stats"


def _argv(demo: DemoPaths, *more: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator", "run", str(demo.spec), "--config",
            str(demo.config), "--repo", str(demo.repo), *more]  # fmt: skip


def _with_builder_script(demo: DemoPaths, first_command: str) -> None:
    good = yaml.safe_load((DEMO / "scripts" / "builder_good.yaml").read_text())["replies"]
    script = demo.root / "first.yaml"
    first = {"tool_calls": [{"name": "run", "arguments": {"command": first_command}}]}
    script.write_text(yaml.safe_dump({"replies": [first, *good]}))
    cfg = yaml.safe_load(demo.config.read_text())
    cfg["models"]["glm-sim"]["script"] = str(script)
    demo.config.write_text(yaml.safe_dump(cfg))


def test_a_terminal_shows_the_running_check_and_ctrl_c_leaves_one_header(tmp_path: Path) -> None:
    demo = prepare_demo(tmp_path)
    nap = 100_000 + secrets.randbelow(800_000)
    text = demo.spec.read_text().replace("python3 -m unittest -q", f"sleep {nap}")
    demo.spec.write_text(text)
    running = re.compile(rf"check 1/1: sleep {nap} · [1-9]\.\ds")  # shown, and for how long
    code, screen = run_on_pty(
        _argv(demo),
        env={"FLOW_CACHE_DIR": str(tmp_path / "cache")},
        width=100,
        when=lambda shown: bool(running.search(shown)),
        then=b"\x03",  # Ctrl-C typed: the terminal echoes ^C and signals the process group
    )
    shown = screen.text()
    assert code == 130, shown
    assert running.search(shown), shown
    assert shown.count(HEADER) == 1, shown  # the live region did not leave a copy behind
    assert re.search(
        r"elapsed \d+\.\ds · spent \$\d\.\d{4} of \$1\.0000 \(\$\d\.\d{4} left\)", shown
    )
    assert "flow resume" in shown.splitlines()[-1]


def test_a_log_gets_whole_lines_and_whole_summaries(tmp_path: Path) -> None:
    demo = prepare_demo(tmp_path)
    res = subprocess.run(
        _argv(demo),
        capture_output=True,
        text=True,
        env={**os.environ, "FLOW_CACHE_DIR": str(tmp_path / "cache"), "COLUMNS": "80"},
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    summary = (
        "Added stats.median: sorts a copy, averages the middle pair for even lengths, "
        "raises ValueError on empty input."
    )
    assert f"  builder #0 (glm-sim): ok — {summary}" in lines  # one line, not wrapped at 80
    assert any(ln.startswith("0 ") and ln.rstrip().endswith(summary) for ln in lines), lines
    assert any("reviewers: gpt-sim, claude-sim; budget $1.0000" in ln for ln in lines)
    assert "…" not in res.stdout
    assert res.stdout.count(HEADER) == 1
    assert re.search(r"^r +claude-sim +approve +#0: 9\.0/10", res.stdout, re.M), res.stdout


def test_after_resume_every_builder_is_shown(tmp_path: Path) -> None:
    demo = prepare_demo(tmp_path)
    # Builder #0's first command blocks until the test releases it (a file the sandbox can
    # read: /var/tmp is visible read-only); #1 and #2 finish before the interruption.
    release_dir = Path(tempfile.mkdtemp(prefix="flow-test-", dir="/var/tmp"))
    release = release_dir / "release"
    nap = 100_000 + secrets.randbelow(800_000)
    _with_builder_script(demo, f"[ -e {release} ] || exec sleep {nap}; echo ready")
    env = {**os.environ, "FLOW_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.Popen(
        _argv(demo, "--json"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    seen: list[dict[str, object]] = []
    assert proc.stdout is not None
    for line in proc.stdout:  # wait until both other builders have finished (#1: its checks)
        seen.append(json.loads(line))
        checked = {e["candidate"] for e in seen if e["kind"] == "check"}
        empty = {e["index"] for e in seen if e["kind"] == "builder" and e["status"] == "empty"}
        if 1 in checked and 2 in empty:
            break
    # ... and their build nodes' results are saved (the events come just before the save).
    db = demo.repo / ".flow" / "checkpoints.sqlite"
    deadline = time.monotonic() + 60
    while {c.index for c in checkpointed_candidates(db)} < {1, 2}:
        assert time.monotonic() < deadline, "builders #1 and #2 were never checkpointed"
        time.sleep(0.05)  # polling the checkpoint for the condition, with a deadline
    deadline = time.monotonic() + 60
    while not any(
        (p / "cmdline").read_bytes().replace(b"\0", b" ").strip() == f"sleep {nap}".encode()
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and (p / "cmdline").exists()
    ):
        assert time.monotonic() < deadline, "builder #0 never blocked"
        time.sleep(0.05)  # polling /proc for the condition, with a deadline
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    run_id = str(seen[0]["run_id"])
    release.write_text("")
    try:
        res = subprocess.run(
            [sys.executable, "-m", "orchestrator", "resume", run_id, "--repo", str(demo.repo)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
    finally:
        shutil.rmtree(release_dir)
    assert res.returncode == 0, res.stderr
    table = res.stdout[res.stdout.index(HEADER) :].splitlines()
    rows = {ln.split()[0]: ln for ln in table[2:] if ln[:1].isdigit()}
    assert set(rows) == {"0", "1", "2"}, res.stdout
    assert "before the interruption" in rows["1"] and "before the interruption" in rows["2"]
    assert "kimi-sim" in rows["2"] and "empty" in rows["2"]


def test_testers_reviewers_spend_and_budget_are_rows_and_footer() -> None:
    out = io.StringIO()
    console = Console(file=out, width=80, color_system=None, record=True)
    view = LiveView(console)
    with view:
        view.emit(
            RunStarted(run_id="r", title="T", repo=".", base="0" * 40, branch="b",
                       builders=["glm"], reviewers=["gpt"], testers=["kimi"], budget_usd=1.0)
        )  # fmt: skip
        view.emit(BuilderUpdate(run_id="r", index=0, model="glm", status="ok", action="done"))
        view.emit(
            events.TesterUpdate(run_id="r", index=0, model="kimi", status="ok", action="3 tests")
        )
        view.emit(CheckStarted(run_id="r", where="check-0", candidate=0, command="pytest -q",
                               position=1, total=1))  # fmt: skip
        view.emit(CheckDone(run_id="r", candidate=0, passed=True, summary="1/1 passed"))
        view.emit(ReviewStarted(run_id="r", candidate=0, reviewer="gpt"))
        view.emit(ReviewStarted(run_id="r", candidate=0, reviewer="claude"))
        view.emit(ReviewDone(run_id="r", candidate=0, reviewer="gpt", score=8, verdict="approve"))
        view.emit(ModelCall(run_id="r", stage="review", model="gpt", prompt_tokens=1,
                            completion_tokens=1, cost_usd=0.015, outcome="ok"))  # fmt: skip
        shown_while = console.export_text(clear=False)
        view.emit(RunFinished(run_id="r", outcome="applied", cost_usd=0.015))
    shown = console.export_text()
    assert "pytest -q" not in shown_while  # no live region in a log: only event lines so far
    assert re.search(r"^t0 +kimi +ok .*3 tests$", shown, re.M), shown
    assert re.search(r"^r +gpt +approve .*#0: 8\.0/10$", shown, re.M), shown
    assert re.search(r"^r +claude +review .*reviewing #0", shown, re.M), shown
    assert "spent $0.0150 of $1.0000 ($0.9850 left)" in shown
    assert "budget $1.0000" in shown and "testers: kimi" in shown


def test_a_batch_shows_elapsed_spend_and_what_is_left_of_its_budget() -> None:
    out = io.StringIO()
    console = Console(file=out, width=80, color_system=None, record=True)
    with BatchView(console) as view:
        view.emit(BatchStarted(batch_id="b1", specs=["a.md", "b.md"], budget_usd=5.0))
        view.emit(RunStarted(run_id="r1", title="A", repo=".", base="0" * 40, branch="x",
                             builders=["m"], reviewers=[]))  # fmt: skip
        for cost in (0.5, 0.25):
            view.emit(ModelCall(run_id="r1", stage="build", model="m", prompt_tokens=1,
                                completion_tokens=1, cost_usd=cost, outcome="ok"))  # fmt: skip
    shown = console.export_text()
    assert re.search(r"^elapsed \d+\.\ds · spent \$0\.7500 of \$5\.0000 \(\$4\.2500 left\)$",
                     shown, re.M), shown  # fmt: skip
    resumed = Console(file=io.StringIO(), width=80, color_system=None, record=True)
    with BatchView(resumed) as view:
        view.emit(BatchStarted(batch_id="b1", specs=["a.md"], budget_usd=5.0, resumed=True))
    assert "since resuming" in resumed.export_text()  # no "left" it cannot know


def test_clip_cuts_at_a_word() -> None:
    text = "Added stats.median: sorts a copy, averages the middle pair for even lengths."
    assert clip(text, 200) == text
    assert clip(text, 40) == "Added stats.median: sorts a copy…"
    assert clip("first line\nsecond", 80) == "first line"
    assert len(clip("x" * 100, 20)) == 20  # one long word is cut, nothing better exists
