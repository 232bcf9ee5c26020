"""Shell commands for builders and checks: own process group, timeout, capped output.

Builder commands can also be cut off from the network: each runs in a fresh, empty network
namespace (`unshare --net`), inside a user namespace where the machine allows one. In a user
namespace the command also cannot re-enter flow's namespace (setns) or read flow's memory
and environment through /proc; a plain `unshare --net` as root prevents neither.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Collection, Mapping
from pathlib import Path

from pydantic import BaseModel

from orchestrator import overlay, pools
from orchestrator.redact import secret_name
from orchestrator.workspace import GIT_REDIRECTS

_KEPT_ENV = frozenset(
    ("PATH", "HOME", "LANG", "TERM", "TMPDIR", "TZ", "USER", "LOGNAME", "SHELL", "VIRTUAL_ENV")
)
_TERM_GRACE_S = 2.0
"""How long a timed-out command gets to exit after SIGTERM before the group is SIGKILLed."""
_DRAIN_S = 1.0
"""How long to wait for the pipe to close once the group is dead."""
_NETNS_FLAGS = (("--net", "--map-root-user"), ("--net",))
"""`unshare` flags in order of preference; the second works for root only."""
_PROBE_TIMEOUT_S = 10.0


class CommandResult(BaseModel):
    """What a shell command did."""

    command: str
    """The command line as given to /bin/sh -c."""
    exit_code: int | None
    """The shell's exit status; negative for a signal; None when it timed out."""
    timed_out: bool
    duration_s: float
    output: str
    """stdout and stderr interleaved, UTF-8 with replacement, head and tail kept within the cap."""


def flow_venv() -> Path | None:
    """The virtualenv flow itself runs from (None when it runs from a base interpreter)."""
    if sys.prefix == sys.base_prefix:
        return None
    return Path(sys.prefix)


def without_flow_venv(env: dict[str, str], project: Path | None = None) -> dict[str, str]:
    """`env` less flow's own virtualenv (its bin directory on PATH, VIRTUAL_ENV naming it),
    so a project's commands run under the project's python, not flow's. A virtualenv inside
    the project is the project's own and is kept."""
    venv = flow_venv()
    if venv is None:
        return env
    venv = venv.resolve()
    if project is not None and venv.is_relative_to(project.resolve()):
        return env
    out = dict(env)
    if "VIRTUAL_ENV" in out and _same(out["VIRTUAL_ENV"], venv):
        del out["VIRTUAL_ENV"]
    if "PATH" in out:
        kept = [d for d in out["PATH"].split(os.pathsep) if not d or not _same(d, venv / "bin")]
        out["PATH"] = os.pathsep.join(kept)
    return out


def _same(path: str, other: Path) -> bool:
    try:
        return Path(path).resolve() == other
    except (OSError, RuntimeError):
        return False


def sandbox_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """An allowlisted copy of os.environ: never API keys or tokens, nor flow's own
    virtualenv. `extra` is trusted as is."""
    env = without_flow_venv(
        {
            k: v
            for k, v in os.environ.items()
            if (k in _KEPT_ENV or k.startswith("LC_")) and not secret_name(k)
        }
    )
    env.update(GIT_TERMINAL_PROMPT="0", PYTHONDONTWRITEBYTECODE="1", CI="1")
    env.update(extra or {})
    return env


def checks_env(
    hidden: Collection[str] = (),
    hidden_values: Collection[str] = (),
    allowed: Collection[str] = (),
    environ: Mapping[str, str] | None = None,
    project: Path | None = None,
) -> dict[str, str]:
    """The environment of the spec's checks: the user's own, less what could hand out a key
    and less flow's own virtualenv (`without_flow_venv`; `project` is the repository).

    Dropped: variables whose names say they are secrets (`secret_name`) unless `allowed`
    names them, the variables in `hidden` (those agents.yaml reads model keys from) and any
    variable whose value is one of `hidden_values` (the keys themselves, under any name),
    and git's repository redirections. Unlike `sandbox_env` this is not an allowlist:
    PYTHONPATH, JAVA_HOME, DATABASE_URL and the like are what test suites need.
    """
    source = os.environ if environ is None else environ
    hidden, keys, allowed = set(hidden), set(hidden_values), set(allowed)
    env = {
        k: v
        for k, v in source.items()
        if k not in hidden
        and k not in GIT_REDIRECTS
        and v not in keys
        and (k in allowed or not secret_name(k))
    }
    env = without_flow_venv(env, project)
    env["GIT_TERMINAL_PROMPT"] = "0"
    env.setdefault("CI", "1")
    env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    return env


