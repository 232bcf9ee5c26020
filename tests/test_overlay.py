"""Checkouts as overlays over one read-only base per run (orchestrator/overlay.py, issue 12).

A builder (flow's loop builder: its file tools run in flow's process, its commands under
bubblewrap; an agent CLI) tries every path to the base it can name; its siblings and the
checks must still see the base commit, byte for byte. A view's patch must be the patch a plain
checkout with the same edits gives. A killed flow leaves no holder behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import MakeRepo, git, untouched

from orchestrator import clean, overlay
from orchestrator.agents.tools import ToolError, Tools
from orchestrator.llm.messages import Message, ToolSpec
from orchestrator.workspace import (
    Repo,
    base_dir,
    remove_run_worktrees,
    worktree_diff,
    worktree_dir,
)

FILES = {
    "a.txt": "alpha\n",
    "keep.txt": "kept\n",
    "dir/one.txt": "one\n",
    "dir/two.txt": "two\n",
    "gone/x.txt": "x\n",
    "run.sh": "#!/bin/sh\necho run\n",
}
# The same edits, run in a plain checkout and in a view: deletion (a file, a whole directory),
# rename, mode change, a symlink made and one retargeted, a binary file, a directory replaced
# by a file and a file by a directory.
EDITS = (
    "rm a.txt && rm -r gone && mv dir/one.txt dir/uno.txt && chmod +x keep.txt"
    " && chmod -x run.sh && ln -s keep.txt link && ln -sfn dir/two.txt old-link"
    " && printf '\\000\\001\\002\\377' > blob.bin && printf '\\377\\376' > old.bin"
    " && rm -r dir && printf 'now a file\\n' > dir && rm keep2.txt && mkdir keep2.txt"
    " && echo inside > keep2.txt/f"
)


@pytest.fixture(autouse=True)
def overlays(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(overlay.MODE_ENV, raising=False)
    why = overlay.unavailable()
    assert why is None, f"overlays must work on the CI machine: {why}"


def _repo(make_repo: MakeRepo) -> tuple[Repo, str]:
    root = make_repo(FILES)
    (root / "old-link").symlink_to("a.txt")
    (root / "old.bin").write_bytes(b"\x00\x10binary")
    (root / "keep2.txt").write_text("k2\n")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "more kinds")
    repo = Repo.open(root)
    return repo, repo.resolve("HEAD")


def _sh(where: Path, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*overlay.enter(where), "/bin/sh", "-c", script],
        cwd=where,
        capture_output=True,
        text=True,
        check=False,
    )


def _assert_is_base(repo: Repo, sha: str, checkout: Path) -> None:
    """Every file of `checkout`, read as flow reads it, is the base commit's; nothing more."""
    files = overlay.host(checkout)
    seen = sorted(
        str(Path(d, f).relative_to(files))
        for d, dirs, names in os.walk(files)
        for f in [*names, *(x for x in dirs if (Path(d) / x).is_symlink())]
        if ".git" not in Path(d, f).relative_to(files).parts
    )
    assert seen == sorted(repo.files_at(sha))
    for rel in seen:
        path = files / rel
        got = os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
        assert got == repo.blob_at(sha, rel), rel
    assert worktree_diff(checkout, sha) == b""


