"""`flow clean` and `flow demo`'s temporary repository: old files go, refs and going runs stay."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from conftest import git

from orchestrator.demo import DemoPaths, prepare_demo

DEMO = Path(__file__).resolve().parent.parent / "orchestrator" / "demo"


def flow(
    *args: str, cwd: Path, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=timeout,
    )


def refs(repo: Path) -> bytes:
    """Every ref with its object, and the packed refs file, as bytes."""
    listed = subprocess.run(
        ["git", "for-each-ref", "--format=%(refname) %(objectname)"],
        cwd=repo,
        capture_output=True,
        check=True,
    ).stdout
    packed = repo / ".git" / "packed-refs"
    return listed + b"\n--\n" + (packed.read_bytes() if packed.exists() else b"")


def _blocking(demo: DemoPaths, nap: int) -> None:
    """The good builder's first command sleeps `nap` seconds: the run stays going."""
    good = yaml.safe_load((DEMO / "scripts" / "builder_good.yaml").read_text())["replies"]
    script = demo.root / "blocking.yaml"
    first = {"tool_calls": [{"name": "run", "arguments": {"command": f"exec sleep {nap}"}}]}
    script.write_text(yaml.safe_dump({"replies": [first, *good]}))
    cfg = yaml.safe_load(demo.config.read_text())
    cfg["models"]["glm-sim"]["script"] = str(script)
    demo.config.write_text(yaml.safe_dump(cfg))


def _wait_for_cmdline(marker: str, proc: subprocess.Popen[str], within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and proc.poll() is None:
        for entry in Path("/proc").iterdir():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").strip()
            except OSError:
                continue
            if cmdline == marker.encode():
                return
        time.sleep(0.05)  # polling /proc for the condition, with a deadline
    raise AssertionError(f"{marker!r} never started")


def test_clean_removes_old_files_and_dead_checkouts_never_refs_nor_a_going_run(
    tmp_path: Path,
) -> None:
    temp, cache = tmp_path / "tmp", tmp_path / "cache"
    temp.mkdir()
    env = {"TMPDIR": str(temp), "FLOW_CACHE_DIR": str(cache)}
    for name in ("finished", "going"):
        (tmp_path / name).mkdir()
    finished = prepare_demo(tmp_path / "finished")
    leftover = prepare_demo(temp)  # a demo directory, as `flow demo --keep` leaves one
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("mine\n")
    (outside / "repo").mkdir()
    (outside / "spec.md").write_text("looks like a demo\n")
    (temp / "flow-demo-link").symlink_to(outside)  # a link is never followed

    done = flow(
        "run",
        str(finished.spec),
        "--config",
        str(finished.config),
        "--keep",
        "--json",
        cwd=finished.repo,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    run_id = json.loads(done.stdout.splitlines()[-1])["run_id"]
    run_files = finished.repo / ".flow" / "runs" / run_id
    (finished.repo / ".flow" / "runs" / "link").symlink_to(outside)
    kept_checkouts = [p for p in cache.glob("worktrees/*/*") if p.name == run_id]
    assert kept_checkouts and run_files.is_dir()
    assert git(finished.repo, "for-each-ref", "refs/flow/")  # candidate refs exist
    refs_before = refs(finished.repo)

    # A run that is still going, in another repository.
    going = prepare_demo(tmp_path / "going")
    nap = 100_000 + secrets.randbelow(800_000)
    _blocking(going, nap)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "run",
            str(going.spec),
            "--config",
            str(going.config),
            "--json",
        ],
        cwd=going.repo,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_cmdline(f"sleep {nap}", proc)
        going_refs = refs(going.repo)
        going_runs = list((going.repo / ".flow" / "runs").iterdir())
        going_checkouts = [p for p in cache.glob("worktrees/*/*") if p.name == going_runs[0].name]
        assert going_checkouts

        recent = flow("clean", cwd=finished.repo, env=env)  # default: older than 7 days
        assert recent.returncode == 0, recent.stderr
        assert "removed 0 " in recent.stdout
        assert run_files.is_dir() and kept_checkouts[0].is_dir() and leftover.root.is_dir()

        dry = flow("clean", "--older-than", "0", "--dry-run", cwd=finished.repo, env=env)
        assert dry.returncode == 0 and f"would remove {run_files}" in dry.stdout, dry.stdout
        assert run_files.is_dir() and leftover.root.is_dir()

        res = flow("clean", "--older-than", "0", "--repo", str(going.repo), cwd=tmp_path, env=env)
        assert res.returncode == 0, res.stderr
        # The going run: its files and checkouts stay, and the output says why.
        assert all(p.is_dir() for p in going_runs + going_checkouts)
        assert "still going" in res.stdout
        assert refs(going.repo) == going_refs
        # The finished run's kept checkouts (another repository) and the demo directory go.
        assert not kept_checkouts[0].exists() and not leftover.root.exists()
        assert (temp / "flow-demo-link").is_symlink() and (outside / "precious.txt").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 130

    res = flow("clean", "--older-than", "0", cwd=finished.repo, env=env)
    assert res.returncode == 0, res.stderr
    assert not run_files.exists() and f"removed {run_files}" in res.stdout
    assert (outside / "precious.txt").read_text() == "mine\n"  # through .flow/runs/link: untouched
    assert refs(finished.repo) == refs_before  # branches and candidate refs byte-identical
    assert "def median" in git(finished.repo, "show", "flow/add-median:stats.py")
    # The ledger and the run records stay: status still lists the run.
    status = flow("status", "--json", cwd=finished.repo, env=env)
    assert run_id in status.stdout
    # The interrupted run keeps its files (it can be resumed) and says so.
    res = flow("clean", "--older-than", "0", "--repo", str(going.repo), cwd=tmp_path, env=env)
    assert all(p.is_dir() for p in going_runs) and "flow resume" in res.stdout, res.stdout


def test_clean_refuses_an_age_it_cannot_read(tmp_path: Path) -> None:
    env = {"TMPDIR": str(tmp_path), "FLOW_CACHE_DIR": str(tmp_path / "cache")}
    res = flow("clean", "--older-than", "soon", cwd=tmp_path, env=env)
    assert res.returncode == 2 and "--older-than 'soon'" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


def test_demo_removes_its_repository_unless_keep(tmp_path: Path) -> None:
    env = {"TMPDIR": str(tmp_path), "FLOW_CACHE_DIR": str(tmp_path / "cache")}
    gone = flow("demo", cwd=tmp_path, env=env)
    assert gone.returncode == 0, gone.stderr
    assert "applied" in gone.stdout and "flow demo --keep" in gone.stdout
    assert not list(tmp_path.glob("flow-demo-*"))
    kept = flow("demo", "--keep", cwd=tmp_path, env=env)
    assert kept.returncode == 0, kept.stderr
    (root,) = tmp_path.glob("flow-demo-*")
    assert "def median" in git(root / "repo", "show", "flow/add-median:stats.py")
    assert f"git -C {root / 'repo'} log" in kept.stdout
