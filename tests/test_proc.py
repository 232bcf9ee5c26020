"""run_shell and sandbox_env, with real /bin/sh processes."""

from __future__ import annotations

import asyncio
import os
import select
import shlex
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator import proc
from orchestrator.proc import describe_isolation, network_isolation, run_shell, sandbox_env

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


def alive(pid: int) -> bool:
    """True while `pid` runs; a zombie awaiting its reaper counts as dead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def dies(pid: int, within: float = 5.0) -> bool:
    """Whether `pid` ends within `within` seconds, waited for on a pidfd, not by polling.

    A SIGKILLed process closes its files (which is what run_shell waits for) a moment
    before /proc shows it as a zombie.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], within)[0]) or not alive(pid)
    finally:
        os.close(fd)


async def test_exit_codes_and_output(tmp_path: Path) -> None:
    ok = await run_shell("echo out; echo err >&2", tmp_path, timeout_s=30, output_cap=1000)
    assert (ok.exit_code, ok.timed_out, ok.output) == (0, False, "out\nerr\n")
    assert ok.command == "echo out; echo err >&2" and ok.duration_s >= 0
    failed = await run_shell("exit 3", tmp_path, timeout_s=30, output_cap=1000)
    assert failed.exit_code == 3


async def test_command_not_found_is_127_with_the_shells_message(tmp_path: Path) -> None:
    res = await run_shell("no-such-command-xyz", tmp_path, timeout_s=30, output_cap=1000)
    assert res.exit_code == 127
    assert "no-such-command-xyz" in res.output and "not found" in res.output


async def test_cwd_is_honoured(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    res = await run_shell("pwd -P", tmp_path / "sub", timeout_s=30, output_cap=1000)
    assert res.output.strip() == str((tmp_path / "sub").resolve())


async def test_missing_cwd_is_a_result_not_an_exception(tmp_path: Path) -> None:
    res = await run_shell("true", tmp_path / "gone", timeout_s=30, output_cap=1000)
    assert res.exit_code == 126 and "cannot start" in res.output


async def test_output_keeps_head_and_tail_within_the_cap(tmp_path: Path) -> None:
    command = "printf START; yes x | head -n 5000 | tr -d '\\n'; printf END"
    res = await run_shell(command, tmp_path, timeout_s=30, output_cap=100)
    total = len("START") + 5000 + len("END")
    marker = f"\n[… {total - 100} bytes omitted …]\n"
    head, tail = res.output.split(marker)
    assert head.startswith("START") and tail.endswith("END")
    assert len(head) + len(tail) == 100
    assert res.exit_code == 0


async def test_output_under_the_cap_is_whole_and_invalid_utf8_is_replaced(tmp_path: Path) -> None:
    res = await run_shell(r"printf 'caf\303\251 \377'", tmp_path, timeout_s=30, output_cap=100)
    assert res.output == "café \ufffd"


async def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    # The child ignores SIGTERM, so only the group SIGKILL can end it.
    command = (
        "sh -c 'trap \"\" TERM; echo $$ > child.pid; exec sleep 1000' & "
        "while [ ! -s child.pid ]; do :; done; echo ready; wait"
    )
    res = await run_shell(command, tmp_path, timeout_s=1.0, output_cap=1000)
    assert res.timed_out and res.exit_code is None
    assert "ready" in res.output
    assert dies(int((tmp_path / "child.pid").read_text()))


async def test_background_children_die_when_the_shell_exits(tmp_path: Path) -> None:
    res = await run_shell(
        "sleep 1000 & echo $! > bg.pid; echo done", tmp_path, timeout_s=30, output_cap=1000
    )
    assert (res.exit_code, res.timed_out, res.output) == (0, False, "done\n")
    assert res.duration_s < 20
    assert dies(int((tmp_path / "bg.pid").read_text()))


async def test_cancellation_kills_the_group_and_propagates(tmp_path: Path) -> None:
    fifo = tmp_path / "started"
    os.mkfifo(fifo)
    task = asyncio.create_task(
        run_shell("sleep 1000 & echo $! > started; wait", tmp_path, timeout_s=60, output_cap=100)
    )
    # Opening the FIFO blocks until the shell writes the child's pid: no sleeping.
    pid = int(await asyncio.to_thread(fifo.read_text))
    assert alive(pid)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert dies(pid)


def test_sandbox_env_is_an_allowlist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FOO_API_KEY", "sk-secret")
    monkeypatch.setenv("GITHUB_TOKEN", "ghp-secret")
    monkeypatch.setenv("LC_SECRET_PASSWORD", "x")
    monkeypatch.setenv("RANDOM_SETTING", "y")
    monkeypatch.setenv("LC_TIME", "C")
    env = sandbox_env({"EXTRA": "1"})
    assert env["PATH"] == os.environ["PATH"]
    assert env["LC_TIME"] == "C"
    assert env["CI"] == "1" and env["GIT_TERMINAL_PROMPT"] == "0" and env["EXTRA"] == "1"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    for name in ("FOO_API_KEY", "GITHUB_TOKEN", "LC_SECRET_PASSWORD", "RANDOM_SETTING"):
        assert name not in env


async def test_commands_see_the_sandbox_env_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GITHUB_TOKEN", "ghp-secret")
    default = await run_shell("env", tmp_path, timeout_s=30, output_cap=100_000)
    assert "ghp-secret" not in default.output and "CI=1" in default.output.splitlines()
    given = await run_shell(
        'echo "$ONLY"', tmp_path, timeout_s=30, output_cap=100, env={"ONLY": "me"}
    )
    assert given.output == "me\n"


def running(marker: str) -> list[int]:
    """Pids of processes whose command line has `marker` as an argument."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in args:
            pids.append(int(cmdline.parent.name))
    return pids


async def test_cancellation_while_spawning_still_kills_the_group(tmp_path: Path) -> None:
    marker = str(900_000 + os.getpid() % 99_999)
    task = asyncio.create_task(
        run_shell(f"sleep {marker} & wait", tmp_path, timeout_s=60, output_cap=100)
    )
    await asyncio.sleep(0)  # one turn of the loop: the task is inside the spawn, not a wait
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert all(dies(pid) for pid in running(marker))


# --- network isolation -----------------------------------------------------------------

# On a machine that cannot make network namespaces, set this to run the suite anyway; the
# isolation tests then fail loudly unless told so here, never skip silently.
NO_NETNS = os.environ.get("FLOW_TEST_NO_NETNS") == "1"
needs_netns = pytest.mark.skipif(NO_NETNS, reason="FLOW_TEST_NO_NETNS=1: no network namespaces")


@pytest.fixture
def listener() -> Iterator[int]:
    """A TCP server on the host's 127.0.0.1; connecting succeeds without an accept()."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


def connect(port: int) -> str:
    code = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)"
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(code)} && echo connected"


