"""Ctrl-C (SIGINT) or SIGTERM during a run: it stops cleanly and `flow resume` finishes it."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import git, repo_state

from orchestrator.demo import prepare_demo

DEMO = Path(__file__).resolve().parent.parent / "orchestrator" / "demo"


def _wait_for(marker: str, proc: subprocess.Popen[str], within: float = 60.0) -> int:
    """The host pid of the process whose command line is `marker`, once it runs."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and proc.poll() is None:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").strip()
            except OSError:
                continue
            if cmdline == marker.encode():
                return int(entry.name)
        time.sleep(0.05)  # polling /proc for the condition, with a deadline
    raise AssertionError(f"{marker!r} never started")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_then_resume(tmp_path: Path, sig: signal.Signals) -> None:
    demo = prepare_demo(tmp_path)
    # The good builder's first command blocks until the test releases it (after the interrupt).
    # Builders are sandboxed (nothing outside their checkout is writable, /tmp is private), so
    # the release is a file the sandbox can read (/var/tmp is visible read-only), and the test
    # finds the blocked command on the host by its unique command line.
    release_dir = Path(tempfile.mkdtemp(prefix="flow-test-", dir="/var/tmp"))
    release = release_dir / "release"
    nap = 100_000 + secrets.randbelow(800_000)
    block = f"[ -e {release} ] || exec sleep {nap}; echo ready"
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
    child = _wait_for(f"sleep {nap}", proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    run_id = json.loads(out.splitlines()[0])["run_id"]

    assert proc.returncode == 130, err
    assert f"flow resume {run_id}" in err and "Traceback" not in err
    assert not pid_alive(child)  # the builder's command died with the run
    # No checkouts left (the base checkouts overlay views share are kept for the next run).
    assert [p for p in (tmp_path / "cache" / "worktrees").rglob("*") if p.is_file()] == []
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
    release.write_text("")

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
    shutil.rmtree(release_dir)
