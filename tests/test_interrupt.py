"""Ctrl-C (SIGINT) or SIGTERM during a run: it stops cleanly and `flow resume` finishes it."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import git, repo_state

from orchestrator.demo import prepare_demo

DEMO = Path(__file__).resolve().parent.parent / "orchestrator" / "demo"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_then_resume(tmp_path: Path, sig: signal.Signals) -> None:
    demo = prepare_demo(tmp_path)
    mark, fifo = tmp_path / "blocked.mark", tmp_path / "child.fifo"
    os.mkfifo(fifo)
    # The good builder's first command blocks (once) until the interrupt arrives; it tells the
    # test its pid through a FIFO, which is also how the test knows it is running.
    block = f"if [ ! -e {mark} ]; then touch {mark}; echo $$ > {fifo}; sleep 120; fi; echo ready"
    good = yaml.safe_load((DEMO / "scripts" / "builder_good.yaml").read_text())["replies"]
    script = tmp_path / "blocking.yaml"
    script.write_text(
        yaml.safe_dump(
            {"replies": [{"tool_calls": [{"name": "run", "arguments": {"command": block}}]}, *good]}
        )
    )
    cfg = yaml.safe_load(demo.config.read_text())
    cfg["models"]["glm-sim"]["script"] = str(script)
    demo.config.write_text(yaml.safe_dump(cfg))
    before = repo_state(demo.repo)
    env = {**os.environ, "FLOW_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "run",
            str(demo.spec),
            "--config",
            str(demo.config),
            "--json",
        ],
        cwd=demo.repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with open(fifo) as pipe:  # blocks until the builder's command is running
        child_pid = pipe.read().strip()
    child = int(child_pid)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    run_id = json.loads(out.splitlines()[0])["run_id"]

    assert proc.returncode == 130, err
    assert f"flow resume {run_id}" in err and "Traceback" not in err
    assert not pid_alive(child)  # the builder's command died with the run
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))  # no checkouts left
    assert repo_state(demo.repo) == before  # no branch, nothing touched
    db = sqlite3.connect(demo.repo / ".flow" / "ledger.sqlite")
    paid_before = db.execute("SELECT COUNT(*) FROM calls WHERE outcome='ok'").fetchone()[0]
    db.close()

    status = subprocess.run(
        [sys.executable, "-m", "orchestrator", "status", "--json"],
        cwd=demo.repo,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    runs = [json.loads(x) for x in status.stdout.splitlines()]
    assert [r["live"] for r in runs if r["run_id"] == run_id] == ["interrupted"]

    resumed = subprocess.run(
        [sys.executable, "-m", "orchestrator", "resume", run_id, "--json"],
        cwd=demo.repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "def median" in git(demo.repo, "show", "flow/add-median:stats.py")
    db = sqlite3.connect(demo.repo / ".flow" / "ledger.sqlite")
    replayed = db.execute("SELECT COUNT(*) FROM calls WHERE outcome='replayed'").fetchone()[0]
    dupes = db.execute(
        "SELECT COUNT(*) FROM (SELECT request_key FROM calls WHERE outcome='ok' "
        "GROUP BY request_key HAVING COUNT(*) > 1)"
    ).fetchone()[0]
    db.close()
    assert paid_before > 0 and replayed > 0 and dupes == 0
