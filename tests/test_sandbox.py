"""Escape attempts against a builder's sandbox: its tools, its shell, its git checkout.

Each attempt runs against a real checkout made by `Repo.add_worktree`, with a secret file
and a directory outside it, and asserts that nothing outside changed or leaked.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import shlex
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import MakeRepo, git, repo_state

from orchestrator.agents.tools import ToolError, Tools
from orchestrator.llm.messages import ToolCall
from orchestrator.proc import network_isolation
from orchestrator.workspace import Repo, remove_run_worktrees, worktree_dir

SECRET = "top secret\n"
NO_NETNS = os.environ.get("FLOW_TEST_NO_NETNS") == "1"
needs_netns = pytest.mark.skipif(NO_NETNS, reason="FLOW_TEST_NO_NETNS=1: no network namespaces")


@dataclass
class Box:
    repo: Repo
    wt: Path
    """The builder's checkout."""
    outside: Path
    """A directory next to it, holding secret.txt; HOME points here too."""
    tools: Tools

    @property
    def secret(self) -> Path:
        return self.outside / "secret.txt"

    def outside_state(self) -> dict[str, bytes]:
        return {
            str(p.relative_to(self.outside)): p.read_bytes()
            for p in sorted(self.outside.rglob("*"))
            if p.is_file() and not p.is_symlink()
        }

    def user_state(self) -> dict[str, object]:
        gd = self.repo.git_dir
        return {
            **repo_state(self.repo.root),
            "config": (gd / "config").read_bytes(),
            "hooks": sorted(p.name for p in (gd / "hooks").iterdir()),
            "refs": git(self.repo.root, "for-each-ref", "--format=%(refname) %(objectname)"),
        }

    async def call(self, name: str, **args: object) -> str:
        return await self.tools.dispatch(ToolCall(id="c", name=name, arguments=json.dumps(args)))

    async def run(self, command: str) -> str:
        return await self.call("run", command=command)


@pytest.fixture
def box(make_repo: MakeRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Box]:
    monkeypatch.setenv("FLOW_CACHE_DIR", str(tmp_path / "cache"))
    repo = Repo.open(make_repo({"README.md": "hello\n", "pkg/a.py": "x = 1\n"}))
    wt = repo.add_worktree(worktree_dir(repo, "run") / "build-0", repo.resolve("HEAD"))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    monkeypatch.setenv("HOME", str(outside))
    # Planted by "someone else" (a repository's own symlinks, say): all pointing out.
    (wt / "link.txt").symlink_to(outside / "secret.txt")
    (wt / "up").symlink_to(outside)
    (wt / "loop1").symlink_to("loop2")
    (wt / "loop2").symlink_to("loop1")
    os.mkfifo(wt / "fifo")
    os.link(outside / "secret.txt", wt / "hard.txt")
    yield Box(repo, wt, outside, Tools(wt, command_timeout_s=20, output_cap=100_000))
    remove_run_worktrees(repo, "run")


# --- the file tools: one refused (or harmlessly contained) call each ------------------

REFUSED = [
    ("read_file", {"path": "../../../outside/secret.txt"}),
    ("read_file", {"path": "pkg/../../../../outside/secret.txt"}),
    ("read_file", {"path": "{outside}/secret.txt"}),
    ("read_file", {"path": "/etc/passwd"}),
    ("read_file", {"path": "~/secret.txt"}),
    ("write_file", {"path": "../evil.txt", "content": "x"}),
    ("write_file", {"path": "{outside}/evil.txt", "content": "x"}),
    ("edit_file", {"path": "{outside}/secret.txt", "old": "top", "new": "no"}),
    ("list_files", {"path": ".."}),
    ("list_files", {"path": "{outside}"}),
    ("search", {"pattern": "secret", "path": ".."}),
    # symlinks pointing out, to a file and to a directory
    ("read_file", {"path": "link.txt"}),
    ("read_file", {"path": "up/secret.txt"}),
    ("write_file", {"path": "link.txt", "content": "overwritten"}),
    ("write_file", {"path": "up/evil.txt", "content": "x"}),
    ("write_file", {"path": "up/new/dir/evil.txt", "content": "x"}),
    ("edit_file", {"path": "link.txt", "old": "top", "new": "no"}),
    ("edit_file", {"path": "up/secret.txt", "old": "top", "new": "no"}),
    ("list_files", {"path": "up"}),
    ("search", {"pattern": "secret", "path": "up"}),
    ("search", {"pattern": "secret", "path": "link.txt"}),
    # a symlink loop
    ("read_file", {"path": "loop1"}),
    ("write_file", {"path": "loop1/x", "content": "x"}),
    # git internals
    ("read_file", {"path": ".git/config"}),
    ("read_file", {"path": "pkg/../.git/config"}),
    ("read_file", {"path": ".git"}),
    ("write_file", {"path": ".git/hooks/post-commit", "content": "#!/bin/sh\ntouch pwned\n"}),
    ("write_file", {"path": ".git/config", "content": "[core]\n\tfsmonitor = touch pwned\n"}),
    ("edit_file", {"path": "x/../.git/HEAD", "old": "ref", "new": "x"}),
    # malformed paths
    ("read_file", {"path": "a\x00b"}),
    ("write_file", {"path": "../x\x00.txt", "content": "x"}),
    ("read_file", {"path": ""}),
    ("read_file", {"path": "a/" * 1000 + "b"}),
    ("write_file", {"path": "x" * 300, "content": "x"}),
    # not a regular file: must neither block nor read a device
    ("read_file", {"path": "fifo"}),
    ("edit_file", {"path": "fifo", "old": "a", "new": "b"}),
    ("read_file", {"path": "/dev/zero"}),
    # a hard link to an outside file: same inode, so no path check can see it
    ("read_file", {"path": "hard.txt"}),
    ("edit_file", {"path": "hard.txt", "old": "top", "new": "no"}),
]


