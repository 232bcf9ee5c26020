"""Checkouts as overlays: one read-only base per run, each candidate's view costs its changes.

A base commit is checked out once per repository (`workspace.base_dir`, in flow's cache) and
kept for the next run on the same commit; a process using it holds a shared lock on it (`hold`)
so that no other process deletes it. A candidate's checkout is an overlayfs over it, mounted
inside an unprivileged user + mount namespace that a small "holder" process keeps alive:
`unshare` running a shell that mounts the overlay, binds the base read-only over itself, then
blocks reading a pipe from flow. When flow exits, however it exits (kill -9 included), the pipe
closes, the holder ends, and the namespace and its mounts go with it; only directories are
left (upper directories under the run's checkouts, which the run's clean up or `flow clean`
removes).

The checkout keeps its name `P` (an empty directory on the host): inside the holder's
namespace the overlay is mounted on `P`. Programs (git, builder commands, agent CLIs, checks)
enter that namespace (`enter(P)`: an nsenter prefix) and see `P` as the candidate's files;
flow's own Python reads and writes them through `host(P)` = /proc/<holder>/root/P. Writes land
in the view's upper directory; the base is read-only in the namespace, and sandboxed programs
(bubblewrap) do not see flow's cache at all, so no builder reaches the base its siblings and
the checks see.

Where overlays do not work (an old kernel, user namespaces disabled, no overlayfs, no
`unshare`/`nsenter`) or `FLOW_CHECKOUTS=copy` is set, every checkout is a full copy as before.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MODE_ENV = "FLOW_CHECKOUTS"
"""`copy` forces a full checkout per candidate; `overlay` (or unset) uses overlays where they
work."""
STATE_DIR = ".overlay"
"""Under a run's checkout directory: its bases and the views' upper directories."""
_READY = b"ready\n"
_HOLDER_TIMEOUT_S = 30.0
_UNSAFE_IN_OPTIONS = (",", ":", "\\", "\n")
# $1 base, $2 upper, $3 work, $4 mount point, $5:$6 the user's uid:gid. mount(8) works only
# as root, so the mounts are made as root of a first user namespace; the base is bound
# read-only over itself after the overlay took its own reference to it. The holder then waits
# in a second user + mount namespace inside that one, as the user's own uid (files, git's stat
# data and the checks' identity are as outside), where those mounts are locked: nothing there
# can make the base writable again. It waits in the view's root, where programs entering its
# namespaces start.
_HOLDER = (
    "set -e\n"
    'mount -t overlay overlay -o "lowerdir=$1,upperdir=$2,workdir=$3,userxattr" "$4"\n'
    'mount --bind -o ro "$1" "$1"\n'
    'cd "$4"\n'
    'exec unshare --user --map-user="$5" --map-group="$6" --mount /bin/sh -c '
    "'echo ready; exec cat >/dev/null'\n"
)


@dataclass
class View:
    """One candidate's checkout: its overlay, mounted in its holder's namespace."""

    name: Path
    state: Path
    """Its upper (up/) and work (work/) directories."""
    holder: subprocess.Popen[bytes]

    @property
    def host(self) -> Path:
        return Path(f"/proc/{self.holder.pid}/root") / self.name.relative_to("/")


_views: dict[Path, View] = {}
_held: dict[Path, int] = {}
_closed: set[Path] = set()
_probed: list[str | None] = []
_probe_lock = threading.Lock()
_lock = threading.Lock()
_base_locks: dict[Path, threading.Lock] = {}


def mode() -> str:
    return "copy" if os.environ.get(MODE_ENV, "").strip().lower() == "copy" else "overlay"


def _probe() -> str | None:
    """Why overlays cannot be used in this process (None: they can). Probed once."""
    with _probe_lock:
        if not _probed:
            _probed.append(_try())
        return _probed[0]


def probe_soon() -> None:
    """Start the probe in the background (`flow validate` reads its answer last)."""
    threading.Thread(target=_probe, daemon=True).start()


def _try() -> str | None:
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    with tempfile.TemporaryDirectory(prefix="flow-overlay-probe-") as tmp:
        top = Path(tmp).resolve()
        base, mnt = top / "base", top / "view"
        base.mkdir()
        mnt.mkdir()
        (base / "file").write_bytes(b"base\n")
        try:
            view = _mount(base, top / "state", mnt)
        except OSError as err:
            return str(err)
        try:
            (view.host / "new").write_bytes(b"new\n")
            (view.host / "file").unlink()
            inside = subprocess.run(
                [*_enter_argv(view), "/bin/sh", "-c", "cat new; test ! -e file"],
                capture_output=True,
                timeout=_HOLDER_TIMEOUT_S,
            )
            if inside.stdout != b"new\n" or inside.returncode != 0:
                return "a view's files are not the same inside and outside its namespace"
            upper = view.state / "up"
            if (base / "file").read_bytes() != b"base\n" or not (upper / "new").is_file():
                return "writes to a view did not stay in its upper directory"
        except (OSError, subprocess.SubprocessError) as err:
            return f"a view cannot be used: {err}"
        finally:
            _stop(view)
    return None


def unavailable() -> str | None:
    """Why checkouts are full copies (None: they are overlays)."""
    if mode() == "copy":
        return f"{MODE_ENV}=copy"
    return _probe()


def describe() -> str:
    """One sentence: how candidates' checkouts are made (for the sandbox line)."""
    why = unavailable()
    if why is None:
        return "Checkouts are overlays over one read-only base per run."
    return f"Checkouts are full copies per candidate (overlays unusable: {why})."


