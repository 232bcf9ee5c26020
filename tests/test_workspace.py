"""workspace.py against real temporary git repositories."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import MakeRepo, git, repo_state

from orchestrator.errors import WorkspaceError
from orchestrator.proc import run_shell
from orchestrator.workspace import (
    BranchExists,
    Repo,
    apply_patch,
    cache_root,
    diff_stats,
    remove_run_worktrees,
    worktree_diff,
    worktree_dir,
)

PNG = bytes(range(256)) * 4 + b"\0\x89PNG"


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Worktrees go to a per-test cache, never the real ~/.cache."""
    path = tmp_path / "cache"
    monkeypatch.setenv("FLOW_CACHE_DIR", str(path))
    return path


@pytest.fixture
def repo(make_repo: MakeRepo) -> Repo:
    root = make_repo(
        {
            "README.md": "hello\n",
            "src/app.py": "def main():\n    return 1\n",
            "old.txt": "to be deleted\n",
            ".gitignore": "*.log\n",
        }
    )
    return Repo.open(root)


def raw(cwd: Path, *args: str) -> bytes:
    """git's stdout as bytes, unstripped (conftest's `git` strips it)."""
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, check=True).stdout


def user_mess(root: Path) -> None:
    """Leave the user's checkout with staged, modified and untracked files and a stash entry."""
    (root / "README.md").write_text("stashed edit\n")
    git(root, "stash", "-q")
    (root / "README.md").write_text("staged edit\n")
    git(root, "add", "README.md")
    (root / "src/app.py").write_text("# unstaged edit\n")
    (root / "scratch.txt").write_text("untracked\n")


# --- Repo.open and small queries ---------------------------------------------------


def test_open_finds_the_top_level_from_a_subdirectory(repo: Repo) -> None:
    opened = Repo.open(repo.root / "src")
    assert opened.root == repo.root.resolve()
    assert opened.git_dir == (repo.root / ".git").resolve()


def test_open_missing_path(tmp_path: Path) -> None:
    with pytest.raises(WorkspaceError, match="does not exist"):
        Repo.open(tmp_path / "nope")


def test_open_not_a_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    (tmp_path / "plain").mkdir()
    with pytest.raises(WorkspaceError, match="not inside a git repository") as err:
        Repo.open(tmp_path / "plain")
    assert "\n" not in str(err.value) and str(tmp_path / "plain") in str(err.value)


