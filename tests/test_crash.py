"""kill -9 a real `flow batch` at several points; the same command again finishes the work.

The crashes come from the outside world, as they would overnight: a model (scripted) that
takes its process down, a check command that kills its parent, a git hook that kills the
process group right after the branch is written.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import git, untouched

from orchestrator.demo import DemoPaths, prepare_demo
from orchestrator.overlay import in_use

DEMO = Path(__file__).resolve().parent.parent / "orchestrator" / "demo"

CRASH_PY = """
import os, signal
from pathlib import Path
from orchestrator.llm.scripted import ScriptedModel

DEMO = Path({demo!r})


def _kill_once():
    mark = Path(os.environ["FLOW_TEST_CRASH_MARK"])
    if not mark.exists():
        mark.write_text("crashed")
        os.kill(os.getpid(), signal.SIGKILL)


def _turns(messages):
    return sum(1 for m in messages if m.role == "assistant")


def planner_of_second_spec(messages, tools, tool_choice):
    if "SPEC-NUMBER-1" in (messages[1].content or ""):
        _kill_once()
    return ScriptedModel("flash-sim", DEMO / "scripts" / "planner.yaml").reply(
        messages, tools, tool_choice)


def builder_mid_build(messages, tools, tool_choice):
    if _turns(messages) == 2:
        _kill_once()
    return ScriptedModel("glm-sim", DEMO / "scripts" / "builder_good.yaml").reply(
        messages, tools, tool_choice)


def reviewer_mid_review(messages, tools, tool_choice):
    _kill_once()
    from orchestrator.demo.reviewers import strict_reviewer
    return strict_reviewer(messages, tools, tool_choice)