def view_of(path: Path) -> View | None:
    """The view whose checkout is `path`, or None for a plain directory."""
    if not _views:
        return None
    with _lock:
        return _views.get(Path(os.path.realpath(path)))


def host(path: Path) -> Path:
    """Where flow's own Python reads and writes the checkout `path`."""
    view = view_of(path)
    return path if view is None else view.host


def enter(path: Path) -> list[str]:
    """The prefix that runs a program where `path` is the checkout's files ([] for a plain
    directory). The program starts in `path`."""
    view = view_of(path)
    return [] if view is None else _enter_argv(view)


def _enter_argv(view: View) -> list[str]:
    return [
        "nsenter",
        f"--target={view.holder.pid}",
        "--user",
        "--mount",
        "--preserve-credentials",
        "--wd",  # the holder's: the view's root (a named one is opened outside the namespace)
    ]


def state_dir(checkout: Path) -> Path:
    return Path(os.path.realpath(checkout)).parent / STATE_DIR


def base_lock(base: Path) -> threading.Lock:
    with _lock:
        return _base_locks.setdefault(base, threading.Lock())


def hold(lock: Path, ready: Callable[[], bool], make: Callable[[], None]) -> None:
    """Keep what `lock` guards in use (a shared lock on it) until this process ends, however
    it ends, making it first unless `ready()`; one process makes it at a time (an exclusive
    lock on a second file, `<lock>.make`, held only meanwhile). `in_use` is how `flow clean`
    and other runs tell; the lock files are never deleted."""
    with _lock:
        if lock in _held:
            return
    lock.parent.mkdir(parents=True, exist_ok=True)
    making = os.open(f"{lock}.make", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(making, fcntl.LOCK_EX)
        fcntl.flock(fd, fcntl.LOCK_SH)  # before making: nobody reclaims it meanwhile
        if not ready():
            make()
    except BaseException:
        os.close(fd)
        raise
    finally:
        os.close(making)
    with _lock:
        _held[lock] = fd


def in_use(lock: Path) -> bool:
    """Whether some process holds `lock` (see `hold`)."""
    return not _try_exclusive(lock, lambda: None)


def _try_exclusive(lock: Path, then: Callable[[], None]) -> bool:
    """Run `then` under `lock` exclusively if nobody holds it; False if somebody does."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        then()
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        then()
        return True
    finally:
        os.close(fd)


def reclaim(locks: list[tuple[Path, Path]]) -> threading.Thread:
    """Delete each (lock, directory) nobody holds, in the background: renamed at once, then
    removed file by file, so no run waits for it. A deletion cut short by flow's exit leaves a
    `.trash-*` directory that the next reclaim (or `flow clean`) removes."""

    def work() -> None:
        trash: list[Path] = []
        for lock, directory in locks:
            if directory.name.startswith(".trash-"):
                trash.append(directory)
                continue
            target = directory.with_name(f".trash-{directory.name}-{os.getpid()}")

            def move(src: Path = directory, dst: Path = target) -> None:
                with contextlib.suppress(OSError):
                    src.rename(dst)
                    trash.append(dst)

            _try_exclusive(lock, move)
        for path in trash:
            _wipe(path)

    thread = threading.Thread(target=work, name="flow-reclaim", daemon=True)
    thread.start()
    return thread


def mount(base: Path, name: Path) -> View:
    """A view of `base` at the checkout `name` (an empty directory, made here)."""
    name = Path(os.path.realpath(name))
    name.mkdir(parents=True, exist_ok=True)
    view = _mount(base, state_dir(name) / f"up-{name.name}", name)
    with _lock:
        ended = any(name.is_relative_to(top) for top in _closed)
        if not ended:
            _views[name] = view
    if ended:  # made in a thread that outlived its run's clean-up: nothing may be left
        _stop(view)
        raise OSError(f"{name}: its run has ended; its checkouts are removed")
    return view


def _mount(base: Path, state: Path, name: Path) -> View:
    paths = (base, state / "up", state / "work", name)
    if any(c in str(p) for p in paths for c in _UNSAFE_IN_OPTIONS):
        raise OSError(f"{name}: its path cannot be passed to overlayfs (',' ':' or '\\')")
    _wipe(state)
    for p in paths[1:3]:
        p.mkdir(parents=True)
    holder = subprocess.Popen(
        ["unshare", "--user", "--map-root-user", "--mount", "/bin/sh", "-c", _HOLDER, "sh"]
        + [str(p) for p in paths]
        + [str(os.getuid()), str(os.getgid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
    )
    assert holder.stdout is not None
    first = holder.stdout.readline()
    if first != _READY:
        holder.kill()
        _, err = holder.communicate(timeout=_HOLDER_TIMEOUT_S)
        lines = err.decode("utf-8", "replace").strip().splitlines()
        raise OSError(f"overlay mount failed: {lines[-1] if lines else 'no message'}")
    return View(name=name, state=state, holder=holder)


def unmount(name: Path) -> bool:
    """End the view at `name` (its mounts go with its holder) and delete its upper directory.
    False when `name` was no view."""
    name = Path(os.path.realpath(name))
    with _lock:
        view = _views.pop(name, None)
    if view is None:
        return False
    _stop(view)
    return True


def close_under(top: Path) -> None:
    """The run whose checkouts lie under `top` ends: end its views, and refuse new ones."""
    with _lock:
        _closed.add(Path(os.path.realpath(top)))
    unmount_under(top)


def unmount_under(top: Path) -> None:
    """End every view whose checkout lies under `top`."""
    top = Path(os.path.realpath(top))
    with _lock:
        names = [n for n in _views if n.is_relative_to(top)]
    for name in names:
        unmount(name)


def _stop(view: View) -> None:
    with contextlib.suppress(OSError):
        assert view.holder.stdin is not None
        view.holder.stdin.close()
    try:
        view.holder.wait(timeout=_HOLDER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        view.holder.kill()
        view.holder.wait()
    for pipe in (view.holder.stdout, view.holder.stderr):
        if pipe is not None:
            pipe.close()
    _wipe(view.state)


def _wipe(path: Path) -> None:
    from orchestrator.workspace import _remove_tree

    _remove_tree(path)
