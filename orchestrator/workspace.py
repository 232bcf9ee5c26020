"""git, through the `git` binary: builders' checkouts, candidate diffs, commit-to-branch.

A builder's checkout (still called a worktree here) is a shared clone, not a linked
worktree: a linked worktree's `.git` points into the user's git directory, so `git config`,
`git branch -f` or a new hook written there would change the user's repository.

Every call gets a scrubbed environment: variables that point git at another repository or
index (set when flow runs from a hook or an alias) are dropped, prompts are off, messages
are in the C locale, and optional locks are off so that `git status` never rewrites the
user's index behind their back.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from orchestrator import overlay
from orchestrator.errors import WorkspaceError

DEFAULT_IDENTITY = ("flow", "flow@localhost")
"""Author and committer of flow's commits when the repository's git config names nobody."""

_DROPPED_ENV = (
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_COMMON_DIR",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_NAMESPACE",
    "GIT_PREFIX",
    "GIT_QUARANTINE_PATH",
)
GIT_REDIRECTS = _DROPPED_ENV
"""Variables that point git at another repository or index (set inside git hooks, aliases)."""
# Whatever the user's config says, flow's diffs must be plain, prefixed, binary-safe
# patches that `git apply` reads back exactly.
_DIFF_OPTS = (
    "--binary",
    "--full-index",
    "--no-renames",
    "--no-ext-diff",
    "--no-textconv",
    "--no-color",
    "--no-relative",
    "--src-prefix=a/",
    "--dst-prefix=b/",
)
_APPLY_OPTS = ("--binary", "--whitespace=nowarn")
# The config of a builder's clone: its own identity, and none of the user's hooks, signing
# keys or background maintenance (an auto-gc daemon would outlive the builder's command).
_CLONE_CONFIG = (
    ("core.hooksPath", "/dev/null"),
    ("core.fsmonitor", "false"),
    ("user.name", "flow builder"),
    ("user.email", "builder@flow.invalid"),
    ("commit.gpgSign", "false"),
    ("tag.gpgSign", "false"),
    ("gc.auto", "0"),
    ("maintenance.auto", "false"),
)
# flow reads a checkout a model has touched through a git directory of its own, beside the
# checkout (never inside it): the checkout's .git, config, hooks and attributes are the
# model's to write, so none of them may decide what flow's git runs or records.
_SHADOW_CONFIG = (
    ("core.bare", "false"),
    ("core.hooksPath", "/dev/null"),
    ("core.fsmonitor", "false"),
    ("core.autocrlf", "false"),
    ("core.safecrlf", "false"),
    ("core.attributesFile", "/dev/null"),
    ("core.excludesFile", "/dev/null"),
    ("core.untrackedCache", "false"),
    ("core.splitIndex", "false"),
    # flow's index keeps the checkout's stat data, and a file whose stat data still matches is
    # not read again: the model can reset a file's mtime and size, never its ctime or inode.
    ("core.trustctime", "true"),
    ("core.checkStat", "default"),
    ("core.ignoreStat", "false"),
    ("gc.auto", "0"),
    ("maintenance.auto", "false"),
)
# info/attributes outranks every .gitattributes of the work tree: no filter, conversion or
# diff driver a model wrote there applies to what flow records.
_SHADOW_ATTRIBUTES = "* !filter !text !eol !ident !diff !merge !working-tree-encoding !crlf\n"
_SHADOW_SUFFIX = ".flowgit"
GIT_TIMEOUT_S = 600.0
"""No git command flow runs may hang a run: each is killed after this long."""
_SCRUBBED_KEEP = ("PATH", "LANG", "TZ", "TMPDIR")


class BranchExists(WorkspaceError):
    """The branch flow was asked to create already exists; nothing was created."""


def _git_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}
    env.update(GIT_TERMINAL_PROMPT="0", LC_ALL="C", GIT_OPTIONAL_LOCKS="0")
    env.update(extra or {})
    return env


def _scrubbed_env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in _SCRUBBED_KEEP}
    env.update(
        GIT_TERMINAL_PROMPT="0",
        LC_ALL="C",
        GIT_OPTIONAL_LOCKS="0",
        GIT_CONFIG_NOSYSTEM="1",
        GIT_CONFIG_GLOBAL="/dev/null",
        GIT_ATTR_NOSYSTEM="1",
        HOME="/nonexistent",
        XDG_CONFIG_HOME="/nonexistent",
    )
    env.update(extra or {})
    return env


def _run(
    cwd: Path,
    args: tuple[str, ...],
    *,
    env: dict[str, str] | None = None,
    input: bytes | None = None,
    check: bool = True,
    scrubbed: bool = False,
    timeout_s: float = GIT_TIMEOUT_S,
    prefix: tuple[str, ...] | list[str] = (),
) -> subprocess.CompletedProcess[bytes]:
    """git in `cwd`. `scrubbed`: the environment is `env` plus a bare minimum, nothing of
    flow's own (keys above all), for git reading a checkout a model has touched. `prefix`:
    where git runs (an overlay view's namespace)."""
    try:
        proc = subprocess.run(
            [*prefix, "git", "-C", str(cwd), *args],
            env=_scrubbed_env(env) if scrubbed else _git_env(env),
            input=input,
            capture_output=True,
            stdin=None if input is not None else subprocess.DEVNULL,
            timeout=timeout_s,
        )
    except FileNotFoundError as exc:
        raise WorkspaceError("git is not installed or not on PATH; install git") from exc
    except subprocess.TimeoutExpired:
        raise WorkspaceError(
            f"git {args[0]} in {cwd} did not finish within {timeout_s:.0f} s; it was stopped"
        ) from None
    if check and proc.returncode != 0:
        raise WorkspaceError(f"git {args[0]} failed in {cwd}: {_first_line(proc.stderr)}")
    return proc


def _ok(cwd: Path, *args: str) -> bool:
    return _run(cwd, args, check=False).returncode == 0


def _first_line(stderr: bytes) -> str:
    lines = stderr.decode("utf-8", "replace").strip().splitlines()
    return lines[0] if lines else "(git gave no message)"


def _text(proc: subprocess.CompletedProcess[bytes]) -> str:
    return proc.stdout.decode("utf-8", "replace").rstrip("\n")


class Repo:
    """A non-bare git repository with at least one commit."""

    def __init__(self, root: Path, git_dir: Path) -> None:
        self.root = root
        self.git_dir = git_dir

    def __repr__(self) -> str:
        return f"Repo({str(self.root)!r})"

    @classmethod
    def open(cls, path: Path) -> Repo:
        path = Path(path).expanduser()
        if not path.exists():
            raise WorkspaceError(f"{path} does not exist; pass an existing repository directory")
        probe = _run(
            path, ("rev-parse", "--is-bare-repository", "--is-inside-work-tree"), check=False
        )
        if probe.returncode != 0:
            why = _first_line(probe.stderr)
            if "not a git repository" in why:
                raise WorkspaceError(
                    f"{path} is not inside a git repository; run `git init` there or pass --repo"
                )
            # e.g. "detected dubious ownership": git's own words carry the fix.
            raise WorkspaceError(f"{path} cannot be used as a git repository: {why}")
        bare, inside = _text(probe).split("\n")[:2]
        if bare == "true" or inside != "true":
            raise WorkspaceError(
                f"{path} is a bare repository (or inside a .git directory); "
                "pass a directory of a checked-out work tree"
            )
        out = _text(_run(path, ("rev-parse", "--show-toplevel", "--git-common-dir")))
        top, common = out.split("\n")[:2]
        root = Path(top).resolve()
        # --git-common-dir may be relative to the directory git ran in.
        repo = cls(root, (path / common).resolve())
        head = _run(root, ("rev-parse", "--verify", "--quiet", "HEAD^{commit}"), check=False)
        if head.returncode != 0:
            raise WorkspaceError(f"{root} has no commits yet; make a first commit")
        return repo

    def git(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        input: bytes | None = None,
        check: bool = True,
    ) -> str:
        """Run git in the work tree; stdout without its trailing newline."""
        return _text(_run(self.root, args, env=env, input=input, check=check))

    def resolve(self, rev: str) -> str:
        proc = _run(
            self.root,
            ("rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}"),
            check=False,
        )
        if proc.returncode != 0:
            raise WorkspaceError(f"base '{rev}' does not exist in {self.root}")
        return _text(proc)

    def branch_exists(self, name: str) -> bool:
        return _ok(self.root, "show-ref", "--verify", "--quiet", f"refs/heads/{name}")

    def has_file(self, sha: str, path: str) -> bool:
        """Whether `path` exists in the tree of commit `sha`."""
        return _ok(self.root, "cat-file", "-e", f"{sha}:{path}")

    def files_at(self, sha: str) -> list[str]:
        """Every path in the tree of commit `sha`."""
        out = _run(self.root, ("ls-tree", "-r", "-z", "--name-only", sha, "--"))
        return [p for p in out.stdout.decode("utf-8", "surrogateescape").split("\0") if p]

    def missing_objects(self, sha: str) -> tuple[int, str]:
        """How many objects of commit `sha` a partial clone has not downloaded (0 for a full
        clone), and its promisor remote; git is told not to fetch them while counting."""
        promisor = _run(
            self.root, ("config", "--get-regexp", r"^remote\..*\.promisor$"), check=False
        )
        remotes = [
            line.split()[0].removeprefix("remote.").removesuffix(".promisor")
            for line in _text(promisor).splitlines()
            if line.split()[-1].lower() == "true"
        ]
        if not remotes:
            return 0, ""
        proc = _run(
            self.root,
            (
                "rev-list",
                "--objects",
                "--no-walk",
                "--missing=print",
                "--no-object-names",
                sha,
                "--",
            ),
            env={"GIT_NO_LAZY_FETCH": "1"},
        )
        return sum(1 for line in proc.stdout.split(b"\n") if line.startswith(b"?")), remotes[0]

    def blob_at(self, sha: str, path: str) -> bytes | None:
        """The bytes of `path` at commit `sha`, or None where it does not exist."""
        proc = _run(self.root, ("cat-file", "blob", f"{sha}:{path}"), check=False)
        return proc.stdout if proc.returncode == 0 else None

    def head_label(self) -> str:
        branch = _run(self.root, ("symbolic-ref", "--quiet", "--short", "HEAD"), check=False)
        if branch.returncode == 0:
            return _text(branch)
        return f"detached at {self.git('rev-parse', '--short', 'HEAD')}"

    def is_dirty(self) -> bool:
        return bool(self.git("status", "--porcelain", "--untracked-files=normal"))

    def ensure_excluded(self, pattern: str = ".flow/") -> None:
        exclude = self.git_dir / "info" / "exclude"
        text = exclude.read_text(errors="replace") if exclude.exists() else ""
        if pattern in (line.strip() for line in text.splitlines()):
            return
        exclude.parent.mkdir(parents=True, exist_ok=True)
        sep = "" if not text or text.endswith("\n") else "\n"
        with exclude.open("a", encoding="utf-8") as f:
            f.write(f"{sep}{pattern}\n")

    def identity(self) -> tuple[str, str]:
        name = self.git("config", "--get", "user.name", check=False).strip()
        email = self.git("config", "--get", "user.email", check=False).strip()
        return (name, email) if name and email else DEFAULT_IDENTITY

    def add_worktree(self, path: Path, sha: str, *, view: bool = False) -> Path:
        """A private checkout of `sha` at `path`: a shared clone, not a linked worktree.

        The clone borrows the objects read-only (alternates) but has its own config, refs
        and no hooks, so whatever a builder does with git there stays there; nothing of the
        user's repository runs (hooks) or changes. A leftover clone at `path` is replaced.

        `view`: where overlays work (orchestrator/overlay.py), an overlay over the run's one
        checkout of `sha` instead of a copy; then flow's own Python reaches its files at
        `overlay.host(path)` and programs run in it under `overlay.enter(path)`.
        """
        path = Path(path).resolve()
        if path == self.root or path.is_relative_to(self.root) or self.root.is_relative_to(path):
            raise WorkspaceError(f"{path}: a builder's checkout must lie outside {self.root}")
        if view and overlay.unavailable() is None:
            return self._add_view(path, sha)
        if path.is_dir() and (path / ".git").exists():
            _remove_tree(path)  # a checkout left by a crashed or interrupted run
        elif path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise WorkspaceError(f"{path} exists and is not a checkout of flow's; remove it")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._clone(path, sha)
        except BaseException:
            self.remove_worktree(path)
            raise
        return path

    def _add_view(self, path: Path, sha: str) -> Path:
        base = self._base(sha)
        # A view's mount point is an empty directory outside its namespace.
        ours = overlay.view_of(path) is not None or (path / ".git").exists()
        if not ours and path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise WorkspaceError(f"{path} exists and is not a checkout of flow's; remove it")
        self.remove_worktree(path)  # a view or checkout left by an interrupted attempt
        try:
            shutil.copytree(shadow_dir(base), shadow_dir(path))
            overlay.mount(base, path)
        except BaseException:
            self.remove_worktree(path)
            raise
        return path

    def _base(self, sha: str) -> Path:
        """The one checkout of `sha` that views lie over: made once, by one process, then only
        read; kept between runs (a batch's specs on one base share it) while a run uses it,
        and deleted in the background once none does and another base is made."""
        top = base_dir(self, sha)
        base, done = top / "tree", top / "done"

        def make() -> None:
            _remove_tree(top)
            top.mkdir(parents=True)
            try:
                self._clone(base, sha)
                # Rewritten after every file: no entry is racily clean, so a view's first
                # diff hashes only the files that view changed.
                _safe(base, ("update-index", "-q", "--refresh"), _checkout_env(base))
                shutil.copyfile(shadow_dir(base) / "index", base / ".git" / "index")
            except BaseException:
                _remove_tree(top)
                raise
            done.write_text(f"{sha}\n", encoding="utf-8")
            others = [
                (p.with_name(p.name + ".lock"), p)
                for p in top.parent.iterdir()
                if p.is_dir() and p.name != sha and not p.is_symlink()
            ]
            if others:
                overlay.reclaim(others)

        with overlay.base_lock(base):
            overlay.hold(top.with_name(f"{sha}.lock"), done.is_file, make)
        with contextlib.suppress(OSError):
            os.utime(done)  # `flow clean` keeps what was used lately
        return base

    def _clone(self, path: Path, sha: str) -> None:
        # An empty repository that borrows the user's objects (alternates): no ref, remote or
        # branch is copied, so making it costs nothing per branch of the user's. --template=
        # copies no hooks from init.templateDir; the user's config is not read (scrubbed), so
        # not even a global reference-transaction hook runs.
        self._own_git(path, sha)
        # Every object of the source is readable through alternates: a base reachable only
        # from a tag, or from nothing at all, checks out as well as a branch tip. flow's own
        # git directory writes the files (no filter or conversion of anyone's config runs),
        # and its index, with the files' stat data, becomes the checkout's own too.
        self._shadow(path, sha)
        _safe(path, ("read-tree", "--reset", "-u", sha), _checkout_env(path))
        shutil.copyfile(shadow_dir(path) / "index", path / ".git" / "index")

    def _own_git(self, path: Path, sha: str) -> None:
        """The checkout's own .git, its HEAD detached at `sha` (its index comes later)."""
        fmt = self._object_format()
        init = ("init", "--quiet", "--template=", f"--object-format={fmt}")
        _run(path.parent, (*init, "--", str(path)), scrubbed=True)
        dot_git = path / ".git"
        for key, value in _CLONE_CONFIG:
            _run(path, ("config", key, value), env={"GIT_DIR": str(dot_git)}, scrubbed=True)
        (dot_git / "objects" / "info").mkdir(parents=True, exist_ok=True)
        (dot_git / "objects" / "info" / "alternates").write_text(
            f"{(self.git_dir / 'objects').resolve()}\n", encoding="utf-8"
        )
        exclude = self.git_dir / "info" / "exclude"
        if exclude.is_file():
            (dot_git / "info").mkdir(exist_ok=True)
            shutil.copyfile(exclude, dot_git / "info" / "exclude")
        (dot_git / "HEAD").write_text(f"{sha}\n", encoding="utf-8")

    def reuse_worktree(self, old: Path, path: Path, sha: str, patch: bytes) -> None:
        """Turn the checkout `old` a model worked in into `path` holding exactly `sha` +
        `patch`, as `add_worktree` + `apply_patch` would make it; only what differs from the
        base is written again. Raises WorkspaceError when it cannot be made so (the caller
        then makes a fresh checkout).

        Nothing the model left counts: its .git (config, hooks, index) is made anew, every
        file it changed (seen through flow's index: ctime and inode, not only mtime and
        size) is rewritten from the base, and every untracked or ignored file and nested
        repository is deleted; then the result is verified against flow's index.
        """
        if overlay.view_of(old) is not None:  # a fresh view is already base + nothing
            self.remove_worktree(old)
            self.add_worktree(path, sha, view=True)
            apply_patch(path, patch)
            return
        env = _checkout_env(old)
        if not (shadow_dir(old) / "index").is_file():
            raise WorkspaceError(f"{old}: no index of flow's to reset it by")
        if any(_is_link_or_not_dir(p) for p in (old, old / ".git")):
            raise WorkspaceError(f"{old}: its checkout or .git is not a plain directory")
        _remove_tree(old / ".git")
        _safe(old, ("add", "-A"), env)
        _safe(old, ("read-tree", "--reset", "-u", sha), env)
        _safe(old, ("clean", "-ffdxq"), env)
        _safe(old, ("update-index", "-q", "--refresh"), env)
        stray = _safe(old, ("ls-files", "-z", "--others", "--directory"), env).stdout
        dirty = _run(old, ("diff-files", "--quiet"), env=env, scrubbed=True, check=False)
        if stray or dirty.returncode != 0:
            raise WorkspaceError(f"{old}: could not be reset to {sha[:12]}")
        if path != old:
            self.remove_worktree(path)
            old.rename(path)
            shadow_dir(old).rename(shadow_dir(path))
        self._own_git(path, sha)
        shutil.copyfile(shadow_dir(path) / "index", path / ".git" / "index")
        apply_patch(path, patch)

    def _object_format(self) -> str:
        return self.git("rev-parse", "--show-object-format", check=False) or "sha1"

    def _shadow(self, path: Path, sha: str) -> None:
        """flow's own git directory for reading `path` later (see `shadow_dir`)."""
        shadow = shadow_dir(path)
        _remove_tree(shadow)
        fmt = self._object_format()
        init = ("init", "--bare", "--quiet", "--template=", f"--object-format={fmt}")
        _run(path.parent, (*init, "--", str(shadow)), scrubbed=True)
        for key, value in _SHADOW_CONFIG:
            _run(shadow, ("config", key, value), env={"GIT_DIR": str(shadow)}, scrubbed=True)
        (shadow / "objects" / "info").mkdir(parents=True, exist_ok=True)
        (shadow / "objects" / "info" / "alternates").write_text(
            f"{(self.git_dir / 'objects').resolve()}\n", encoding="utf-8"
        )
        info = shadow / "info"
        info.mkdir(exist_ok=True)
        (info / "attributes").write_text(_SHADOW_ATTRIBUTES, encoding="utf-8")
        exclude = self.git_dir / "info" / "exclude"
        if exclude.is_file():
            shutil.copyfile(exclude, info / "exclude")
        (shadow / "HEAD").write_text(f"{sha}\n", encoding="utf-8")

    def remove_worktree(self, path: Path) -> None:
        """Delete a checkout made by `add_worktree`; nothing of the user's repository changes."""
        overlay.unmount(Path(path))
        _remove_tree(Path(path))
        _remove_tree(shadow_dir(Path(path)))

    def _legacy_worktrees(self, top: Path) -> list[Path]:
        """Linked worktrees under `top`, left by flow versions that used `git worktree`."""
        out = self.git("worktree", "list", "--porcelain", check=False).splitlines()
        paths = (Path(line[len("worktree ") :]) for line in out if line.startswith("worktree "))
        return [p for p in paths if p.resolve().is_relative_to(top)]

    def commit_patch(self, base_sha: str, patch: bytes, branch: str, message: str) -> str:
        """Commit `patch` onto base as the new branch; the user's checkout is never touched."""
        if not _ok(self.root, "check-ref-format", f"refs/heads/{branch}"):
            raise WorkspaceError(f"'{branch}' is not a valid branch name; choose another")
        if self.branch_exists(branch):
            raise self._exists(branch)
        sha = self._commit(base_sha, patch, message)
        made = self._create_ref(f"refs/heads/{branch}", sha, message)
        if made is not None:
            if self.branch_exists(branch):
                raise self._exists(branch)
            raise WorkspaceError(f"cannot create branch '{branch}': {made}")
        return sha

    def keep_candidate(self, base_sha: str, patch: bytes, ref: str, message: str) -> str:
        """Commit `patch` onto base under `ref` (refs/flow/…, not a branch), create-only.

        An existing ref is left as it is and its commit returned: a resumed run keeps what the
        first attempt recorded.
        """
        found = _run(self.root, ("rev-parse", "--verify", "--quiet", ref), check=False)
        if found.returncode == 0:
            return _text(found)
        sha = self._commit(base_sha, patch, message)
        made = self._create_ref(ref, sha, message)
        if made is not None:
            raise WorkspaceError(f"cannot create {ref}: {made}")
        return sha

    def _commit(self, base_sha: str, patch: bytes, message: str) -> str:
        if not patch.strip():
            raise WorkspaceError("the candidate diff is empty; there is nothing to commit")
        base = self.resolve(base_sha)
        tree = self._tree_with(base, patch)
        if tree == self.git("rev-parse", f"{base}^{{tree}}"):
            raise WorkspaceError("the candidate diff changes nothing; there is nothing to commit")
        name, email = self.identity()
        who = {"GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email}
        who |= {"GIT_COMMITTER_NAME": name, "GIT_COMMITTER_EMAIL": email}
        return self.git("commit-tree", tree, "-p", base, "-F", "-", env=who, input=message.encode())

    def _create_ref(self, ref: str, sha: str, message: str) -> str | None:
        """Create `ref` at `sha` only if it does not exist; None, or why it failed."""
        # The zero old-value makes update-ref create-only, closing the race with a ref
        # created since the caller looked. Its length follows the repo's hash (SHA-1 or SHA-256).
        subject = message.strip().splitlines()[0][:80] if message.strip() else "commit"
        args = ("update-ref", "-m", f"flow: {subject}", ref, sha, "0" * len(sha))
        made = _run(self.root, args, check=False)
        return None if made.returncode == 0 else _first_line(made.stderr)

    def _tree_with(self, base: str, patch: bytes) -> str:
        """The tree of base with `patch` applied, built in a throwaway index."""
        with tempfile.TemporaryDirectory(prefix="flow-index-") as tmp:
            index = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            self.git("read-tree", base, env=index)
            why = self._apply_check(patch, index)
            if why is not None:
                raise WorkspaceError(f"the candidate diff does not apply to {base[:12]}: {why}")
            self.git("apply", "--cached", *_APPLY_OPTS, env=index, input=patch)
            return self.git("write-tree", env=index)

    def _apply_check(self, patch: bytes, index: dict[str, str]) -> str | None:
        args = ("apply", "--cached", "--check", *_APPLY_OPTS)
        check = _run(self.root, args, env=index, input=patch, check=False)
        return None if check.returncode == 0 else _first_line(check.stderr)

    def apply_problem(self, sha: str, patch: bytes) -> str | None:
        """Why `patch` does not apply cleanly on commit `sha` (git's first line), or None.

        Judged in a throwaway index: nothing of the user's (work tree, index, HEAD, stash,
        refs) changes and no object is written.
        """
        with tempfile.TemporaryDirectory(prefix="flow-index-") as tmp:
            index = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            self.git("read-tree", sha, env=index)
            return self._apply_check(patch, index)

    def tree_with(self, sha: str, patch: bytes) -> str:
        """The tree `patch` makes of commit `sha` (its objects written, no ref moved)."""
        return self._tree_with(self.resolve(sha), patch)

    def branch_of(self, rev: str) -> str | None:
        """The branch `rev` names (`main`, `heads/main`, `refs/heads/main`, or `HEAD` on a
        branch); None for a tag, a commit id, an expression or a detached HEAD."""
        if rev.startswith("-"):
            return None
        proc = _run(self.root, ("rev-parse", "--symbolic-full-name", rev), check=False)
        name = _text(proc) if proc.returncode == 0 else ""
        if "\n" in name or not name.startswith("refs/heads/"):
            return None
        return name.removeprefix("refs/heads/")

    def branch_tip(self, branch: str) -> str | None:
        """The commit branch `branch` points at now; None when it no longer exists."""
        ref = f"refs/heads/{branch}^{{commit}}"
        proc = _run(self.root, ("rev-parse", "--verify", "--quiet", ref), check=False)
        return _text(proc) if proc.returncode == 0 else None

    def commits_between(self, old: str, new: str) -> int:
        """How many commits `new` has that `old` does not."""
        return int(self.git("rev-list", "--count", f"{old}..{new}") or 0)

    def _exists(self, branch: str) -> BranchExists:
        return BranchExists(
            f"branch '{branch}' already exists in {self.root}; delete it or choose another name"
        )


def _is_link_or_not_dir(path: Path) -> bool:
    return path.is_symlink() or not path.is_dir()


def shadow_dir(worktree: Path) -> Path:
    """flow's private git directory for a checkout: beside it, never inside it.

    Its config, attributes and hooks are flow's (no filters, no conversions, no hooks), its
    objects are the user's repository's (read-only, through alternates), and the checkout
    is only its work tree. Whatever a model wrote into the checkout's own .git (config with
    a `filter.*.clean` program, hooks, an fsmonitor, a .git replaced by a link) is never read.
    """
    worktree = Path(worktree)
    return worktree.parent / f".{worktree.name}{_SHADOW_SUFFIX}"


def worktree_diff(worktree: Path, base_sha: str) -> bytes:
    """Everything in `worktree` that differs from base, as a binary patch; b"" if nothing.

    Read through flow's own index of the checkout (in `shadow_dir`, out of the model's
    reach): only files whose stat data changed are hashed again, not the whole tree.
    """
    env = _checkout_env(worktree)
    if not (shadow_dir(worktree) / "index").is_file():  # a checkout of an older flow
        _safe(worktree, ("read-tree", base_sha), env)
    _safe(worktree, ("add", "-A"), env)
    _drop_new_gitlinks(worktree, base_sha, env)
    return _safe(worktree, ("diff", "--cached", *_DIFF_OPTS, base_sha, "--"), env).stdout


def _safe(
    worktree: Path, args: tuple[str, ...], env: dict[str, str], input: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return _run(worktree, args, env=env, input=input, scrubbed=True, prefix=overlay.enter(worktree))


def _checkout_env(worktree: Path) -> dict[str, str]:
    """For flow's own git calls in a checkout a model touched: flow's git dir, its work tree."""
    shadow = shadow_dir(worktree)
    if not (shadow / "HEAD").is_file():
        raise WorkspaceError(f"{worktree}: not a checkout made by flow (no {shadow.name})")
    return {"GIT_DIR": str(shadow), "GIT_WORK_TREE": str(Path(worktree).resolve())}


def _drop_new_gitlinks(worktree: Path, base_sha: str, index: dict[str, str]) -> None:
    # A builder that ran `git init` in a subdirectory would otherwise hand us a submodule
    # entry pointing at a commit that exists nowhere but in its worktree.
    staged = _text(_safe(worktree, ("ls-files", "--stage", "-z"), index)).split("\0")
    links = [line.split("\t", 1)[1] for line in staged if line.startswith("160000 ")]
    if not links:
        return
    old = _text(_safe(worktree, ("ls-tree", "-r", "-z", base_sha), index)).split("\0")
    kept = {line.split("\t", 1)[1] for line in old if line.startswith("160000 ")}
    new = [p for p in links if p not in kept]
    if new:
        _safe(worktree, ("update-index", "--force-remove", "--", *new), index)


def apply_patch(worktree: Path, patch: bytes) -> None:
    """Apply a `worktree_diff` patch to the files of `worktree` (its index is left alone)."""
    if not patch.strip():
        return
    _safe(worktree, ("apply", *_APPLY_OPTS), _checkout_env(worktree), input=patch)


_HUNK = re.compile(rb"^@@ -\d+(?:,(\d+))? \+\d+(?:,(\d+))? @@")
_ESCAPES = {
    ord("n"): 10,
    ord("t"): 9,
    ord('"'): 34,
    ord("\\"): 92,
    ord("a"): 7,
    ord("b"): 8,
    ord("f"): 12,
    ord("r"): 13,
    ord("v"): 11,
}


def _unquote(raw: bytes) -> str:
    """A path as git prints it: C-quoted (with octal UTF-8 bytes) when unusual."""
    if not (raw.startswith(b'"') and raw.endswith(b'"') and len(raw) >= 2):
        return raw.decode("utf-8", "replace")
    body, out, i = raw[1:-1], bytearray(), 0
    while i < len(body):
        c = body[i]
        if c == 92 and i + 1 < len(body):
            nxt = body[i + 1]
            if 48 <= nxt <= 55:
                out.append(int(body[i + 1 : i + 4], 8))
                i += 4
                continue
            out.append(_ESCAPES.get(nxt, nxt))
            i += 2
            continue
        out.append(c)
        i += 1
    return out.decode("utf-8", "replace")


def _header_path(rest: bytes) -> str:
    """The path in `diff --git a/P b/P` (no renames, so both sides are the same)."""
    if rest.startswith(b'"'):
        end = 1
        while end < len(rest) and rest[end] != 34:
            end += 2 if rest[end] == 92 else 1
        return _unquote(rest[: end + 1]).removeprefix("a/")
    half = (len(rest) - 1) // 2
    return rest[:half].decode("utf-8", "replace").removeprefix("a/")


def diff_stats(patch: bytes) -> tuple[list[str], int, int]:
    """(files touched, lines added, lines removed); binary files are touched with 0 lines."""
    files: list[str] = []
    added = removed = old_left = new_left = 0
    for line in patch.split(b"\n"):
        if old_left > 0 or new_left > 0:
            tag = line[:1]
            if tag == b"+":
                added, new_left = added + 1, new_left - 1
            elif tag == b"-":
                removed, old_left = removed + 1, old_left - 1
            elif tag in (b" ", b""):
                old_left, new_left = old_left - 1, new_left - 1
            continue  # "\ No newline at end of file" counts for neither side
        if line.startswith(b"diff --git "):
            files.append(_header_path(line[len(b"diff --git ") :]))
        elif line.startswith(b"+++ ") and files and line[4:] != b"/dev/null":
            files[-1] = _unquote(line[4:].rstrip(b"\t")).removeprefix("b/")
        elif line.startswith(b"--- ") and files and line[4:] != b"/dev/null":
            files[-1] = _unquote(line[4:].rstrip(b"\t")).removeprefix("a/")
        elif m := _HUNK.match(line):
            old_left = int(m.group(1)) if m.group(1) is not None else 1
            new_left = int(m.group(2)) if m.group(2) is not None else 1
    return files, added, removed


def cache_root() -> Path:
    if explicit := os.environ.get("FLOW_CACHE_DIR"):
        return Path(explicit).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "flow"
    return Path.home() / ".cache" / "flow"


def worktree_dir(repo: Repo, run_id: str) -> Path:
    """Where a run's worktrees live: in the user's cache, never inside the repository."""
    if not run_id or "/" in run_id or "\\" in run_id or run_id in (".", ".."):
        raise WorkspaceError(f"run id '{run_id}' cannot name a directory")
    return cache_root() / "worktrees" / _digest(repo) / run_id


BASES = "bases"
"""Under the cache: the checkouts of base commits that overlay views lie over."""


def base_dir(repo: Repo, sha: str) -> Path:
    """Where the views of commit `sha` find their base (its `tree/`, flow's git dir, `done`)."""
    return cache_root() / BASES / _digest(repo) / sha


def _digest(repo: Repo) -> str:
    return hashlib.sha256(str(repo.root).encode()).hexdigest()[:12]


def remove_run_worktrees(repo: Repo, run_id: str) -> int:
    """Remove every checkout of the run; returns how many there were."""
    top = worktree_dir(repo, run_id).resolve()
    overlay.unmount_under(top)
    legacy = repo._legacy_worktrees(top)
    # Entries are removed as named, never resolved: a symlink goes, not what it points at.
    found = {top / p.resolve().relative_to(top) for p in legacy}
    if top.is_dir():
        found.update(top.iterdir())
    for path in found:
        _remove_tree(path)
    if legacy:
        repo.git("worktree", "prune", check=False)
    if top.is_dir() and not any(top.iterdir()):
        top.rmdir()
    kept = (_SHADOW_SUFFIX, overlay.STATE_DIR)
    return sum(1 for p in found if not p.name.endswith(kept))


def _remove_tree(path: Path) -> None:
    """Delete `path`, even a tree a builder made unreadable; a symlink itself, never its target."""
    if path.is_dir() and not path.is_symlink():
        try:
            shutil.rmtree(path)
        except OSError:
            _open_up(path)
            shutil.rmtree(path, ignore_errors=True)  # callers clean up in `finally`: no raising
    elif path.is_symlink() or path.exists():
        with contextlib.suppress(OSError):
            path.unlink()


def _open_up(top: Path) -> None:
    """chmod u+rwx every directory under `top` (symlinks are not followed)."""
    stack = [top]
    while stack:
        path = stack.pop()
        with contextlib.suppress(OSError):
            path.chmod(path.stat().st_mode | stat.S_IRWXU)
            stack.extend(p for p in path.iterdir() if p.is_dir() and not p.is_symlink())


def flow_dir(repo: Repo) -> Path:
    """<repo>/.flow, created and excluded from git; a clear error when it cannot be written."""
    path = repo.root / ".flow"
    try:
        path.mkdir(exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise WorkspaceError(
            f"{path}: not writable ({err.strerror}); fix its permissions"
        ) from None
    repo.ensure_excluded(".flow/")
    return path