def _id(case: tuple[str, dict[str, str]]) -> str:
    name, args = case
    return f"{name}:{args.get('path', '.')[:24]!r}"


@pytest.mark.parametrize(("name", "args"), REFUSED, ids=[_id(c) for c in REFUSED])
async def test_file_tool_escapes_are_refused(box: Box, name: str, args: dict[str, str]) -> None:
    args = {k: v.replace("{outside}", str(box.outside)) for k, v in args.items()}
    outside, user = box.outside_state(), box.user_state()
    with pytest.raises(ToolError) as refused:
        await asyncio.wait_for(box.call(name, **args), 10)
    assert "top secret" not in str(refused.value)
    assert box.outside_state() == outside
    assert box.user_state() == user
    assert not (box.repo.root / "pwned").exists() and not (box.wt / "pwned").exists()


async def test_a_hard_link_to_an_outside_file_is_replaced_not_written_through(box: Box) -> None:
    await box.call("write_file", path="hard.txt", content="replaced\n")
    assert box.secret.read_text() == SECRET
    assert (box.wt / "hard.txt").read_text() == "replaced\n"
    assert os.stat(box.wt / "hard.txt").st_ino != os.stat(box.secret).st_ino


async def test_tilde_is_not_home(box: Box) -> None:
    await box.call("write_file", path="~/evil.txt", content="x")
    assert (box.wt / "~" / "evil.txt").read_text() == "x"
    assert not (box.outside / "evil.txt").exists()


async def test_search_and_list_do_not_follow_symlinks_out(box: Box) -> None:
    (box.outside / "deep").mkdir()
    (box.outside / "deep" / "more.txt").write_text("top secret too\n")
    assert await box.call("search", pattern="secret") == "no matches"
    listing = (await box.call("list_files")).splitlines()
    assert "up/secret.txt" not in listing and "up/deep/more.txt" not in listing
    assert "pkg/a.py" in listing


# --- symlinks and special files the builder makes itself, with `run` ------------------


async def test_a_builder_symlink_to_the_root_is_refused(box: Box) -> None:
    await box.run("ln -s / root && ln -s /etc etc && ln -s ../../.. parent")
    for path in ("root/etc/passwd", "etc/passwd", "parent/outside/secret.txt"):
        with pytest.raises(ToolError, match="outside"):
            await box.call("read_file", path=path)
    for path in ("root/tmp/flow-evil.txt", "parent/outside/evil.txt"):
        with pytest.raises(ToolError, match="outside"):
            await box.call("write_file", path=path, content="x")
    assert not Path("/tmp/flow-evil.txt").exists()
    assert not (box.outside / "evil.txt").exists()


async def test_builder_symlinks_are_not_followed_by_search(box: Box) -> None:
    await box.run(f"ln -s {shlex.quote(str(box.secret))} s.txt && ln -s / root")
    assert await box.call("search", pattern="top secret|root:") == "no matches"
    assert "root/etc/passwd" not in await box.call("list_files")


async def test_a_builder_fifo_neither_blocks_nor_reads(box: Box) -> None:
    await box.run("mkfifo p && mkdir d && mkfifo d/q")
    with pytest.raises(ToolError, match="not a regular file"):
        await asyncio.wait_for(box.call("read_file", path="p"), 5)
    assert await asyncio.wait_for(box.call("search", pattern="x", path="d"), 5) == "no matches"
    await asyncio.wait_for(box.call("write_file", path="p", content="x = 2\n"), 5)
    assert (box.wt / "p").read_text() == "x = 2\n"  # replaced by a file, not written into