def test_open_bare_repository(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q", "--bare", "bare.git")
    with pytest.raises(WorkspaceError, match="bare repository"):
        Repo.open(tmp_path / "bare.git")


def test_open_repository_without_commits(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q", "fresh")
    with pytest.raises(WorkspaceError, match="has no commits yet; make a first commit"):
        Repo.open(tmp_path / "fresh")


def test_open_ignores_git_dir_from_the_callers_environment(
    repo: Repo, make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = make_repo(name="other")
    monkeypatch.setenv("GIT_DIR", str(other / ".git"))
    monkeypatch.setenv("GIT_INDEX_FILE", str(other / ".git" / "index"))
    assert Repo.open(repo.root).root == repo.root.resolve()
    assert repo.resolve("HEAD") == git(
        repo.root, "--git-dir", str(repo.git_dir), "rev-parse", "HEAD"
    )


def test_resolve(repo: Repo) -> None:
    head = git(repo.root, "rev-parse", "HEAD")
    assert repo.resolve("main") == head
    assert repo.resolve(head[:8]) == head
    for bad in ("no-such-branch", "--output=/tmp/x", "HEAD~5"):
        with pytest.raises(WorkspaceError, match=f"base '{bad}' does not exist in"):
            repo.resolve(bad)


def test_git_failure_names_gits_message(repo: Repo) -> None:
    with pytest.raises(WorkspaceError, match=r"git cat-file failed in .*: fatal: "):
        repo.git("cat-file", "-p", "nope")
    assert repo.git("cat-file", "-t", "nope", check=False) == ""


def test_branch_exists_head_label_and_dirty(repo: Repo) -> None:
    assert repo.branch_exists("main") and not repo.branch_exists("flow/x")
    assert repo.head_label() == "main"
    assert not repo.is_dirty()
    (repo.root / "debug.log").write_text("ignored\n")
    assert not repo.is_dirty()
    (repo.root / "new.txt").write_text("untracked\n")
    assert repo.is_dirty()
    git(repo.root, "checkout", "-q", "--detach")
    short = git(repo.root, "rev-parse", "--short", "HEAD")
    assert repo.head_label() == f"detached at {short}"


def test_is_dirty_does_not_rewrite_the_users_index(repo: Repo) -> None:
    # Same bytes, older mtime: the index's stat data is stale (and, being older than the
    # index, not "racily clean"), so a plain `git status` would rewrite the index.
    index = repo.git_dir / "index"
    stamp = index.stat().st_mtime - 100
    os.utime(repo.root / "README.md", (stamp, stamp))
    before = index.read_bytes()
    assert not repo.is_dirty()
    assert index.read_bytes() == before


def test_ensure_excluded_is_idempotent(repo: Repo) -> None:
    exclude = repo.git_dir / "info" / "exclude"
    exclude.unlink(missing_ok=True)
    exclude.parent.rmdir()
    repo.ensure_excluded()
    repo.ensure_excluded()
    repo.ensure_excluded(".flow/")
    assert exclude.read_text() == ".flow/\n"
    exclude.write_text("# no trailing newline")
    repo.ensure_excluded()
    repo.ensure_excluded()
    assert exclude.read_text() == "# no trailing newline\n.flow/\n"
    (repo.root / ".flow").mkdir()
    (repo.root / ".flow" / "runs.db").write_text("x")
    assert not repo.is_dirty()


def test_identity_from_config(repo: Repo) -> None:
    assert repo.identity() == ("Test User", "test@example.com")


def test_identity_default_when_unset(
    repo: Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    isolate_identity(repo, tmp_path, monkeypatch)
    assert repo.identity() == ("flow", "flow@localhost")


def isolate_identity(repo: Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    git(repo.root, "config", "--unset", "user.name")
    git(repo.root, "config", "--unset", "user.email")
    home = tmp_path / "empty-home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", "/dev/null")
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for name in ("AUTHOR", "COMMITTER"):
        monkeypatch.delenv(f"GIT_{name}_NAME", raising=False)
        monkeypatch.delenv(f"GIT_{name}_EMAIL", raising=False)
    monkeypatch.delenv("EMAIL", raising=False)


# --- builders' checkouts (shared clones) ---------------------------------------------


def linked_worktrees(repo: Repo) -> set[Path]:
    """Linked worktrees git knows of, besides the user's own checkout."""
    out = git(repo.root, "worktree", "list", "--porcelain")
    lines = [line for line in out.splitlines() if line.startswith("worktree ")]
    return {Path(line[len("worktree ") :]).resolve() for line in lines} - {repo.root}


def user_repo_snapshot(repo: Repo) -> dict[str, object]:
    """repo_state plus the git internals a builder could have reached: config, hooks, tags."""
    gd = repo.git_dir
    return {
        **repo_state(repo.root),
        "config": (gd / "config").read_bytes(),
        "hooks": sorted(p.name for p in (gd / "hooks").iterdir()),
        "tags": git(repo.root, "tag"),
        "refs": git(repo.root, "for-each-ref", "--format=%(refname) %(objectname)"),
        "worktrees": linked_worktrees(repo),
    }


def test_worktree_dir_is_outside_the_repo(repo: Repo, cache: Path) -> None:
    path = worktree_dir(repo, "run1")
    assert cache_root() == cache
    assert path.parent.parent == cache / "worktrees"
    assert len(path.parent.name) == 12 and path.name == "run1"
    assert not path.resolve().is_relative_to(repo.root)
    with pytest.raises(WorkspaceError):
        worktree_dir(repo, "../escape")


def test_cache_root_fallbacks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FLOW_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "flow"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "flow"


def test_add_worktree_makes_a_shared_clone_of_its_own(repo: Repo) -> None:
    base = repo.resolve("HEAD")
    before = user_repo_snapshot(repo)
    path = repo.add_worktree(worktree_dir(repo, "r1") / "b0", base)
    assert not path.is_relative_to(repo.root)
    assert (path / "src" / "app.py").read_text() == "def main():\n    return 1\n"
    assert git(path, "rev-parse", "HEAD") == base
    assert git(path, "status", "--porcelain") == ""
    assert (path / ".git").is_dir()  # its own git dir, not a pointer into the user's
    assert git(path, "rev-parse", "--git-common-dir") == ".git"
    alternates = (path / ".git" / "objects" / "info" / "alternates").read_text().split()
    assert [Path(a).resolve() for a in alternates] == [repo.git_dir / "objects"]
    assert git(path, "remote") == ""  # nothing to `git push` to
    assert git(path, "config", "user.name") == "flow builder"
    assert git(path, "config", "user.email") == "builder@flow.invalid"
    assert git(path, "config", "core.hooksPath") == "/dev/null"
    assert not (path / ".git" / "hooks").exists()
    assert user_repo_snapshot(repo) == before  # nothing registered, nothing moved
    repo.remove_worktree(path)
    assert not path.exists()
    repo.remove_worktree(path)  # idempotent
    assert user_repo_snapshot(repo) == before


def test_builder_git_commands_leave_the_users_repository_alone(repo: Repo) -> None:
    git(repo.root, "tag", "v1")
    before = user_repo_snapshot(repo)
    path = repo.add_worktree(worktree_dir(repo, "r1") / "b0", repo.resolve("HEAD"))
    damage = (
        "git config user.name HACK && git branch -f main HEAD~0 && git tag evil && "
        "git tag -f v1 HEAD && git config core.hooksPath .git/hooks && mkdir -p .git/hooks && "
        "echo 'touch pwned' > .git/hooks/post-commit && chmod +x .git/hooks/post-commit && "
        "echo x > NEW.md && git add NEW.md && git commit -qm builder && "
        "git branch -f main HEAD && git reflog expire --expire=now --all && git gc -q --prune=now"
    )
    res = asyncio.run(run_shell(damage, path, timeout_s=60, output_cap=10_000))
    assert res.exit_code == 0, res.output
    assert git(path, "log", "-1", "--format=%an <%ae>") == "HACK <builder@flow.invalid>"
    assert user_repo_snapshot(repo) == before
    assert not (repo.root / "pwned").exists()
    assert git(repo.root, "fsck", "--no-progress") == ""  # gc in the clone took nothing


@pytest.mark.parametrize("how", ["tag only", "detached, unreachable"])
def test_add_worktree_checks_out_a_base_no_branch_reaches(repo: Repo, how: str) -> None:
    main = repo.resolve("main")
    git(repo.root, "checkout", "-q", "--detach")
    (repo.root / "side.txt").write_text("side\n")
    git(repo.root, "add", "side.txt")
    git(repo.root, "commit", "-qm", "side")
    base = repo.resolve("HEAD")
    if how == "tag only":
        git(repo.root, "tag", "-a", "-m", "t", "only-here")
    git(repo.root, "checkout", "-q", "main")
    assert repo.resolve("main") == main != base
    path = repo.add_worktree(worktree_dir(repo, "r1") / "b0", base)
    assert git(path, "rev-parse", "HEAD") == base
    assert (path / "side.txt").read_text() == "side\n"
    (path / "NEW.md").write_text("x\n")
    assert diff_stats(worktree_diff(path, base))[0] == ["NEW.md"]


def test_no_hook_of_the_user_runs(
    repo: Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran = tmp_path / "hooks-ran"
    hook = f'#!/bin/sh\necho "$0" >> {ran}\n'
    dirs = {name: tmp_path / name for name in ("global-hooks", "template/hooks")}
    for d in [*dirs.values(), repo.git_dir / "hooks"]:
        d.mkdir(parents=True, exist_ok=True)
        for name in ("post-checkout", "pre-commit", "post-commit", "reference-transaction"):
            (d / name).write_text(hook)
            (d / name).chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    (home / ".gitconfig").write_text(
        f"[core]\n\thooksPath = {dirs['global-hooks']}\n"
        f"[init]\n\ttemplateDir = {tmp_path / 'template'}\n"
    )
    monkeypatch.setenv("HOME", str(home))
    git(repo.root, "config", "core.hooksPath", str(repo.git_dir / "hooks"))
    path = repo.add_worktree(worktree_dir(repo, "r1") / "b0", repo.resolve("HEAD"))
    builder = "echo x > NEW.md && git add NEW.md && git commit -qm b && git checkout -q HEAD~1"
    res = asyncio.run(run_shell(builder, path, timeout_s=60, output_cap=10_000))
    assert res.exit_code == 0, res.output
    assert not ran.exists()
    assert not (path / ".git" / "hooks").exists()


def test_add_worktree_refuses_a_path_inside_the_repository(repo: Repo) -> None:
    before = user_repo_snapshot(repo)
    for path in (repo.root / "wt", repo.root, repo.root.parent):
        with pytest.raises(WorkspaceError, match="must lie outside"):
            repo.add_worktree(path, repo.resolve("HEAD"))
    assert user_repo_snapshot(repo) == before


def test_add_worktree_replaces_a_leftover_checkout_but_nothing_else(repo: Repo) -> None:
    base = repo.resolve("HEAD")
    path = repo.add_worktree(worktree_dir(repo, "r1") / "b0", base)
    (path / "junk.txt").write_text("from a crashed run\n")
    assert repo.add_worktree(path, base) == path
    assert not (path / "junk.txt").exists() and git(path, "status", "--porcelain") == ""
    other = worktree_dir(repo, "r1") / "not-ours"
    other.mkdir()
    (other / "keep.txt").write_text("keep\n")
    with pytest.raises(WorkspaceError, match="not a checkout of flow's"):
        repo.add_worktree(other, base)
    assert (other / "keep.txt").read_text() == "keep\n"


def test_a_failed_add_worktree_leaves_nothing(repo: Repo) -> None:
    path = worktree_dir(repo, "r1") / "b0"
    with pytest.raises(WorkspaceError, match="git read-tree failed"):
        repo.add_worktree(path, "0" * 40)
    assert not path.exists()


def test_the_users_info_exclude_applies_in_the_checkout(repo: Repo) -> None:
    repo.ensure_excluded("secrets.env")
    base = repo.resolve("HEAD")
    path = repo.add_worktree(worktree_dir(repo, "r1") / "b0", base)
    (path / "secrets.env").write_text("TOKEN=x\n")
    assert worktree_diff(path, base) == b""


def test_remove_worktree_whose_git_dir_the_builder_broke(repo: Repo) -> None:
    path = repo.add_worktree(worktree_dir(repo, "r1") / "b0", repo.resolve("HEAD"))
    shutil.rmtree(path / ".git")
    (path / ".git").write_text(f"gitdir: {repo.git_dir}\n")  # pointing at the user's
    before = user_repo_snapshot(repo)
    repo.remove_worktree(path)
    assert not path.exists()
    assert user_repo_snapshot(repo) == before


def test_flows_own_git_calls_ignore_what_the_builder_put_in_the_checkouts_config(
    repo: Repo, tmp_path: Path
) -> None:
    base = repo.resolve("HEAD")
    path = repo.add_worktree(worktree_dir(repo, "r1") / "b0", base)
    ran = tmp_path / "ran"
    program = tmp_path / "program"
    program.write_text(f'#!/bin/sh\necho "$0" >> {ran}\nexit 1\n')
    program.chmod(0o755)
    hooks = path / ".git" / "my-hooks"
    hooks.mkdir()
    for name in ("post-index-change", "post-applypatch", "pre-applypatch"):
        shutil.copy(program, hooks / name)
    git(path, "config", "core.fsmonitor", str(program))
    git(path, "config", "core.hooksPath", str(hooks))
    (path / "NEW.md").write_text("x\n")
    patch = worktree_diff(path, base)
    check = repo.add_worktree(worktree_dir(repo, "r1") / "check", base)
    git(check, "config", "core.fsmonitor", str(program))
    git(check, "config", "core.hooksPath", str(hooks))
    apply_patch(check, patch)
    assert diff_stats(patch)[0] == ["NEW.md"] and (check / "NEW.md").read_text() == "x\n"
    assert not ran.exists()


@pytest.mark.parametrize("damage", ["gitfile", "symlink", "deleted"])
def test_a_checkout_whose_git_dir_was_replaced_is_read_through_flows_own(
    repo: Repo, make_repo: MakeRepo, damage: str
) -> None:
    base = repo.resolve("HEAD")
    path = repo.add_worktree(worktree_dir(repo, "r1") / "b0", base)
    (path / "NEW.md").write_text("x\n")
    shutil.rmtree(path / ".git")
    if damage == "gitfile":
        (path / ".git").write_text(f"gitdir: {repo.git_dir}\n")
    elif damage == "symlink":
        (path / ".git").symlink_to(repo.git_dir)
    before = user_repo_snapshot(repo)
    objects = sorted(p.name for p in (repo.git_dir / "objects").iterdir())
    patch = worktree_diff(path, base)
    assert diff_stats(patch)[0] == ["NEW.md"]  # the .git entry itself is never part of it
    check = repo.add_worktree(worktree_dir(repo, "r1") / "c0", base)
    shutil.rmtree(check / ".git")
    (check / ".git").symlink_to(repo.git_dir)
    apply_patch(check, patch)
    assert (check / "NEW.md").read_text() == "x\n"
    assert user_repo_snapshot(repo) == before
    assert sorted(p.name for p in (repo.git_dir / "objects").iterdir()) == objects


def test_a_directory_flow_did_not_make_is_refused(repo: Repo, tmp_path: Path) -> None:
    stranger = tmp_path / "not-ours"
    stranger.mkdir()
    with pytest.raises(WorkspaceError, match="not a checkout made by flow"):
        worktree_diff(stranger, repo.resolve("HEAD"))


def test_add_worktree_is_safe_from_threads(repo: Repo) -> None:
    base = repo.resolve("HEAD")
    paths = [worktree_dir(repo, "par") / f"b{i}" for i in range(6)]
    errors: list[BaseException] = []

    def add(path: Path) -> None:
        try:
            Repo.open(repo.root).add_worktree(path, base)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(git(p, "rev-parse", "HEAD") == base for p in paths)


def test_remove_run_worktrees(repo: Repo, tmp_path: Path) -> None:
    base = repo.resolve("HEAD")
    top = worktree_dir(repo, "r2")
    kept = repo.add_worktree(worktree_dir(repo, "other") / "b0", base)
    paths = [repo.add_worktree(top / f"b{i}", base) for i in range(3)]
    (top / "stray").mkdir()  # left on disk by a crash
    (top / "stray" / "f").write_text("x")
    # a builder that locked its files away: read-only and unreadable directories
    (paths[0] / "ro" / "deep").mkdir(parents=True)
    (paths[0] / "ro" / "deep" / "f").write_text("x")
    (paths[0] / "ro" / "deep").chmod(0o000)
    (paths[0] / "ro").chmod(0o500)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep\n")
    (top / "link").symlink_to(outside)  # removed as a link, the target left alone
    (paths[1] / "link").symlink_to(outside)
    assert remove_run_worktrees(repo, "r2") == 5
    assert not top.exists()
    assert all(not p.exists() for p in paths)
    assert (outside / "keep.txt").read_text() == "keep\n"
    assert git(kept, "rev-parse", "HEAD") == base
    assert remove_run_worktrees(repo, "r2") == 0


def test_remove_run_worktrees_unregisters_linked_worktrees_of_older_versions(
    repo: Repo,
) -> None:
    top = worktree_dir(repo, "r3")
    top.mkdir(parents=True)
    git(repo.root, "worktree", "add", "-q", "--detach", str(top / "b0"), "HEAD")
    git(repo.root, "worktree", "add", "-q", "--detach", str(top / "b1"), "HEAD")
    subprocess.run(["rm", "-rf", str(top / "b1")], check=True)  # gone behind git's back
    assert len(linked_worktrees(repo)) == 2
    assert remove_run_worktrees(repo, "r3") == 2
    assert linked_worktrees(repo) == set()
    assert not top.exists()


# --- candidate diffs ---------------------------------------------------------------


def candidate(repo: Repo, run: str = "r") -> tuple[str, Path]:
    base = repo.resolve("HEAD")
    return base, repo.add_worktree(worktree_dir(repo, run) / "b0", base)


def edit_everything(wt: Path) -> None:
    (wt / "src/app.py").write_text("def main():\n    return 2\n")  # modified
    (wt / "NEW.md").write_text("new file\n")  # new, never `git add`ed
    (wt / "old.txt").unlink()  # deleted
    (wt / "logo.png").write_bytes(PNG)  # binary
    (wt / "pkg/sub").mkdir(parents=True)
    (wt / "pkg/sub/mod.py").write_text("X = 1\n")  # nested new directory
    (wt / "build.log").write_text("ignored by .gitignore\n")


def test_worktree_diff_is_empty_when_unchanged(repo: Repo) -> None:
    base, wt = candidate(repo)
    assert worktree_diff(wt, base) == b""
    (wt / "debug.log").write_text("ignored\n")
    assert worktree_diff(wt, base) == b""


def test_worktree_diff_has_every_kind_of_change(repo: Repo) -> None:
    base, wt = candidate(repo)
    edit_everything(wt)
    index_before = git(wt, "ls-files", "--stage")
    patch = worktree_diff(wt, base)
    files, added, removed = diff_stats(patch)
    assert sorted(files) == ["NEW.md", "logo.png", "old.txt", "pkg/sub/mod.py", "src/app.py"]
    assert (added, removed) == (3, 2)
    assert b"GIT binary patch" in patch and b".git\n" not in patch and b"build.log" not in patch
    assert git(wt, "ls-files", "--stage") == index_before  # the builder's index is untouched


def test_worktree_diff_round_trips_through_apply_patch(repo: Repo) -> None:
    base, wt = candidate(repo, "a")
    edit_everything(wt)
    patch = worktree_diff(wt, base)
    other = repo.add_worktree(worktree_dir(repo, "b") / "b0", base)
    apply_patch(other, patch)
    assert (other / "logo.png").read_bytes() == PNG
    assert (other / "pkg/sub/mod.py").read_text() == "X = 1\n"
    assert not (other / "old.txt").exists()
    assert worktree_diff(other, base) == patch
    apply_patch(other, b"")  # nothing to do
    with pytest.raises(WorkspaceError, match="git apply failed"):
        apply_patch(other, patch)  # already applied


def test_worktree_diff_after_the_builder_committed(repo: Repo) -> None:
    base, wt = candidate(repo)
    (wt / "NEW.md").write_text("new\n")
    git(wt, "add", "-A")
    git(wt, "-c", "user.name=b", "-c", "user.email=b@x", "commit", "-q", "-m", "builder")
    (wt / "README.md").write_text("changed after the commit\n")
    files, _, _ = diff_stats(worktree_diff(wt, base))
    assert sorted(files) == ["NEW.md", "README.md"]


def test_worktree_diff_leaves_out_a_nested_repository(repo: Repo) -> None:
    base, wt = candidate(repo)
    (wt / "vendored").mkdir()
    git(wt / "vendored", "init", "-q")
    (wt / "vendored" / "f").write_text("x\n")
    git(wt / "vendored", "add", "f")
    git(wt / "vendored", "-c", "user.name=b", "-c", "user.email=b@x", "commit", "-q", "-m", "x")
    (wt / "kept.txt").write_text("kept\n")
    patch = worktree_diff(wt, base)
    assert diff_stats(patch)[0] == ["kept.txt"]
    assert b"Subproject commit" not in patch


def test_worktree_diff_sees_an_edit_that_kept_size_and_mtime(repo: Repo) -> None:
    # flow's index trusts stat data; a model can restore a file's size and mtime, not its ctime.
    base, wt = candidate(repo)
    assert worktree_diff(wt, base) == b""  # flow's index is now fresh
    app = wt / "src" / "app.py"
    was = app.stat()
    text = app.read_text()
    app.write_text(text.replace("return 1", "return 2"))
    os.utime(app, ns=(was.st_atime_ns, was.st_mtime_ns))
    now = app.stat()
    assert (now.st_size, now.st_mtime_ns) == (was.st_size, was.st_mtime_ns)
    patch = worktree_diff(wt, base)
    assert diff_stats(patch) == (["src/app.py"], 1, 1)
    assert b"+    return 2" in patch


def test_worktree_diff_ignores_a_forged_index_in_the_checkout(repo: Repo) -> None:
    # The checkout's own .git/index is the model's: marking a file unchanged there, or
    # replacing the index, must not hide the file's change from flow.
    base, wt = candidate(repo)
    (wt / "src" / "app.py").write_text("def main():\n    return 3\n")
    git(wt, "update-index", "--assume-unchanged", "src/app.py")
    git(wt, "update-index", "--skip-worktree", "README.md")
    (wt / "README.md").write_text("hidden?\n")
    assert git(wt, "status", "--porcelain") == ""  # the model's git is fooled
    files, _, _ = diff_stats(worktree_diff(wt, base))
    assert sorted(files) == ["README.md", "src/app.py"]


def test_add_worktree_copies_no_ref_of_the_users(repo: Repo) -> None:
    for i in range(5):
        git(repo.root, "branch", f"topic/{i}")
    git(repo.root, "tag", "v1")
    path = repo.add_worktree(worktree_dir(repo, "r1") / "b0", repo.resolve("HEAD"))
    assert git(path, "for-each-ref") == ""
    assert git(path, "rev-parse", "HEAD") == repo.resolve("HEAD")
    assert git(path, "log", "--format=%s", "-1") == git(repo.root, "log", "--format=%s", "-1")


def test_worktree_diff_ignores_users_diff_config(repo: Repo) -> None:
    for key, value in [
        ("diff.noprefix", "true"),
        ("color.diff", "always"),
        ("diff.renames", "copies"),
    ]:
        git(repo.root, "config", key, value)
    base, wt = candidate(repo)
    (wt / "old.txt").rename(wt / "moved.txt")
    patch = worktree_diff(wt, base)
    assert b"\x1b[" not in patch and b"diff --git a/moved.txt b/moved.txt" in patch
    assert sorted(diff_stats(patch)[0]) == ["moved.txt", "old.txt"]


# --- diff_stats ----------------------------------------------------------------------


def test_diff_stats_counts_lines_in_hunks_only() -> None:
    patch = (
        b"diff --git a/notes.md b/notes.md\n"
        b"index 1111111..2222222 100644\n"
        b"--- a/notes.md\n"
        b"+++ b/notes.md\n"
        b"@@ -1,3 +1,3 @@\n"
        b" keep\n"
        b"--- a line that looks like a header\n"
        b"+++ and its replacement\n"
        b" keep\n"
        b"\\ No newline at end of file\n"
        b"diff --git a/gone.txt b/gone.txt\n"
        b"deleted file mode 100644\n"
        b"--- a/gone.txt\n"
        b"+++ /dev/null\n"
        b"@@ -1 +0,0 @@\n"
        b"-bye\n"
        b"diff --git a/img.bin b/img.bin\n"
        b"new file mode 100644\n"
        b"Binary files /dev/null and b/img.bin differ\n"
        b'diff --git "a/caf\\303\\251 \\"x\\".txt" "b/caf\\303\\251 \\"x\\".txt"\n'
        b"new file mode 100644\n"
        b"--- /dev/null\n"
        b'+++ "b/caf\\303\\251 \\"x\\".txt"\n'
        b"@@ -0,0 +1,2 @@\n"
        b"+a\n"
        b"+b\n"
        b"diff --git a/with space.txt b/with space.txt\n"
        b"old mode 100644\n"
        b"new mode 100755\n"
    )
    files, added, removed = diff_stats(patch)
    assert files == ["notes.md", "gone.txt", "img.bin", 'café "x".txt', "with space.txt"]
    assert (added, removed) == (3, 2)


def test_diff_stats_of_nothing() -> None:
    assert diff_stats(b"") == ([], 0, 0)


# --- commit_patch --------------------------------------------------------------------


def test_commit_patch_makes_a_branch_and_touches_nothing_of_the_users(repo: Repo) -> None:
    base, wt = candidate(repo)
    edit_everything(wt)
    patch = worktree_diff(wt, base)
    user_mess(repo.root)
    before = repo_state(repo.root)
    message = "Add things\n\nBody line one.\n  indented line\n\n# not a comment\n"
    sha = repo.commit_patch(base, patch, "flow/things", message)
    after = repo_state(repo.root)
    new_branch = f"refs/heads/flow/things {sha}"
    assert after["branches"] == f"{new_branch}\n{before['branches']}"
    assert {**after, "branches": None} == {**before, "branches": None}
    assert git(repo.root, "rev-parse", "flow/things") == sha
    assert git(repo.root, "rev-parse", "flow/things^") == base
    assert raw(repo.root, "cat-file", "commit", sha).split(b"\n\n", 1)[1] == message.encode()
    assert git(repo.root, "show", "flow/things:src/app.py") == "def main():\n    return 2"
    assert git(repo.root, "show", "flow/things:pkg/sub/mod.py") == "X = 1"
    assert raw(repo.root, "show", "flow/things:logo.png") == PNG
    assert "old.txt" not in git(repo.root, "ls-tree", "-r", "--name-only", "flow/things")
    assert git(repo.root, "log", "-1", "--format=%an <%ae>|%cn <%ce>", sha) == (
        "Test User <test@example.com>|Test User <test@example.com>"
    )
    # the tree is exactly base + patch: applying the patch to base in a worktree agrees
    check = repo.add_worktree(worktree_dir(repo, "check") / "b0", base)
    apply_patch(check, patch)
    git(check, "add", "-A")
    assert git(check, "write-tree") == git(repo.root, "rev-parse", f"{sha}^{{tree}}")


def test_commit_patch_uses_the_default_identity(
    repo: Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, wt = candidate(repo)
    (wt / "NEW.md").write_text("x\n")
    patch = worktree_diff(wt, base)
    isolate_identity(repo, tmp_path, monkeypatch)
    probe = subprocess.run(["git", "var", "GIT_AUTHOR_IDENT"], cwd=repo.root, capture_output=True)
    assert b"test@example.com" not in probe.stdout  # really no identity left to find
    sha = repo.commit_patch(base, patch, "flow/anon", "m")
    assert git(repo.root, "log", "-1", "--format=%an <%ae>|%cn <%ce>", sha) == (
        "flow <flow@localhost>|flow <flow@localhost>"
    )


def test_commit_patch_refuses_an_existing_branch(repo: Repo) -> None:
    base, wt = candidate(repo)
    (wt / "NEW.md").write_text("x\n")
    patch = worktree_diff(wt, base)
    git(repo.root, "branch", "flow/taken")
    before = repo_state(repo.root)
    with pytest.raises(BranchExists, match="'flow/taken' already exists"):
        repo.commit_patch(base, patch, "flow/taken", "m")
    with pytest.raises(WorkspaceError):  # BranchExists is a WorkspaceError
        repo.commit_patch(base, patch, "main", "m")
    assert repo_state(repo.root) == before


def test_commit_patch_refuses_an_empty_patch(repo: Repo) -> None:
    before = repo_state(repo.root)
    with pytest.raises(WorkspaceError, match="empty"):
        repo.commit_patch(repo.resolve("HEAD"), b"", "flow/empty", "m")
    assert repo_state(repo.root) == before


def test_commit_patch_with_a_patch_that_does_not_apply(repo: Repo) -> None:
    base, wt = candidate(repo)
    (wt / "README.md").write_text("changed\n")
    patch = worktree_diff(wt, base)
    (repo.root / "README.md").write_text("moved on\n")
    git(repo.root, "commit", "-qam", "moved on")
    before = repo_state(repo.root)
    with pytest.raises(WorkspaceError, match="does not apply"):
        repo.commit_patch(repo.resolve("HEAD"), patch, "flow/stale", "m")
    with pytest.raises(WorkspaceError, match="does not apply"):
        repo.commit_patch(base, b"not a patch at all\n", "flow/garbage", "m")
    assert repo_state(repo.root) == before
    assert not repo.branch_exists("flow/stale") and not repo.branch_exists("flow/garbage")


def test_commit_patch_rejects_bad_branch_names_and_bases(repo: Repo) -> None:
    base, wt = candidate(repo)
    (wt / "NEW.md").write_text("x\n")
    patch = worktree_diff(wt, base)
    with pytest.raises(WorkspaceError, match="not a valid branch name"):
        repo.commit_patch(base, patch, "bad..name", "m")
    with pytest.raises(WorkspaceError, match="base 'nope' does not exist"):
        repo.commit_patch("nope", patch, "flow/x", "m")
    assert not repo.branch_exists("flow/x")


def test_commit_patch_ignores_whitespace_config(repo: Repo) -> None:
    git(repo.root, "config", "apply.whitespace", "error")
    base, wt = candidate(repo)
    (wt / "README.md").write_text("hello   \n\n\n")
    sha = repo.commit_patch(base, worktree_diff(wt, base), "flow/ws", "m")
    assert raw(repo.root, "show", f"{sha}:README.md") == b"hello   \n\n\n"


def test_commit_patch_from_a_detached_head_with_a_builders_checkout_open(repo: Repo) -> None:
    git(repo.root, "checkout", "-q", "--detach")
    base, wt = candidate(repo)
    (wt / "NEW.md").write_text("x\n")
    user_mess(repo.root)
    before = repo_state(repo.root)
    repo.commit_patch(base, worktree_diff(wt, base), "flow/d", "m")
    after = repo_state(repo.root)
    assert {k: v for k, v in after.items() if k != "branches"} == {
        k: v for k, v in before.items() if k != "branches"
    }
    assert git(wt, "rev-parse", "HEAD") == base  # the builder's worktree is untouched too


# --- reuse_worktree: the builder's checkout reset for the checks ----------------------


def tree_of(top: Path) -> dict[str, tuple[int, bytes]]:
    """Every path under `top` but .git: its mode and bytes (a link's target)."""
    found: dict[str, tuple[int, bytes]] = {}
    for dirpath, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if not (dirpath == str(top) and d == ".git")]
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            if p.is_symlink():
                data = os.fsencode(os.readlink(p))
            elif p.is_file():
                data = p.read_bytes()
            else:
                data = b""
            found[str(p.relative_to(top))] = (st.st_mode, data)
    return found


def test_reuse_worktree_leaves_nothing_of_the_builder(repo: Repo, tmp_path: Path) -> None:
    base, wt = candidate(repo, "a")
    (wt / "src/app.py").write_text("def main():\n    return 2\n")
    patch = worktree_diff(wt, base)
    # What a builder leaves besides its diff: each must be gone before the checks run.
    app = wt / "src" / "app.py"
    kept = app.stat()
    app.write_text("def main():\n    return 9\n")  # same size, mtime restored
    os.utime(app, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    (wt / "README.md").write_text("changed after the diff\n")
    (wt / "debug.log").write_text("ignored, but a check could read it\n")
    (wt / "sitecustomize.py").write_text("import os; os._exit(0)\n")
    (wt / "old.txt").chmod(0o755)
    (wt / "link").symlink_to(tmp_path)
    (wt / "vendored").mkdir()
    git(wt / "vendored", "init", "-q")
    (wt / "vendored" / "f").write_text("x\n")
    git(wt / "vendored", "add", "f")
    git(wt / "vendored", "-c", "user.name=b", "-c", "user.email=b@x", "commit", "-q", "-m", "x")
    git(wt, "config", "core.hooksPath", ".git/hooks")
    git(wt, "config", "alias.status", "!touch pwned")
    git(wt, "update-index", "--assume-unchanged", "README.md")
    check = worktree_dir(repo, "a") / "check-0"
    repo.reuse_worktree(wt, check, base, patch)
    fresh = repo.add_worktree(worktree_dir(repo, "b") / "check-0", base)
    apply_patch(fresh, patch)
    assert not wt.exists()
    assert tree_of(check) == tree_of(fresh)
    assert (check / "src/app.py").read_text() == "def main():\n    return 2\n"
    assert raw(check, "config", "--list", "--local") == raw(fresh, "config", "--list", "--local")
    assert git(check, "status", "--porcelain").split() == ["M", "src/app.py"]
    assert worktree_diff(check, base) == patch
    assert not (check / "pwned").exists()


def test_reuse_worktree_refuses_what_it_cannot_reset(repo: Repo) -> None:
    base, wt = candidate(repo, "a")
    (wt / ".git").rename(wt / "gone")
    (wt / ".git").symlink_to(wt / "gone")
    with pytest.raises(WorkspaceError, match="not a plain directory"):
        repo.reuse_worktree(wt, worktree_dir(repo, "a") / "check-0", base, b"")