@pytest.fixture
def fresh_probe() -> Iterator[None]:
    proc.network_isolation.cache_clear()
    proc._ip_command.cache_clear()
    yield
    proc.network_isolation.cache_clear()
    proc._ip_command.cache_clear()


@needs_netns
def test_network_isolation_is_available_on_this_machine() -> None:
    mode = network_isolation()
    assert mode is not None, "unshare --net works nowhere here; set FLOW_TEST_NO_NETNS=1"
    assert shlex.split(mode)[1:] in (["--net", "--map-root-user"], ["--net"])
    assert f"`{mode}`" in describe_isolation()
    assert "reach no host" in describe_isolation()


@needs_netns
async def test_an_isolated_command_cannot_reach_the_hosts_loopback(
    tmp_path: Path, listener: int
) -> None:
    isolated = await run_shell(
        connect(listener), tmp_path, timeout_s=30, output_cap=10_000, isolate_network=True
    )
    assert isolated.exit_code != 0 and "connected" not in isolated.output
    assert "Error" in isolated.output  # refused or unreachable, at once
    assert isolated.duration_s < 10
    # The same command, as the spec's checks run it (the default), connects.
    plain = await run_shell(connect(listener), tmp_path, timeout_s=30, output_cap=10_000)
    assert (plain.exit_code, plain.output) == (0, "connected\n")


@needs_netns
async def test_an_isolated_command_has_a_loopback_of_its_own(tmp_path: Path) -> None:
    server = (
        "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(1); "
        "socket.create_connection(s.getsockname(), timeout=2); print('own loopback')"
    )
    command = f"{shlex.quote(sys.executable)} -c {shlex.quote(server)}"
    res = await run_shell(command, tmp_path, timeout_s=30, output_cap=10_000, isolate_network=True)
    assert (res.exit_code, res.output) == (0, "own loopback\n")


@needs_netns
async def test_an_isolated_command_keeps_exit_code_cwd_and_arguments(tmp_path: Path) -> None:
    res = await run_shell(
        'pwd -P; printf "%s|" "$0" "a b"; exit 7',
        tmp_path,
        timeout_s=30,
        output_cap=1000,
        isolate_network=True,
    )
    assert res.exit_code == 7
    assert res.output == f"{tmp_path.resolve()}\n/bin/sh|a b|"


@needs_netns
async def test_timeout_kills_the_whole_isolated_process_group(tmp_path: Path) -> None:
    command = (
        "sh -c 'trap \"\" TERM; echo $$ > child.pid; exec sleep 1000' & "
        "while [ ! -s child.pid ]; do :; done; echo ready; wait"
    )
    res = await run_shell(command, tmp_path, timeout_s=1.0, output_cap=1000, isolate_network=True)
    assert res.timed_out and "ready" in res.output
    assert dies(int((tmp_path / "child.pid").read_text()))


def test_no_unshare_means_no_isolation_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_probe: None
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no unshare, no ip
    assert network_isolation() is None
    assert "have the network" in describe_isolation()
    res = asyncio.run(
        run_shell("echo still runs", tmp_path, timeout_s=30, output_cap=100, isolate_network=True)
    )
    assert res.output == "still runs\n"


def test_without_user_namespaces_plain_unshare_is_used_and_its_limits_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_probe: None
) -> None:
    fake = tmp_path / "unshare"  # refuses user namespaces, "isolates" by just running
    fake.write_text(
        '#!/bin/sh\ncase "$*" in *--map-root-user*) exit 1;; esac\n'
        'echo "$@" >> "$(dirname "$0")/calls"; shift; exec "$@"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert network_isolation() == f"{fake} --net"
    assert "nsenter" in describe_isolation() and "no user namespace" in describe_isolation()
    res = asyncio.run(
        run_shell("echo hi", tmp_path, timeout_s=30, output_cap=100, isolate_network=True)
    )
    assert res.output == "hi\n"
    assert (tmp_path / "calls").read_text().splitlines()[-1].startswith("--net /bin/sh -c")