# --- the shell: environment, network, git, processes ----------------------------------


async def test_run_sees_no_secret_variables(box: Box, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_API_KEY", "GITHUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD"):
        monkeypatch.setenv(name, "leak-" + name)
    monkeypatch.setenv("LC_MY_TOKEN", "leak-lc")  # LC_* is kept, but not with a secret name
    out = await box.run("env")
    names = [line.split("=", 1)[0] for line in out.splitlines()[1:] if "=" in line]
    assert names and "PATH" in names
    assert not [n for n in names if any(m in n for m in ("KEY", "TOKEN", "SECRET", "PASSWORD"))]
    assert "leak-" not in out


@needs_netns
async def test_run_cannot_read_flows_environment_through_proc(box: Box) -> None:
    assert "--map-root-user" in (network_isolation() or "")
    os.environ["FLOW_ONLY_MARKER"] = "flow-process-environment"
    try:
        out = await box.run(
            f"tr '\\0' '\\n' < /proc/{os.getpid()}/environ; cat /proc/$PPID/environ"
        )
    finally:
        del os.environ["FLOW_ONLY_MARKER"]
    # under bubblewrap flow's process is not in the sandbox's pid namespace at all, and the
    # parent it sees is the sandbox's own init, with the sandbox's scrubbed environment
    assert "flow-process-environment" not in out
    assert "Permission denied" in out or "No such file" in out


@needs_netns
async def test_run_cannot_connect_to_the_host(box: Box) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        code = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)"
        command = f"{shlex.quote(sys.executable)} -c {shlex.quote(code)} && echo connected"
        out = await box.run(command)
    assert not out.startswith("[exit code 0]") and "connected" not in out.splitlines()


async def test_run_cannot_change_the_users_git_config_or_repository(box: Box) -> None:
    git(box.repo.root, "tag", "v1")
    user = {**box.user_state(), "tags": git(box.repo.root, "tag")}
    out = await box.run(
        "git config user.name HACK; git branch -f main HEAD; git tag evil; git tag -f v1; "
        "echo 'touch pwned' > .git/hooks/post-commit; chmod +x .git/hooks/post-commit; "
        "git config --global user.name HACK; git config --global core.hooksPath /tmp; "
        "git push origin HEAD:refs/heads/pushed; git push --all; git fetch --all; "
        "git config --system --show-origin --list; true"
    )
    assert out.startswith("[exit code 0]")
    assert {**box.user_state(), "tags": git(box.repo.root, "tag")} == user
    assert not (box.outside / ".gitconfig").exists()  # HOME is `outside` in this suite
    assert "file:" + str(box.wt / ".git") in out  # --system went to the checkout's own file
    assert not box.repo.branch_exists("pushed")


def _running(marker: str) -> list[int]:
    """Host pids of processes whose command line holds `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmdline and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


async def test_the_timeout_kills_the_whole_process_group(box: Box) -> None:
    tools = Tools(box.wt, command_timeout_s=1, output_cap=1000)
    command = (
        "sh -c 'trap \"\" TERM; echo $$ > child.pid; exec sleep 1001' & "
        "sh -c 'sleep 1002' & echo $! > other.pid; "
        "while [ ! -s child.pid ]; do :; done; echo ready; wait"
    )
    out = await tools.run(command)
    assert out.startswith("[timed out]") and "ready" in out
    for marker in ("sleep 1001", "sleep 1002"):
        assert await asyncio.to_thread(_ends, marker), f"{marker} survived the timeout"


async def test_processes_a_command_started_do_not_outlive_it(box: Box) -> None:
    """Issue 8, item 2: `setsid sleep 333 &` (a daemon) survived its command."""
    out = await box.run("setsid sleep 3331 & (setsid nohup sleep 3332 >/dev/null 2>&1 &); echo up")
    assert out.startswith("[exit code 0]")
    for marker in ("sleep 3331", "sleep 3332"):
        assert await asyncio.to_thread(_ends, marker), f"{marker} outlived its command"


def _ends(marker: str, within: float = 5.0) -> bool:
    """Whether every process holding `marker` ends within `within` s (waited on pidfds)."""
    for pid in _running(marker):
        if not gone(pid, within):
            return False
    return not _running(marker)


async def test_run_cannot_write_outside_its_checkout_or_see_secrets(
    box: Box, tmp_path: Path
) -> None:
    """Issue 8, item 2: `cd ~/project && git reset --hard`, editing the user's virtualenv,
    reading ~/.ssh: the file system outside the checkout is read-only or absent."""
    venv = Path(os.path.expanduser("~")) / "venv-of-the-user"
    venv.mkdir()
    (venv / "site.py").write_text("ok = True\n")
    ssh = Path(os.path.expanduser("~")) / ".ssh"
    ssh.mkdir()
    (ssh / "id_rsa").write_text("PRIVATE KEY\n")
    user = box.user_state()
    out = await box.run(
        f"(cd {shlex.quote(str(box.repo.root))} && git reset --hard HEAD~0; touch pwned); "
        f"echo hacked > {shlex.quote(str(venv / 'site.py'))}; "
        f"cat {shlex.quote(str(ssh / 'id_rsa'))}; ls {shlex.quote(str(box.repo.root))}; "
        "echo fine > inside.txt; echo tmp > /tmp/t && cat /tmp/t"
    )
    assert "PRIVATE KEY" not in out, out
    assert (box.wt / "inside.txt").exists(), out
    assert (venv / "site.py").read_text() == "ok = True\n"
    assert not (box.repo.root / "pwned").exists()
    assert box.user_state() == user
    assert (box.wt / "inside.txt").read_text() == "fine\n"  # its own checkout is writable
    assert "tmp" in out.splitlines()  # and a private /tmp


def gone(pid: int, within: float = 5.0) -> bool:
    """Whether `pid` ends within `within` seconds (waited for on a pidfd); a zombie is gone."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        if select.select([fd], [], [], within)[0]:
            return True
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")
    finally:
        os.close(fd)