def test_a_view_round_trips_every_kind_of_change_like_a_plain_checkout(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    repo, sha = _repo(make_repo)
    with untouched(repo.root):
        plain = repo.add_worktree(tmp_path / "plain" / "c", sha)
        view = repo.add_worktree(tmp_path / "run" / "build-1", sha, view=True)
        assert overlay.view_of(view) is not None and not (view / ".git").exists()
        # Even unconfined, a program in the view's namespace finds the base read-only.
        base = base_dir(repo, sha) / "tree"
        denied = _sh(view, f"echo owned > {base}/a.txt")
        assert denied.returncode != 0 and "Read-only file system" in denied.stderr
        for where in (plain, view):
            done = _sh(where, EDITS)
            assert done.returncode == 0, done.stderr
        git(plain, "add", "-A")
        plain_diff = ("diff", "--cached", "--binary", "--full-index", "--no-renames", sha, "--")
        expected = subprocess.run(
            ["git", "-C", str(plain), *plain_diff],
            capture_output=True,
            check=True,
        ).stdout
        patch = worktree_diff(view, sha)
        assert patch == expected
        for needle in (b"deleted file", b"new mode 100755", b"new file mode 120000", b"GIT binary"):
            assert needle in patch
        # A sibling over the same base and the check made after the edits see the base.
        sibling = repo.add_worktree(tmp_path / "run" / "build-2", sha, view=True)
        _assert_is_base(repo, sha, sibling)
        repo.reuse_worktree(view, tmp_path / "run" / "check-1", sha, patch)
        assert worktree_diff(tmp_path / "run" / "check-1", sha) == patch
        # Materialized once for the three views, and again for none in another run.
        made = (base / "a.txt").stat().st_ino
        other = repo.add_worktree(tmp_path / "run2" / "build-1", sha, view=True)
        assert (base / "a.txt").stat().st_ino == made
        names = sorted(p.name for p in base_dir(repo, sha).parent.iterdir())
        assert names == [sha, f"{sha}.lock", f"{sha}.lock.make"]
        repo.remove_worktree(other)
        for path in (plain, sibling, tmp_path / "run" / "check-1"):
            repo.remove_worktree(path)
        assert overlay.view_of(sibling) is None


def test_flows_own_file_tools_cannot_reach_the_base(make_repo: MakeRepo, tmp_path: Path) -> None:
    repo, sha = _repo(make_repo)
    view = repo.add_worktree(tmp_path / "run" / "build-1", sha, view=True)
    sibling = repo.add_worktree(tmp_path / "run" / "build-2", sha, view=True)
    base = base_dir(repo, sha) / "tree"
    assert base.is_dir()
    tools = Tools(view, command_timeout_s=20, output_cap=10_000)
    up = os.path.relpath(base, view)
    named = [
        str(base / "a.txt"),
        f"{up}/a.txt",
        f"/proc/self/root{base}/a.txt",
        f"/proc/{os.getpid()}/root{base}/a.txt",
        f"{view}/{up}/a.txt",
    ]
    for path in named:
        with pytest.raises(ToolError, match="outside the repository"):
            asyncio.run(tools.write_file(path, "owned\n"))
    # Links planted by a command: an absolute one, one up through `..`, one through /proc.
    out = asyncio.run(
        tools.run(
            f"ln -s {base}/a.txt abs; ln -s {up}/keep.txt up;"
            f" ln -s /proc/self/root{base}/run.sh viaproc; ln -s abs chain;"
            f" ln {base}/a.txt hard; echo owned > {base}/a.txt;"
            f" echo owned > /proc/self/root{base}/keep.txt; echo owned > /proc/1/root{base}/a.txt"
        )
    )
    assert "exit code" in out
    for link in ("abs", "up", "viaproc", "chain"):
        with pytest.raises(ToolError):
            asyncio.run(tools.read_file(link))
        with pytest.raises(ToolError):
            asyncio.run(tools.edit_file(link, "alpha", "owned"))
        with pytest.raises(ToolError):
            asyncio.run(tools.write_file(link, "owned\n"))
    # Its own files it writes as before, and they stay in its view.
    asyncio.run(tools.write_file("a.txt", "changed\n"))
    asyncio.run(tools.edit_file("dir/one.txt", "one", "uno"))
    assert b"+changed" in worktree_diff(view, sha)
    _assert_is_base(repo, sha, sibling)
    check = repo.add_worktree(tmp_path / "run" / "check-2", sha, view=True)
    _assert_is_base(repo, sha, check)
    for path in (view, sibling, check):
        repo.remove_worktree(path)


def _attack_script(base: Path, up: str) -> Any:
    attack = (
        f"echo owned > {base}/a.txt; echo owned > /proc/self/root{base}/a.txt;"
        f" echo owned > {up}/a.txt; ln {base}/a.txt hard;"
        f" ln -s {base}/keep.txt link && echo owned > link; ls {base}; true"
    )

    def script(messages: list[Message], tools: list[ToolSpec], choice: str | None) -> Any:
        names = {t.name for t in tools}
        if "write" not in names:
            return {"content": "A title"}
        turn = sum(1 for m in messages if m.role == "assistant")
        if turn == 0:
            return {"tool_calls": [{"name": "bash", "arguments": {"command": attack}}]}
        if turn == 1:
            edit = {"filePath": f"{base}/keep.txt", "content": "owned by opencode\n"}
            return {"tool_calls": [{"name": "write", "arguments": edit}]}
        if turn == 2:
            edit = {"filePath": "hello.txt", "content": "hi from opencode\n"}
            return {"tool_calls": [{"name": "write", "arguments": edit}]}
        return {"content": "Done."}

    return script


def test_an_agent_cli_in_a_view_cannot_reach_the_base(
    make_repo: MakeRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_clis import KEY, config, make_builder

    from orchestrator.ledger import Ledger
    from orchestrator.llm.door import Door
    from orchestrator.llm.scripted import ScriptedModel
    from orchestrator.testing import ChatServer, scripted_handler

    monkeypatch.setenv("LOCAL_TEST_KEY", KEY)
    repo, sha = _repo(make_repo)
    with untouched(repo.root):
        view = repo.add_worktree(tmp_path / "run" / "build-1", sha, view=True)
        sibling = repo.add_worktree(tmp_path / "run" / "build-2", sha, view=True)
        base = base_dir(repo, sha) / "tree"
        model = ScriptedModel("glm-4.7", _attack_script(base, os.path.relpath(base, view)))
        with ChatServer(scripted_handler({"glm-4.7": model})) as server:
            door = Door(config(server.base_url), run_id="r1", ledger=Ledger(tmp_path / "l.db"))
            builder = make_builder(door, "opencode", tmp_path / "cli", "b1")
            asyncio.run(builder.run("Write hello.txt saying hi.", view))
        assert builder.outcome.error is None, builder.outcome.error
        sent = "".join(str(r.get("messages")) for r in server.requests)
        assert f"ls: cannot access '{base}'" in sent  # its attack ran, and saw no base
        patch = worktree_diff(view, sha)
        assert b"+hi from opencode" in patch  # it did work, in its view
        _assert_is_base(repo, sha, sibling)
        check = repo.add_worktree(tmp_path / "run" / "check-1", sha, view=True)
        _assert_is_base(repo, sha, check)
        for path in (view, sibling, check):
            repo.remove_worktree(path)


_HOLD = """
import sys
from pathlib import Path
from orchestrator import overlay
from orchestrator.workspace import Repo
repo = Repo.open(Path(sys.argv[1]))
path = repo.add_worktree(Path(sys.argv[2]), repo.resolve("HEAD"), view=True)
view = overlay.view_of(path)
print(view.holder.pid, flush=True)
sys.stdin.read()
"""


def test_a_killed_flow_leaves_no_holder_and_clean_removes_what_is_left(
    make_repo: MakeRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLOW_CACHE_DIR", str(tmp_path / "cache"))
    repo, _ = _repo(make_repo)
    top = worktree_dir(repo, "run-1")
    flow = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(repo.root), str(top / "build-1")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert flow.stdout is not None
    holder = int(flow.stdout.readline())
    pidfd = os.pidfd_open(holder)
    assert overlay.STATE_DIR in os.listdir(top)
    # Another flow on the same base while this one holds it: shared, not waited for.
    other = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(repo.root), str(top.with_name("run-2") / "b")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert other.stdout is not None
    assert select.select([other.stdout], [], [], 60)[0], "the second flow waited for the first"
    assert int(other.stdout.readline()) > 0
    other.kill()
    other.wait()
    flow.kill()
    flow.wait()
    assert select.select([pidfd], [], [], 30)[0], "the holder outlived flow"
    os.close(pidfd)
    with contextlib.suppress(FileNotFoundError):  # gone, or a zombie its new parent reaps
        assert Path(f"/proc/{holder}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    assert str(top) not in Path("/proc/self/mountinfo").read_text()
    # What the killed run left (its base, upper directories, the view's empty mount point).
    assert (top / "build-1").is_dir()
    assert remove_run_worktrees(repo, "run-1") == 1
    assert not top.exists()
    # The base outlives the run (the next run of this commit shares it) until nobody holds
    # it: then `flow clean` removes it.
    base = base_dir(repo, repo.resolve("HEAD"))
    found = clean.find(repo, older_than_s=0)
    assert base in [f.path for f in found.removable], found
    for item in found.removable:
        clean.remove(item)
    assert not base.exists()


def test_copy_mode_makes_full_checkouts_and_says_so(
    make_repo: MakeRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator import sandbox

    monkeypatch.setenv(overlay.MODE_ENV, "copy")
    assert overlay.unavailable() == f"{overlay.MODE_ENV}=copy"
    line = sandbox.describe()
    assert "\n" not in line and "full copies per candidate" in line
    repo, sha = _repo(make_repo)
    path = repo.add_worktree(tmp_path / "run" / "build-1", sha, view=True)
    assert overlay.view_of(path) is None and (path / ".git").is_dir()
    assert not (tmp_path / "run" / overlay.STATE_DIR).exists()
    monkeypatch.delenv(overlay.MODE_ENV)
    assert "overlays over one read-only base" in sandbox.describe()


def test_a_run_commits_the_same_tree_over_views_and_over_copies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_e2e import run

    from orchestrator.demo import prepare_demo
    from orchestrator.events import Notice

    trees = {}
    for mode in ("overlay", "copy"):
        monkeypatch.setenv(overlay.MODE_ENV, mode)
        (tmp_path / mode).mkdir()
        demo = prepare_demo(tmp_path / mode)
        result, sink = run(demo)
        assert result.exit_code == 0 and result.outcome == "applied", mode
        trees[mode] = git(demo.repo, "rev-parse", "flow/add-median^{tree}")
        notices = [e.message for e in sink.events if isinstance(e, Notice)]
        said = [n for n in notices if "Checkouts are full copies" in n]
        assert len(said) == (1 if mode == "copy" else 0), notices
        assert overlay._views == {}  # every view (and its holder) ended with the run
    assert trees["overlay"] == trees["copy"]


def test_a_view_refuses_the_repository_and_a_directory_not_flows(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    from orchestrator.errors import WorkspaceError

    repo, sha = _repo(make_repo)
    with untouched(repo.root):
        for path in (repo.root / "wt", repo.root, repo.root.parent):
            with pytest.raises(WorkspaceError, match="must lie outside"):
                repo.add_worktree(path, sha, view=True)
        other = tmp_path / "run" / "not-ours"
        other.mkdir(parents=True)
        (other / "keep.txt").write_text("keep\n")
        with pytest.raises(WorkspaceError, match="not a checkout of flow's"):
            repo.add_worktree(other, sha, view=True)
        assert (other / "keep.txt").read_text() == "keep\n"
        # A view made again (a resumed builder) starts from the base, its old upper gone.
        path = repo.add_worktree(tmp_path / "run" / "build-1", sha, view=True)
        (overlay.host(path) / "junk.txt").write_text("from an interrupted attempt\n")
        assert repo.add_worktree(path, sha, view=True) == path
        _assert_is_base(repo, sha, path)
        repo.remove_worktree(path)


def test_a_new_base_reclaims_the_bases_no_process_holds(
    make_repo: MakeRepo, tmp_path: Path
) -> None:
    import threading

    repo, old = _repo(make_repo)
    made = subprocess.run(
        [sys.executable, "-c", _HOLD, str(repo.root), str(tmp_path / "r1" / "build-1")],
        input=b"",
        capture_output=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert made.returncode == 0, made.stderr
    assert (base_dir(repo, old) / "done").is_file()  # kept when its run ended
    (repo.root / "b.txt").write_text("next commit\n")
    git(repo.root, "add", "-A")
    git(repo.root, "commit", "-qm", "next")
    new = repo.resolve("HEAD")
    path = repo.add_worktree(tmp_path / "r2" / "build-1", new, view=True)
    for thread in threading.enumerate():
        if thread.name == "flow-reclaim":
            thread.join()
    assert sorted(p.name for p in base_dir(repo, new).parent.iterdir() if p.is_dir()) == [new]
    _assert_is_base(repo, new, path)
    # A base this process holds is never reclaimed by another base's making.
    repo.remove_worktree(path)
    assert (base_dir(repo, new) / "done").is_file()
