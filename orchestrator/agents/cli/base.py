"""Running one agent CLI against its proxy: private HOME, stdin closed, a wall-clock limit.

The CLI's environment is built from nothing but PATH, its private directories and the
proxy's throwaway token, so no provider key (nor anything else of flow's) reaches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from orchestrator import overlay, sandbox
from orchestrator.agent_status import CLI_PATH_ENV
from orchestrator.agent_status import find as find  # the CLI files find their command here
from orchestrator.proxy import Proxy, bridge


@dataclass
class Launch:
    """What one CLI needs: its argv and the environment and files it reads."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    """Paths relative to the private HOME, and their contents."""


class AgentCli(Protocol):
    name: str
    dialect: str
    droppings: tuple[str, ...]
    login_files: tuple[str, ...]
    """Paths under the user's HOME that hold the CLI's own login (for `login: true`)."""

    def launch(
        self, task: str, proxy: Proxy, model_id: str, checkout: Path, home: Path
    ) -> Launch: ...

    def failed(self, events: list[dict[str, object]]) -> str | None:
        """The CLI's own word that the run failed, from its JSON events; None when not."""
        ...

    def login_launch(self, task: str, model_id: str, checkout: Path, home: Path) -> Launch | None:
        """The build on the user's own login (no proxy); None when the CLI has no login."""
        ...

    def review(
        self,
        task: str,
        proxy: Proxy,
        model_id: str,
        checkout: Path,
        home: Path,
        schema: dict[str, object],
    ) -> Launch | None:
        """A read-only run that answers with JSON matching `schema` (the CLI's structured
        output); None when this CLI cannot review."""
        ...

    def review_result(self, events: list[dict[str, object]], stdout: bytes) -> object | None:
        """The structured review the CLI returned (a dict to validate), None when none."""
        ...

    def self_reported(self, events: list[dict[str, object]]) -> tuple[int, int, float] | None:
        """(prompt tokens, completion tokens, USD) as the CLI itself reports them: used only
        with `login: true`, where no proxy meters the calls."""
        ...


@dataclass
class CliRun:
    exit_code: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    refused: bool = False


def base_env(home: Path, environ: dict[str, str] | None = None) -> dict[str, str]:
    env = os.environ if environ is None else environ
    path = os.pathsep.join(p for p in (env.get(CLI_PATH_ENV, ""), env.get("PATH", "")) if p)
    return {
        "PATH": path,
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local/share"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_STATE_HOME": str(home / ".local/state"),
        "TMPDIR": str(home / "tmp"),
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "NO_COLOR": "1",
        "CI": "1",
    }


def confined_argv(
    launch: Launch, checkout: Path, home: Path, proxy: Proxy | None, login: tuple[Path, ...] = ()
) -> list[str]:
    """The CLI under bubblewrap: its checkout and private HOME writable, the rest of the
    machine read-only (HOME's secrets, flow's cache and the user's repository hidden), and no
    network but its own loopback, where the bridge forwards the proxy's port to the proxy's
    Unix socket. On the user's own login (no proxy) the CLI keeps the network and its login
    files. Without bubblewrap (`sandbox: auto`) the CLI runs unconfined."""
    if sandbox.bwrap() is None:
        return launch.argv
    user_home = Path(os.path.expanduser("~"))
    prefix = sandbox.confined(
        checkout,
        sandbox.borrowed_objects(checkout),
        home=home,
        readable=(Path(bridge.__file__).parent, Path(sys.base_prefix).resolve())
        + ((proxy.socket_path.parent,) if proxy is not None else ()),
        network=proxy is None,
        mounts=tuple((user_home / rel, home / rel) for rel in login),
    )
    prefix += ["--setenv", "TMPDIR", str(home / "tmp")]
    if proxy is None:
        return [*prefix, *launch.argv]
    relay = [_interpreter(), "-I", bridge.__file__, str(proxy.socket_path), str(proxy.port), "--"]
    return [*prefix, *relay, *launch.argv]


def _interpreter() -> str:
    """The Python that runs the bridge (standard library only): the base interpreter, not the
    virtualenv's link to it, since a virtualenv under /tmp or a hidden directory is not in the
    sandbox's view; its prefix is shown read-only."""
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    return str(base) if base.is_file() else os.path.realpath(sys.executable)


def _login_files(cli: AgentCli | None, home: Path) -> tuple[Path, ...]:
    """The CLI's login files of the user's HOME that exist; linked into the private HOME
    when there is no sandbox to bind them."""
    if cli is None:
        return ()
    user_home = Path(os.path.expanduser("~"))
    found = tuple(Path(rel) for rel in cli.login_files if (user_home / rel).exists())
    for rel in found:
        target = home / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if sandbox.bwrap() is None:
            target.symlink_to(user_home / rel)
        elif (user_home / rel).is_dir():
            target.mkdir(exist_ok=True)
        else:
            target.touch()
    return found


async def run_cli(
    launch: Launch,
    checkout: Path,
    home: Path,
    proxy: Proxy | None,
    *,
    timeout_s: float,
    cli: AgentCli | None = None,
) -> CliRun:
    """Run to the end, the time limit, or the proxy's budget refusal (then it is ended).
    `proxy` None: the CLI runs on its user's own login (`cli.login_files`)."""
    for rel, text in launch.files.items():
        target = home / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    login = _login_files(cli, home) if proxy is None else ()
    argv = await asyncio.to_thread(confined_argv, launch, checkout, home, proxy, login)
    proc = await asyncio.create_subprocess_exec(
        *overlay.enter(checkout),
        *argv,
        cwd=checkout,
        env=launch.env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    talk = asyncio.ensure_future(proc.communicate())
    refused_flag = proxy.refused if proxy is not None else threading.Event()
    refused = asyncio.ensure_future(asyncio.to_thread(refused_flag.wait, timeout_s))
    done, _ = await asyncio.wait({talk, refused}, timeout=timeout_s, return_when="FIRST_COMPLETED")
    stopped_by_cap = talk not in done and refused_flag.is_set()
    timed_out = talk not in done and not stopped_by_cap
    if talk not in done:
        _kill_group(proc.pid)
    out, err = await talk
    refused_flag.set()  # lets the waiting thread end
    await refused
    return CliRun(proc.returncode, out, err, timed_out=timed_out, refused=stopped_by_cap)


def _kill_group(pid: int) -> None:
    # The whole session: CLIs start helpers (language servers, shells) of their own.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
