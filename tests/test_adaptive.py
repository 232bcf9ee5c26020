"""Adaptive N (issue 9.5): `builders: {max, enough}` stops starting builders once enough pass.

Six scripted builders on the demo repository, of which some write the honest fix and the rest
a wrong one. What is observed: each builder's status in run.json, the model calls the ledger
(SQLite) holds per builder model, the report, and, for checks that start at once, a file the
first candidate's check writes that a still-running sibling waits for.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from conftest import flow_in
from test_protect import (
    BUILDERS,
    FINISH,
    HONEST,
    WRONG_MEDIAN,
    append,
    call,
    reply,
    run_flow,
    scripted_config,
)

from orchestrator.demo import prepare_demo

WRONG = [reply(append("stats.py", "\n\n" + WRONG_MEDIAN)), FINISH]
RIGHT = BUILDERS["honest"]
# In the order the builders are configured: the first two fail, the next two pass.
SIX = {"w1": WRONG, "w2": WRONG, "h1": RIGHT, "h2": RIGHT, "w3": WRONG, "h3": RIGHT}


def calls_by_model(repo: Path) -> dict[str, int]:
    with sqlite3.connect(repo / ".flow" / "ledger.sqlite") as db:
        rows = db.execute("SELECT model, count(*) FROM calls WHERE stage = 'build' GROUP BY model")
        return dict(rows.fetchall())


def statuses(summary: dict[str, Any]) -> dict[str, str]:
    return {c["model"]: c["status"] for c in summary["candidates"]}


def test_no_builder_starts_once_enough_candidates_pass(tmp_path: Path) -> None:
    out, repo, summary = run_flow(tmp_path, SIX, front="builders: {max: 6, enough: 2}\n")
    assert out.returncode == 0, out.stdout + out.stderr
    status = statuses(summary)
    not_started = sorted(m for m, s in status.items() if s == "not started")
    assert not_started == ["h3", "w3"], status
    calls = calls_by_model(repo)
    assert set(calls) == {"w1", "w2", "h1", "h2"}, calls  # the two never made a call
    assert summary["candidates"][summary["selection"]["winner"]]["model"] in {"h1", "h2"}
    report = next((repo / ".flow" / "runs").glob("*/report.md")).read_text()
    assert report.count("not started: 2 candidates already passed their checks") == 2
    assert "would have cost at most" in report or "had no bound" in report


def test_a_fixed_count_starts_every_builder(tmp_path: Path) -> None:
    out, repo, summary = run_flow(tmp_path, SIX)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "not started" not in statuses(summary).values()
    assert set(calls_by_model(repo)) == set(SIX)


def test_enough_in_agents_yaml_applies_and_the_spec_count_caps_the_attempts(
    tmp_path: Path,
) -> None:
    demo = prepare_demo(tmp_path)
    config = scripted_config(tmp_path, SIX)
    text = config.read_text() + "builder:\n  enough: 1\n"
    config.write_text(text)
    out = flow_in(demo.repo, "run", str(demo.spec), "--config", str(config), "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    calls = calls_by_model(demo.repo)
    # enough: 1 runs one builder at a time: w1, w2 fail, h1 passes, nobody else starts.
    assert set(calls) == {"w1", "w2", "h1"}, calls
    assert (
        out.stdout.count('"status": "not started"') + out.stdout.count('"status":"not started"')
        == 3
    )


def test_a_finished_candidate_is_checked_while_a_sibling_still_builds(tmp_path: Path) -> None:
    """The slow builder waits for a file the test writes only once the fast candidate's
    check has started (seen in the run's own events); with checks run only after every
    builder, it would wait until its command timed out. The file lies outside /tmp, where
    the builder's sandbox sees it read-only: no checkout can reach a sibling's."""
    signal = Path(tempfile.mkdtemp(prefix="flow-adaptive-", dir="/var/tmp"))
    try:
        waits = [
            reply(
                call(
                    "run",
                    command=f"timeout 60 sh -c 'until [ -f {signal}/checked ]; do sleep 0.05; "
                    "done' && echo seen > seen.txt",
                )
            ),
            reply(append("stats.py", HONEST)),
            FINISH,
        ]
        demo = prepare_demo(tmp_path)
        config = scripted_config(tmp_path, {"fast": RIGHT, "slow": waits})
        cmd = [sys.executable, "-m", "orchestrator", "run", str(demo.spec), "--json"]
        proc = subprocess.Popen(
            [*cmd, "--config", str(config)],
            cwd=demo.repo,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        seen_check = False
        for line in proc.stdout:
            event = json.loads(line) if line.startswith("{") else {}
            if event.get("kind") == "check_started" and event.get("candidate") == 0:
                seen_check = True
                (signal / "checked").touch()
        assert proc.wait(timeout=120) == 0, proc.stderr.read() if proc.stderr else ""
        assert seen_check
        runs = demo.repo / ".flow" / "runs"
        patch = next(runs.glob("*/candidates/build-1.patch")).read_text()
        assert "+seen" in patch
    finally:
        shutil.rmtree(signal, ignore_errors=True)


def test_builders_attempts_are_validated(tmp_path: Path) -> None:
    repo = prepare_demo(tmp_path).repo
    config = scripted_config(tmp_path, {"w1": WRONG})
    expected = "builders: expected an integer from 1 to 32, or {max: N, enough: K}"
    for value in ("{max: 2, enough: 3}", "{max: 6}", "{max: 6, enough: 2, most: 1}", "0", "true"):
        spec = tmp_path / "s.md"
        spec.write_text(f'---\ntitle: t\nchecks: ["true"]\nbuilders: {value}\n---\n# t\n\nbody\n')
        out = flow_in(repo, "validate", str(spec), "--config", str(config))
        assert out.returncode == 2, (value, out.stdout, out.stderr)
        assert expected in out.stderr and "s.md:4" in out.stderr, (value, out.stderr)
        assert "Traceback" not in out.stderr
