"""Batches in process: budget and deadline stop new work; reports and status read the store."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import git, untouched

from orchestrator.batch import BatchOptions, BatchResult, parse_until, pass_cost, run_batch
from orchestrator.config import load_config
from orchestrator.demo import DemoPaths, prepare_demo
from orchestrator.errors import FlowError
from orchestrator.ledger import Ledger
from orchestrator.protocols import ListSink
from orchestrator.spec import load_spec
from orchestrator.workspace import Repo


def specs(demo: DemoPaths, n: int) -> list[Path]:
    out = []
    for i in range(n):
        path = demo.root / f"spec{i}.md"
        path.write_text(demo.spec.read_text().replace("flow/add-median", f"flow/median-{i}"))
        out.append(path)
    return out


def batch(demo: DemoPaths, paths: list[Path], **opts: object) -> BatchResult:
    options = BatchOptions(**{"budget_usd": 5.0, **opts})  # type: ignore[arg-type]
    with untouched(demo.repo):
        return asyncio.run(
            run_batch(paths, load_config(demo.config), Repo.open(demo.repo), ListSink(), options)
        )


def test_batch_applies_each_spec_to_its_own_branch(tmp_path: Path) -> None:
    demo = prepare_demo(tmp_path)
    result = batch(demo, specs(demo, 3), parallel=3)
    assert [i.status for i in result.items] == ["applied"] * 3
    assert result.exit_code == 0
    for i in range(3):
        assert "def median" in git(demo.repo, "show", f"flow/median-{i}:stats.py")
    ledger = Ledger(demo.repo / ".flow" / "ledger.sqlite")
    try:
        assert result.cost_usd == pytest.approx(ledger.total())
    finally:
        ledger.close()
    report = result.report.read_text()
    assert "3 applied" in report and "| glm-sim |" in report and "by provider" in report


def test_rerunning_a_finished_batch_does_no_new_work(tmp_path: Path) -> None:
    demo = prepare_demo(tmp_path)
    paths = specs(demo, 2)
    first = batch(demo, paths)
    again = batch(demo, paths)
    assert again.batch_id == first.batch_id and again.resumed
    assert again.cost_usd == pytest.approx(first.cost_usd)
    assert [i.run_id for i in again.items] == [i.run_id for i in first.items]


def test_budget_exhaustion_skips_new_specs_and_says_why(tmp_path: Path) -> None:
    demo = prepare_demo(tmp_path)
    # A spec starts only if the batch can still afford one pass of it at the worst case
    # (planner, a builder's first turn, a review round); the first spec's real spend
    # (> $0.0005) leaves too little for the next ones.
    paths = specs(demo, 3)
    budget = pass_cost(load_config(demo.config), None, load_spec(paths[0])) + 0.0005
    result = batch(demo, paths, budget_usd=budget, parallel=1)
    statuses = [i.status for i in result.items]
    # The first spec runs; whether its reviews fit what is left decides applied or not
    # (a candidate without a completed review is not applied), never a skip.
    assert statuses[0] in ("applied", "needs-you")
    assert "skipped" in statuses[1:]
    reasons = [i.reason or "" for i in result.items if i.status == "skipped"]
    assert all("budget" in r for r in reasons)
    assert result.cost_usd <= budget
    assert "batch budget exhausted" in result.report.read_text()


def test_per_spec_cap_too_small_for_one_review_round_is_refused_before_spending(
    tmp_path: Path,
) -> None:
    demo = prepare_demo(tmp_path)
    # Enough for the planner and the builders (flat-rate), not for a reviewer's worst case:
    # the preflight refuses it (it used to run and silently skip every review).
    result = batch(demo, specs(demo, 1), per_spec_usd=0.025)
    assert result.items[0].status == "failed"
    assert "cannot afford one pass" in (result.items[0].reason or "")
    assert result.cost_usd == 0


def test_until_parsing() -> None:
    now = datetime(2026, 11, 21, 22, 0)
    assert parse_until("07:30", now=now) == datetime(2026, 11, 22, 7, 30)  # overnight
    assert parse_until("23:15", now=now) == datetime(2026, 11, 21, 23, 15)
    assert parse_until("2026-11-21T21:00", now=now) == datetime(2026, 11, 21, 21, 0)
    assert parse_until(None) is None
    with pytest.raises(FlowError, match="HH:MM"):
        parse_until("7h30")


def test_deadline_passed_starts_nothing(tmp_path: Path) -> None:
    demo = prepare_demo(tmp_path)
    past = (datetime.now() - timedelta(minutes=5)).isoformat(timespec="minutes")
    result = batch(demo, specs(demo, 2), until=past)
    assert [i.status for i in result.items] == ["skipped", "skipped"]
    assert all("deadline" in (i.reason or "") for i in result.items)
    assert result.cost_usd == 0 and result.exit_code == 1
    assert "flow/median-0" not in git(demo.repo, "branch", "--list")


def test_status_and_report_commands(tmp_path: Path) -> None:
    demo = prepare_demo(tmp_path)
    result = batch(demo, specs(demo, 2))
    env = {**os.environ, "COLUMNS": "120"}
    status = subprocess.run(
        [sys.executable, "-m", "orchestrator", "status"],
        cwd=demo.repo,
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert result.batch_id in status.stdout and status.stdout.count("applied") >= 2
    rep = subprocess.run(
        [sys.executable, "-m", "orchestrator", "report", result.batch_id, "--markdown"],
        cwd=demo.repo,
        capture_output=True,
        text=True,
        env=env,
    )
    assert rep.returncode == 0 and rep.stdout == result.report.read_text()
    run_id = str(result.items[0].run_id)
    one = subprocess.run(
        [sys.executable, "-m", "orchestrator", "report", run_id],
        cwd=demo.repo,
        capture_output=True,
        text=True,
        env=env,
    )
    assert one.returncode == 0 and "Add a median function to stats" in one.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "orchestrator", "report", "nope"],
        cwd=demo.repo,
        capture_output=True,
        text=True,
        env=env,
    )
    assert missing.returncode == 2 and "no run or batch" in missing.stderr


def test_a_spec_whose_branch_exists_is_skipped_not_fatal(tmp_path: Path) -> None:
    demo = prepare_demo(tmp_path)
    paths = specs(demo, 2)
    git(demo.repo, "branch", "flow/median-0")
    result = batch(demo, paths)
    assert [i.status for i in result.items] == ["skipped", "applied"]
    assert "already exists" in (result.items[0].reason or "")
    assert result.exit_code == 1


def test_invalid_spec_stops_the_batch_before_any_work(tmp_path: Path) -> None:
    demo = prepare_demo(tmp_path)
    bad = demo.root / "bad.md"
    bad.write_text("---\nchecks: [\n---\n# x\n")
    with pytest.raises(FlowError, match=r"bad\.md"):
        batch(demo, [*specs(demo, 1), bad])
    assert not (demo.repo / ".flow" / "runs").exists() or not any(
        (demo.repo / ".flow" / "runs").iterdir()
    )
    assert yaml.safe_load(demo.config.read_text())  # config untouched


def _opener(path: Path, key: str, n: int) -> tuple[Any, list[Any]]:
    from orchestrator.store import BatchItem, BatchRecord

    rec = BatchRecord(
        batch_id=f"b-race-{n}",
        key=key,
        config_path=None,
        options={},
        status="running",
        started=float(n),
        pid=os.getpid(),
    )
    items = [
        BatchItem(
            batch_id=rec.batch_id, position=0, spec_path="s.md", spec_digest="d", status="pending"
        )
    ]
    return rec, items


@pytest.mark.parametrize("existing", ["none", "interrupted"])
def test_batch_processes_started_together_open_or_claim_one_batch(
    tmp_path: Path, existing: str
) -> None:
    """Issue 8.13: the lookup and the create (or claim) are one write transaction. Both openers
    are held at the database's write lock until both have started, then race: one batch."""
    import sqlite3
    import threading

    from orchestrator.store import Store

    db = tmp_path / "ledger.sqlite"
    stores = [Store(db), Store(db)]
    if existing == "interrupted":  # a batch whose process died: both want to resume it
        dead = subprocess.Popen(["true"])
        dead.wait()
        rec, items = _opener(db, "key", 9)
        stores[0].open_or_claim_batch(
            rec.model_copy(update={"pid": dead.pid}), items, resume_id=None, new=False
        )
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    ready = threading.Barrier(3)
    results: list[Any] = [None, None]

    def open_one(n: int) -> None:
        rec, items = _opener(db, "key", n)
        ready.wait()
        try:
            results[n] = stores[n].open_or_claim_batch(rec, items, resume_id=None, new=False)
        except Exception as err:
            results[n] = err

    threads = [threading.Thread(target=open_one, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    ready.wait()
    holder.execute("COMMIT")
    for t in threads:
        t.join()
    rows = holder.execute("SELECT batch_id FROM batches").fetchall()
    assert len(rows) == 1, rows  # never two batches for the same specs
    resumed = sorted(bool(r[1]) for r in results)  # type: ignore[index]
    assert resumed == ([False, True] if existing == "none" else [True, True])
    claimed = {r[0].batch_id for r in results}  # type: ignore[index]
    assert claimed == {rows[0][0]}
    holder.close()
