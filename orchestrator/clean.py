"""`flow clean`: old runs' files, dead checkouts and demo directories; never a ref, never a
run that is still going.

A run is going while its record says `running` and the process it names is alive (the
store's pid; a pid the system reused counts as alive, so doubt keeps files). Interrupted
runs keep their files (they can be resumed); their checkouts are made anew on resume.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator import overlay
from orchestrator.errors import FlowError
from orchestrator.store import Store
from orchestrator.workspace import (
    _SHADOW_SUFFIX,
    BASES,
    Repo,
    _remove_tree,
    cache_root,
    worktree_dir,
)

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT = {"": 86400, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
UNKNOWN_OWNER_S = 600.0
"""A checkout whose repository cannot be told (or an empty directory a run may be about to
fill) is left while it changed this recently."""


def parse_age(text: str) -> float:
    """`7d`, `12h`, `30m`, `2w`, `90s` or a bare number of days, in seconds."""
    m = _AGE.match(text)
    if not m:
        raise FlowError(
            f"--older-than {text!r}: give a number and a unit, e.g. 7d, 12h, 30m (0 for all)"
        )
    return float(m.group(1)) * _UNIT[m.group(2)]


@dataclass
class Found:
    path: Path
    what: str
    """What it is, for the user: `run 2026… (applied)`, `checkout of …`, `demo`."""
    age_s: float
    size: int


@dataclass
class Cleanup:
    removable: list[Found] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    """Why things that matched were left: running, resumable, too recent."""


@dataclass
class _Runs:
    """Which run and batch ids of one repository are going, resumable, or when they ended."""

    going: set[str] = field(default_factory=set)
    resumable: set[str] = field(default_factory=set)
    ended: dict[str, float] = field(default_factory=dict)
    unreadable: str | None = None
    """Why its records could not be read (then nothing of it is removed)."""

    @classmethod
    def of(cls, root: Path) -> _Runs:
        runs = cls()
        db = root / ".flow" / "ledger.sqlite"
        if not db.is_file():
            return runs
        try:
            store = Store(db)
        except (sqlite3.Error, OSError, FlowError) as err:
            runs.unreadable = f"{db}: cannot be read ({err})"
            return runs
        try:
            records = [
                (r.run_id, r.live_status, r.finished or r.started) for r in store.runs(10**9)
            ]
            records += [
                (b.batch_id, b.live_status, b.finished or b.started) for b in store.batches(10**9)
            ]
        except sqlite3.Error as err:
            runs.unreadable = f"{db}: cannot be read ({err})"
            return runs
        finally:
            store.close()
        for name, status, when in records:
            if status == "running":
                runs.going.add(name)
            elif status == "interrupted":
                runs.resumable.add(name)
            runs.ended[name] = when
        return runs


def age_text(seconds: float) -> str:
    """An age in the largest unit that keeps it whole-ish: 9d, 5h, 12m, 40s."""
    for unit in ("w", "d", "h", "m"):
        if seconds >= _UNIT[unit] * (2 if unit == "w" else 1):
            return f"{seconds / _UNIT[unit]:.0f}{unit}"
    return f"{seconds:.0f}s"


def _size(path: Path) -> int:
    total = 0
    stack = [path]
    while stack:
        p = stack.pop()
        try:
            st = p.lstat()
        except OSError:
            continue
        total += st.st_size
        if p.is_dir() and not p.is_symlink():
            with contextlib.suppress(OSError):
                stack.extend(p.iterdir())
    return total


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except OSError:
        return 0.0


def _run_files(root: Path, runs: _Runs, cutoff: float, now: float, out: Cleanup) -> None:
    top = root / ".flow" / "runs"
    if not top.is_dir() or top.is_symlink():
        return
    if runs.unreadable:
        out.kept.append(f"{top}: {runs.unreadable}")
        return
    for entry in sorted(top.iterdir()):
        name = entry.name
        if name in runs.going:
            out.kept.append(f"{entry}: run {name} is still going")
            continue
        if name in runs.resumable:
            out.kept.append(f"{entry}: run {name} was interrupted; `flow resume {name}`")
            continue
        when = runs.ended.get(name, _mtime(entry))
        if when > cutoff:
            continue
        out.removable.append(Found(entry, f"files of run {name}", now - when, _size(entry)))


def _owner(run_dir: Path) -> Path | None:
    """The repository a run's checkouts were made from, read from a shadow's alternates."""
    for shadow in run_dir.glob(f".*{_SHADOW_SUFFIX}"):
        try:
            line = (shadow / "objects" / "info" / "alternates").read_text().strip()
        except OSError:
            continue
        objects = Path(line.splitlines()[0]) if line else None
        if objects is not None and objects.parent.name == ".git":
            return objects.parent.parent
    return None


def _checkouts(repo: Repo | None, cutoff: float, now: float, out: Cleanup) -> None:
    top = cache_root() / "worktrees"
    if not top.is_dir():
        return
    known: dict[Path, _Runs] = {}
    for digest_dir in sorted(p for p in top.iterdir() if p.is_dir() and not p.is_symlink()):
        entries = sorted(digest_dir.iterdir())
        if not entries and _mtime(digest_dir) <= min(cutoff, now - UNKNOWN_OWNER_S):
            out.removable.append(
                Found(digest_dir, "an empty checkouts directory", now - _mtime(digest_dir), 0)
            )
        for run_dir in entries:
            owner = _owner(run_dir)
            if owner is None and repo is not None and worktree_dir(repo, run_dir.name) == run_dir:
                owner = repo.root
            runs = _Runs()
            if owner is not None and owner.is_dir():
                runs = known.setdefault(owner, _Runs.of(owner))
            if run_dir.name in runs.going or runs.unreadable:
                out.kept.append(f"{run_dir}: {runs.unreadable or 'its run is still going'}")
                continue
            when = _mtime(run_dir)
            if when > min(cutoff, now - UNKNOWN_OWNER_S if owner is None else now):
                continue  # a checkout being made has no shadow yet to say whose it is
            where = f"{owner}" if owner is not None and owner.is_dir() else "a repository now gone"
            out.removable.append(
                Found(run_dir, f"checkouts of run {run_dir.name} ({where})", now - when, 0)
            )


def _bases(cutoff: float, now: float, out: Cleanup) -> None:
    """Checkouts of base commits that overlay views lie over, which no process holds."""
    top = cache_root() / BASES
    if not top.is_dir():
        return
    for digest_dir in sorted(p for p in top.iterdir() if p.is_dir() and not p.is_symlink()):
        for base in sorted(p for p in digest_dir.iterdir() if p.is_dir() and not p.is_symlink()):
            if overlay.in_use(base.with_name(f"{base.name}.lock")):
                out.kept.append(f"{base}: a run is using this base")
                continue
            when = _mtime(base / "done") or _mtime(base)
            if when > cutoff:
                continue
            what = f"the base checkout of {base.name[:12]} that views lie over"
            out.removable.append(Found(base, what, now - when, 0))


def _demos(cutoff: float, now: float, out: Cleanup) -> None:
    temp = Path(tempfile.gettempdir())
    for root in sorted(temp.glob("flow-demo-*")):
        if root.is_symlink() or not (root / "repo").is_dir() or not (root / "spec.md").is_file():
            continue  # not a directory `flow demo` made
        runs = _Runs.of(root / "repo")
        if runs.going:
            out.kept.append(f"{root}: a demo still running")
            continue
        when = max([_mtime(root), *runs.ended.values()])
        if when > cutoff:
            continue
        out.removable.append(Found(root, "demo directory", now - when, _size(root)))


def find(repo: Repo | None, older_than_s: float, now: float | None = None) -> Cleanup:
    """What `flow clean` would remove (and what it keeps, and why)."""
    now = time.time() if now is None else now
    cutoff = now - older_than_s
    out = Cleanup()
    if repo is not None:
        _run_files(repo.root, _Runs.of(repo.root), cutoff, now, out)
    _checkouts(repo, cutoff, now, out)
    _bases(cutoff, now, out)
    _demos(cutoff, now, out)
    for found in out.removable:
        if not found.size:
            found.size = _size(found.path)
    return out


def remove(found: Found) -> None:
    """Delete one thing `find` found; a symlink itself, never what it points at."""
    _remove_tree(found.path)
    parent = found.path.parent
    if parent.parent == cache_root() / "worktrees" and not any(parent.iterdir()):
        parent.rmdir()  # the repository's last run: its digest directory goes too