"""


def setup(tmp_path: Path, point: str) -> tuple[DemoPaths, list[str], dict[str, str]]:
    demo = prepare_demo(tmp_path)
    crash = tmp_path / "crash.py"
    crash.write_text(CRASH_PY.format(demo=str(DEMO)))
    cfg = yaml.safe_load(demo.config.read_text())
    models = cfg["models"]
    if point == "between-specs":
        models["flash-sim"]["script"] = f"{crash}:planner_of_second_spec"
    elif point == "mid-build":
        models["glm-sim"]["script"] = f"{crash}:builder_mid_build"
    elif point == "mid-review":
        models["gpt-sim"]["script"] = f"{crash}:reviewer_mid_review"
    demo.config.write_text(yaml.safe_dump(cfg))
    mark = tmp_path / "crashed.mark"
    paths = []
    for i in range(2):
        text = demo.spec.read_text().replace("flow/add-median", f"flow/median-{i}")
        text = text.replace("same style.", f"same style. SPEC-NUMBER-{i}")
        if point == "during-checks" and i == 0:
            kill = (
                f"if [ ! -e {mark} ]; then touch {mark}; kill -9 $PPID; fi; python3 -m unittest -q"
            )
            text = text.replace("  - python3 -m unittest -q", f"  - '{kill}'")
        path = demo.root / f"spec{i}.md"
        path.write_text(text)
        paths.append(str(path))
    if point == "after-branch-written":
        hook = demo.repo / ".git" / "hooks" / "reference-transaction"
        hook.write_text(
            "#!/bin/sh\n"
            f'if [ "$1" = committed ] && [ ! -e {mark} ] && grep -q refs/heads/flow/; then\n'
            f"  touch {mark}; kill -9 -$(ps -o pgid= $$ | tr -d ' ')\nfi\n"
        )
        hook.chmod(0o755)
    env = {
        **os.environ,
        "FLOW_TEST_CRASH_MARK": str(mark),
        "FLOW_CACHE_DIR": str(tmp_path / "cache"),
    }
    return demo, paths, env


def flow_batch(demo: DemoPaths, paths: list[str], env: dict[str, str], *, parallel: int = 1) -> int:
    cmd = [
        sys.executable,
        "-m",
        "orchestrator",
        "batch",
        *paths,
        "--budget",
        "5",
        "--config",
        str(demo.config),
        "--parallel",
        str(parallel),
        "--json",
    ]
    with untouched(demo.repo):  # killed or not, the user's state survives
        proc = subprocess.run(
            cmd,
            cwd=demo.repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            start_new_session=True,
        )
    return proc.returncode


def ledger_rows(demo: DemoPaths) -> list[tuple[str, str, str, float]]:
    db = sqlite3.connect(demo.repo / ".flow" / "ledger.sqlite")
    try:
        return db.execute("SELECT run_id, outcome, request_key, cost_usd FROM calls").fetchall()
    finally:
        db.close()


def runs(demo: DemoPaths) -> list[tuple[str, str]]:
    db = sqlite3.connect(demo.repo / ".flow" / "ledger.sqlite")
    try:
        return db.execute("SELECT run_id, status FROM runs ORDER BY started").fetchall()
    finally:
        db.close()


POINTS = ["between-specs", "mid-build", "during-checks", "mid-review", "after-branch-written"]


@pytest.mark.parametrize("point", POINTS)
def test_kill_and_rerun_finishes_the_batch(tmp_path: Path, point: str) -> None:
    demo, paths, env = setup(tmp_path, point)
    base = git(demo.repo, "rev-parse", "HEAD")

    first = flow_batch(demo, paths, env)
    assert first == -signal.SIGKILL, f"the {point} crash did not happen (exit {first})"
    assert (tmp_path / "crashed.mark").exists()
    rows_before = ledger_rows(demo)
    runs_before = runs(demo)

    second = flow_batch(demo, paths, env)
    assert second == 0

    # Every spec is applied exactly once, on its own branch, on top of the base.
    for i in range(2):
        branch = f"flow/median-{i}"
        assert git(demo.repo, "rev-parse", f"{branch}^") == base
        assert "def median" in git(demo.repo, "show", f"{branch}:stats.py")
    assert len(git(demo.repo, "for-each-ref", "refs/heads/flow/").splitlines()) == 2
    # One run per spec: the interrupted one was resumed under its id, none started over.
    final_runs = runs(demo)
    assert len(final_runs) == 2 and {s for _, s in final_runs} == {"applied"}
    assert {r for r, _ in runs_before} <= {r for r, _ in final_runs}
    # No response already received was paid for again.
    rows = ledger_rows(demo)
    paid = Counter(key for _, outcome, key, _ in rows if outcome == "ok")
    assert all(n == 1 for n in paid.values()), [k for k, n in paid.items() if n > 1]
    finished_before = {r for r, s in runs_before if s == "applied"}
    assert [r for r in rows if r[0] in finished_before] == [
        r for r in rows_before if r[0] in finished_before
    ]  # finished specs were not re-run
    # Nothing left behind: no checkouts, no half-made branch; only the base checkouts that
    # overlay views share, kept for the next run on the same commit, which no process holds.
    leftovers = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert [p for p in leftovers if not p.is_relative_to(tmp_path / "cache" / "bases")] == []
    assert not any(in_use(p) for p in (tmp_path / "cache").glob("bases/*/*.lock"))
    if point == "mid-build":
        assert any(outcome == "replayed" for _, outcome, _, _ in rows)


def test_kill_during_a_burst_of_checkpoint_writes_loses_no_finished_work(tmp_path: Path) -> None:
    """Four runs at once write their checkpoints (WAL, synchronous=NORMAL) while one of them
    is killed mid-build: the database is whole, and the same command finishes every spec
    without paying for any reply twice."""
    demo, _, env = setup(tmp_path, "mid-build")
    base = git(demo.repo, "rev-parse", "HEAD")
    paths = []
    for i in range(4):
        path = demo.root / f"burst{i}.md"
        path.write_text(demo.spec.read_text().replace("flow/add-median", f"flow/median-{i}"))
        paths.append(str(path))
    first = flow_batch(demo, paths, env, parallel=4)
    assert first == -signal.SIGKILL
    db = sqlite3.connect(demo.repo / ".flow" / "checkpoints.sqlite")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        saved = dict(db.execute("SELECT thread_id, COUNT(*) FROM checkpoints GROUP BY thread_id"))
    finally:
        db.close()
    runs_before = runs(demo)
    assert len(runs_before) == 4 and sum(saved.values()) >= 4  # all four were under way
    rows_before = ledger_rows(demo)

    assert flow_batch(demo, paths, env, parallel=4) == 0
    for i in range(4):
        assert git(demo.repo, "rev-parse", f"flow/median-{i}^") == base
    final_runs = runs(demo)
    assert [r for r, _ in final_runs] == [r for r, _ in runs_before]  # resumed, not restarted
    assert {s for _, s in final_runs} == {"applied"}
    rows = ledger_rows(demo)
    assert rows[: len(rows_before)] == rows_before  # nothing written before the kill was lost
    paid = Counter(key for _, outcome, key, _ in rows if outcome == "ok")
    assert all(n == 1 for n in paid.values()), [k for k, n in paid.items() if n > 1]
    assert any(outcome == "replayed" for _, outcome, _, _ in rows)


CAP = 0.265


def test_every_cap_a_run_started_under_holds_however_it_is_resumed(tmp_path: Path) -> None:
    """Issue 8.4: a batch's run killed mid-build and finished with `flow resume RUN` is still
    under the batch's cap, and the batch run again with a higher --budget keeps the first.

    The cap ($0.265) just covers one pass of a spec at the worst case ($0.2617: the planner,
    a builder's first turn and one review round), which the batch requires before it starts a
    spec; so once the first spec has spent anything, the second can never start under it. A
    second run made is a cap dropped."""
    demo, paths, env = setup(tmp_path, "mid-build")
    cmd = [sys.executable, "-m", "orchestrator"]
    batch = [*cmd, "batch", *paths, "--config", str(demo.config), "--parallel", "1", "--json"]
    with untouched(demo.repo):
        first = subprocess.run(
            [*batch, "--budget", str(CAP)],
            cwd=demo.repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            start_new_session=True,
        )
    assert first.returncode == -signal.SIGKILL, first.stdout + first.stderr
    [(killed, status)] = runs(demo)
    assert status == "running"  # stored as it was when the process died
    resumed = subprocess.run(
        [*cmd, "resume", killed, "--config", str(demo.config)],
        cwd=demo.repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert "Traceback" not in resumed.stderr, resumed.stderr
    again = subprocess.run(
        [*batch, "--budget", "100"],
        cwd=demo.repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert "Traceback" not in again.stderr, again.stderr
    db = sqlite3.connect(demo.repo / ".flow" / "ledger.sqlite")
    try:
        rows = db.execute("SELECT run_id, model, outcome, cost_usd FROM calls").fetchall()
    finally:
        db.close()
    assert [r for r, _ in runs(demo)] == [killed], runs(demo)  # the second spec never ran
    assert "budget" in again.stdout + again.stderr
    assert any(r[1] == "gpt-sim" and r[2] == "ok" for r in rows)  # the first spec was reviewed
    assert 0 < sum(r[3] for r in rows) <= CAP
