"""The one way to run a model-chosen command confined: bubblewrap, files and network.

Under bubblewrap (`bwrap`, the sandbox Flatpak is built on) a builder's command sees the
machine read-only, with its own checkout and a private /tmp writable; the user's HOME (so
~/.ssh, ~/.config, ~/.aws), other homes, flow's cache (its sibling checkouts and their git
directories) and the user's repository are not there at all, except the repository's object
store, read-only, which the checkout borrows through git alternates. It has no network but a
loopback of its own, and a pid namespace of its own: when the command ends, every process it
started (daemons and `setsid` children included) ends with it.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

from orchestrator import overlay
from orchestrator.proc import sandbox_env

PRIVATE_HOME = "/tmp/home"
"""HOME inside the sandbox: an empty directory on its private /tmp."""
_PROBE = ("--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "--dev", "/dev")
_PROBE_TIMEOUT_S = 10.0


@functools.cache
def bwrap() -> str | None:
    """The bubblewrap binary, when it is installed and can make namespaces here."""
    found = shutil.which("bwrap")
    if found is None:
        return None
    try:
        probe = subprocess.run(
            [found, *_PROBE, "--proc", "/proc", "/bin/sh", "-c", "exit 0"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=sandbox_env(),
            timeout=_PROBE_TIMEOUT_S,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return found if probe.returncode == 0 else None


def describe() -> str:
    """One line for `flow validate` and a run's first lines: what builder commands reach, and
    how checkouts are made."""
    if bwrap() is not None:
        return (
            "Builder commands run under bubblewrap: no network, their own processes only, the "
            "file system read-only except their checkout and a private /tmp, and no HOME, "
            "cache or repository of yours in sight. " + overlay.describe()
        )
    return (
        "bubblewrap is not usable here (install it: apt-get install bubblewrap), so builder "
        "commands are cut off from the network only and can read and write every file you can, "
        "and agent CLIs run unconfined (set `sandbox: required` to refuse that). "
        + overlay.describe()
    )


_SECRET_DIRS = (
    ".ssh",
    ".config",
    ".aws",
    ".azure",
    ".gnupg",
    ".docker",
    ".kube",
    ".password-store",
    ".cache",
    ".local/share/keyrings",
    ".mozilla",
    ".thunderbird",
)
_SECRET_FILES = (
    ".netrc",
    ".git-credentials",
    ".gitconfig",
    ".npmrc",
    ".pypirc",
    ".bash_history",
    ".zsh_history",
    ".python_history",
    ".lesshst",
    ".viminfo",
)


def _hidden(checkout: Path, objects: Path | None) -> tuple[list[Path], list[Path]]:
    """(directories, files) that must not be visible: the secret parts of HOME (HOME itself
    stays readable: interpreters and virtualenvs often live there), flow's cache with its
    sibling checkouts, and the user's repository with its .flow/."""
    from orchestrator.workspace import cache_root

    home = Path(os.path.expanduser("~"))
    dirs = [home / d for d in _SECRET_DIRS] + [cache_root()]
    if objects is not None:
        git_dir = objects.parent
        dirs.append(git_dir.parent if git_dir.name == ".git" else git_dir)
    files = [home / f for f in _SECRET_FILES]
    keep = [p.resolve() for p in dirs if p.is_dir() and not p.is_symlink()]
    keep = [p for p in keep if p not in (Path("/"), checkout)]
    shown = [p.resolve() for p in files if p.is_file()]
    return sorted(set(keep), key=lambda p: len(p.parts)), sorted(set(shown))


def confined(
    checkout: Path,
    objects: Path | None,
    *,
    home: Path | None = None,
    readable: tuple[Path, ...] = (),
    network: bool = False,
    mounts: tuple[tuple[Path, Path], ...] = (),
) -> list[str]:
    """The prefix that runs a program under bubblewrap in `checkout`; requires `bwrap()`.

    `home`: a private HOME (an agent CLI's, with its config) bound writable in place of the
    empty one; `readable`: more paths shown read-only (a proxy's socket directory);
    `network`: keep the machine's network (only for a CLI on its user's own login);
    `mounts`: (source, target) bound writable (that CLI's login files, into its HOME).
    """
    binary = bwrap()
    assert binary is not None, "call confined() only where bwrap() found bubblewrap"
    checkout = checkout.resolve()
    args = [binary, "--unshare-all", "--die-with-parent", "--new-session"]
    if network:
        args.append("--share-net")
    args += ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    dirs, files = _hidden(checkout, objects)
    for path in dirs:
        if path != Path("/tmp") and not path.is_relative_to("/tmp"):  # /tmp is fresh already
            args += ["--tmpfs", str(path)]
    for path in files:
        if not path.is_relative_to("/tmp"):
            args += ["--ro-bind", "/dev/null", str(path)]
    args += ["--bind", str(checkout), str(checkout)]
    if objects is not None and objects.is_dir():
        args += ["--ro-bind", str(objects.resolve()), str(objects.resolve())]
    for path in readable:
        args += ["--ro-bind", str(path.resolve()), str(path.resolve())]
    if home is None:
        args += [
            "--dir",
            PRIVATE_HOME,
            "--setenv",
            "HOME",
            PRIVATE_HOME,
            "--setenv",
            "TMPDIR",
            "/tmp",
        ]
    else:
        home = home.resolve()
        args += ["--bind", str(home), str(home), "--setenv", "HOME", str(home)]
    for source, target in mounts:
        args += ["--bind", str(source), str(target)]
    return [*args, "--chdir", str(checkout)]


def borrowed_objects(checkout: Path) -> Path | None:
    """The user's object store a flow checkout borrows, as flow itself recorded it.

    Read from flow's own git directory beside the checkout, which the sandbox cannot write,
    never from the checkout's alternates file, which the builder can.
    """
    from orchestrator.workspace import shadow_dir

    alternates = shadow_dir(checkout) / "objects" / "info" / "alternates"
    try:
        first = alternates.read_text(encoding="utf-8").splitlines()[0].strip()
    except (OSError, IndexError):
        return None
    return Path(first) if first else None