@functools.cache
def network_isolation() -> str | None:
    """The command prefix that starts a program in a new network namespace; None if impossible.

    Probed once per process by running a trivial command under each candidate.
    """
    return _probe(_NETNS_FLAGS)


@functools.cache
def user_isolation() -> str | None:
    """The prefix that starts a program in a new user namespace as the same uid and gid, the
    network kept; None if impossible.

    For the spec's checks: they run the candidate's code and need the network and the user's
    own identity (`initdb` refuses root, files they create must be the user's), but must not
    read flow's environment (API keys) or memory through /proc, which a process in a child
    user namespace cannot, whatever its uid.
    """
    me = f'test "$(id -u):$(id -g)" = "{os.getuid()}:{os.getgid()}"'
    return _probe((("--user", "--map-current-user"),), script=me)


def _probe(flag_sets: tuple[tuple[str, ...], ...], script: str = "exit 0") -> str | None:
    """The first prefix under which `script` (a /bin/sh script) succeeds."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    for flags in flag_sets:
        prefix = [unshare, *flags]
        try:
            probe = subprocess.run(
                [*prefix, "/bin/sh", "-c", script],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                env=sandbox_env(),
                timeout=_PROBE_TIMEOUT_S,
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return shlex.join(prefix)
    return None


@functools.cache
def _ip_command() -> str | None:
    return shutil.which(
        "ip", path=os.pathsep.join((os.environ.get("PATH", ""), "/usr/sbin", "/sbin"))
    )


def describe_isolation() -> str:
    """One sentence: what builder commands can and cannot reach on this machine."""
    mode = network_isolation()
    rest = (
        "they can still read and write every file (and Unix socket) the user running flow "
        "can. The spec's checks keep the network and run as you, with your environment less "
        "keys, tokens and passwords, in a user namespace of their own (where the machine "
        "allows one), so they cannot read flow's environment either."
    )
    if mode is None:
        return (
            "Builder commands have the network of the user running flow, because this machine "
            f"allows no new network namespace (`unshare --net` failed); {rest}"
        )
    loopback = "a loopback of their own" if _ip_command() else "no network interface at all"
    if "--map-root-user" in mode:
        return (
            f"Builder commands run in a fresh network namespace inside a user namespace "
            f"(`{mode}`), with {loopback}, so they reach no host, not even the machine's own "
            f"127.0.0.1, and cannot read flow's environment or memory; {rest}"
        )
    return (
        f"Builder commands run in a fresh network namespace (`{mode}`; no user namespace "
        f"here), with {loopback}, so they reach no host, not even the machine's own "
        f"127.0.0.1, though a command running as root could deliberately rejoin the host's "
        f"network with nsenter and can read flow's environment through /proc; {rest}"
    )


def _argv(command: str, isolation: str | None, *, loopback: bool) -> list[str]:
    """/bin/sh -c command, under the `isolation` prefix (namespaces) when one is given."""
    if isolation is None:
        return ["/bin/sh", "-c", command]
    ip = _ip_command()
    if ip is None or not loopback:
        return [*shlex.split(isolation), "/bin/sh", "-c", command]
    # A loopback of its own lets a command talk to servers it started itself; it reaches
    # nothing outside the namespace. The exec keeps the shell's pid, so the group is the same.
    up = f'{shlex.quote(ip)} link set lo up 2>/dev/null; exec /bin/sh -c "$1"'
    return [*shlex.split(isolation), "/bin/sh", "-c", up, "/bin/sh", command]


class _CappedOutput:
    """Keeps the first and last bytes of a stream, at most `cap` in all."""

    def __init__(self, cap: int) -> None:
        self.head_cap = max(cap, 0) // 2
        self.tail_cap = max(cap, 0) - self.head_cap
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.head_cap - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        self.tail += chunk
        if len(self.tail) > self.tail_cap:
            del self.tail[: len(self.tail) - self.tail_cap]

    def text(self) -> str:
        omitted = self.total - len(self.head) - len(self.tail)
        if omitted <= 0:
            return (self.head + self.tail).decode("utf-8", "replace")
        marker = f"\n[… {omitted} bytes omitted …]\n"
        return self.head.decode("utf-8", "replace") + marker + self.tail.decode("utf-8", "replace")


class _Collector(asyncio.SubprocessProtocol):
    """Feeds output to the cap and marks the two ends: the shell's exit and the pipe's close.

    asyncio's own `Process.wait()` returns only once every pipe is closed, so a background
    child that keeps stdout open would hide the shell's exit until the timeout.
    """

    def __init__(self, out: _CappedOutput) -> None:
        loop = asyncio.get_running_loop()
        self.out = out
        self.exited: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        self.out.add(data if isinstance(data, bytes) else data.encode())

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    # ESRCH: the group is already gone. EPERM: only left are members that changed uid.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def _finish(transport: asyncio.SubprocessTransport, proto: _Collector) -> None:
    """Kill whatever is left of the group, then collect the output still in the pipe."""
    _signal_group(transport.get_pid(), signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        # Bounded: a process that left the group with setsid could hold the pipe forever.
        await asyncio.wait_for(asyncio.shield(proto.closed), _DRAIN_S)
    transport.close()


async def run_shell(
    command: str,
    cwd: Path,
    *,
    timeout_s: float,
    output_cap: int,
    env: dict[str, str] | None = None,
    isolate_network: bool = False,
    isolate_user: bool = False,
    confine: list[str] | None = None,
) -> CommandResult:
    """Run `command` with /bin/sh in `cwd`; the whole process group dies when it ends.

    `isolate_network` runs it in a new network namespace where this machine allows one
    (see `network_isolation`), silently without where not. Builders' commands ask for it;
    the spec's checks ask for `isolate_user` instead: the user's own commands, with the
    network, but unable to read flow's environment (API keys) or memory. `confine` is a
    prefix from `sandbox.confined` (bubblewrap), which then replaces both.
    """
    started = time.monotonic()
    if confine is not None:
        isolation = None
    elif isolate_network:
        isolation = await pools.work(network_isolation)
    elif isolate_user:
        isolation = await pools.work(user_isolation)
    else:
        isolation = None
    out = _CappedOutput(output_cap)
    proto = _Collector(out)
    spawn = asyncio.ensure_future(
        asyncio.get_running_loop().subprocess_exec(
            lambda: proto,
            *overlay.enter(cwd),
            *(
                [*confine, "/bin/sh", "-c", command]
                if confine is not None
                else _argv(command, isolation, loopback=isolate_network)
            ),
            cwd=cwd,
            env=sandbox_env() if env is None else env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    )
    try:
        transport, _ = await asyncio.shield(spawn)
    except asyncio.CancelledError:
        # Cancelled mid-spawn: the shell may have started children already.
        with contextlib.suppress(Exception):
            await _finish((await spawn)[0], proto)
        raise
    except OSError as exc:  # a missing cwd, say: reported like the shell would, as 126
        out.add(f"flow: cannot start /bin/sh in {cwd}: {exc}\n".encode())
        return _result(command, 126, False, started, out)
    timed_out = False
    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.shield(proto.exited)
    except TimeoutError:
        timed_out = True
        _signal_group(transport.get_pid(), signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(proto.exited), _TERM_GRACE_S)
    finally:
        # After a normal exit too: background children would hold the pipe and the CPU.
        await _finish(transport, proto)
    return _result(
        command, None if timed_out else transport.get_returncode(), timed_out, started, out
    )


def _result(
    command: str, code: int | None, timed_out: bool, started: float, out: _CappedOutput
) -> CommandResult:
    return CommandResult(
        command=command,
        exit_code=code,
        timed_out=timed_out,
        duration_s=time.monotonic() - started,
        output=out.text(),
    )