async def test_removal_leaves_nothing_even_after_a_hostile_builder(box: Box) -> None:
    await box.run("mkdir -p locked/in && touch locked/in/f && chmod 000 locked/in locked")
    assert remove_run_worktrees(box.repo, "run") == 1
    assert not box.wt.exists() and not box.wt.parent.exists()
    assert box.secret.read_text() == SECRET  # the symlinks went, not what they point at


async def test_checks_keep_the_network_but_cannot_read_flows_environment(tmp_path: Path) -> None:
    """The spec's checks run the candidate's code: they must not see flow's API keys."""
    import subprocess

    from orchestrator.proc import run_shell, user_isolation

    assert user_isolation() is not None, "this machine allows user namespaces"
    # A process started with a key in its environment, as flow is.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        env={**os.environ, "PLANTED_API_KEY": "sk-planted-check-secret"},
    )
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        spy = f"cat /proc/{holder.pid}/environ | tr '\\0' '\\n' | grep PLANTED"
        leaked = await run_shell(spy, tmp_path, timeout_s=10, output_cap=4000, isolate_user=True)
        assert "sk-planted-check-secret" not in leaked.output
        plain = await run_shell(spy, tmp_path, timeout_s=10, output_cap=4000)
        assert "sk-planted-check-secret" in plain.output  # the spy works without isolation
        connect = (
            f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}),"
            ' timeout=5)"'
        )
        net = await run_shell(connect, tmp_path, timeout_s=10, output_cap=4000, isolate_user=True)
        assert net.exit_code == 0, net.output  # checks keep the machine's network
    finally:
        server.close()
        holder.kill()
        holder.wait()


def test_sandbox_required_refuses_to_run_without_bubblewrap(tmp_path: Path) -> None:
    """Issue 8, item 2: where bubblewrap is missing, `sandbox: required` refuses (exit 2) and
    validate says plainly what is and is not confined; with it, validate says it is used."""
    import shutil
    import subprocess

    from orchestrator.demo import prepare_demo

    demo = prepare_demo(tmp_path)
    demo.config.write_text(demo.config.read_text() + "sandbox: required\n")
    bare = tmp_path / "bin"
    bare.mkdir()
    for tool in ("git", "python3", "sh"):
        found = shutil.which(tool)
        assert found is not None
        (bare / tool).symlink_to(found)

    def validate(path: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "orchestrator", "validate", str(demo.spec)]
        return subprocess.run(
            [*argv, "--config", str(demo.config)],
            cwd=demo.repo,
            capture_output=True,
            text=True,
            env={**os.environ, "PATH": path},
            timeout=60,
        )

    without = validate(str(bare))
    assert without.returncode == 2, without.stdout + without.stderr
    assert "sandbox: required" in without.stderr and "bubblewrap" in without.stderr
    assert "Traceback" not in without.stderr
    with_it = validate(os.environ["PATH"])
    assert with_it.returncode == 0, with_it.stderr
    assert "under bubblewrap" in with_it.stdout
