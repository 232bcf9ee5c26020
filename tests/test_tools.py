"""The builder's tools: what they do, and that nothing outside the worktree is reachable."""

from __future__ import annotations

import asyncio
import faulthandler
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.agents.tools import MAX_READ_BYTES, Submitted, ToolError, Tools
from orchestrator.llm.messages import ToolCall


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "wt"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text("x = 1\ny = 2\n")
    (root / ".git").write_text("gitdir: /somewhere\n")
    (tmp_path / "secret.txt").write_text("top secret\n")
    return root


def tools(root: Path) -> Tools:
    return Tools(root, command_timeout_s=10, output_cap=4000)


def call(name: str, **args: object) -> ToolCall:
    import json

    return ToolCall(id="c1", name=name, arguments=json.dumps(args))


async def test_read_write_edit_list_search(tree: Path) -> None:
    t = tools(tree)
    assert await t.dispatch(call("read_file", path="pkg/a.py")) == "x = 1\ny = 2\n"
    await t.dispatch(call("write_file", path="pkg/new/b.py", content="z = 3\n"))
    assert (tree / "pkg" / "new" / "b.py").read_text() == "z = 3\n"
    await t.dispatch(call("edit_file", path="pkg/a.py", old="y = 2", new="y = 20"))
    assert (tree / "pkg" / "a.py").read_text() == "x = 1\ny = 20\n"
    listing = await t.dispatch(call("list_files"))
    assert listing.splitlines() == ["pkg/a.py", "pkg/new/b.py"]
    assert await t.dispatch(call("search", pattern=r"y = \d+")) == "pkg/a.py:2: y = 20"


async def test_edit_requires_exactly_one_match(tree: Path) -> None:
    (tree / "dup.txt").write_text("a\na\n")
    with pytest.raises(ToolError, match="found 2 matches"):
        await tools(tree).dispatch(call("edit_file", path="dup.txt", old="a", new="b"))
    with pytest.raises(ToolError, match="found 0 matches"):
        await tools(tree).dispatch(call("edit_file", path="dup.txt", old="zzz", new="b"))
    assert (tree / "dup.txt").read_text() == "a\na\n"


async def test_run_uses_worktree_and_reports_exit_code(tree: Path) -> None:
    out = await tools(tree).dispatch(call("run", command="pwd; exit 3"))
    assert out.startswith("[exit code 3]")
    assert str(tree.resolve()) in out


async def test_finish_raises_submitted(tree: Path) -> None:
    with pytest.raises(Submitted) as done:
        await tools(tree).dispatch(call("finish", summary="all done"))
    assert done.value.summary == "all done"


async def test_bad_calls_are_tool_errors(tree: Path) -> None:
    t = tools(tree)
    with pytest.raises(ToolError, match="unknown tool"):
        await t.dispatch(call("delete_everything"))
    with pytest.raises(ToolError, match="not a valid JSON"):
        await t.dispatch(ToolCall(id="c", name="read_file", arguments="{not json"))
    with pytest.raises(ToolError, match="bad arguments"):
        await t.dispatch(call("read_file", file="pkg/a.py"))


# Escape attempts (paths, symlinks, .git, FIFOs, environment, network) are in test_sandbox.py.


async def test_refusals_name_the_reason(tree: Path) -> None:
    t = tools(tree)
    with pytest.raises(ToolError, match="outside the repository"):
        await t.dispatch(call("read_file", path="../secret.txt"))
    with pytest.raises(ToolError, match="git internals"):
        await t.dispatch(call("write_file", path=".git/hooks/pre-commit", content="x"))
    with pytest.raises(ToolError, match="NUL byte"):
        await t.dispatch(call("read_file", path="a\x00b"))
    with pytest.raises(ToolError, match="path too long"):
        await t.dispatch(call("read_file", path="a/" * 600))
    with pytest.raises(ToolError, match="no such file"):
        await t.dispatch(call("read_file", path="pkg/none.py"))
    with pytest.raises(ToolError, match="is a directory"):
        await t.dispatch(call("read_file", path="pkg"))
    with pytest.raises(ToolError, match="is a directory"):
        await t.dispatch(call("write_file", path="pkg", content="x"))
    os.mkfifo(tree / "fifo")
    with pytest.raises(ToolError, match="not a regular file"):
        await t.dispatch(call("read_file", path="fifo"))


async def test_os_errors_come_back_as_tool_errors(tree: Path) -> None:
    (tree / "loop").symlink_to("loop")
    with pytest.raises(ToolError, match="write_file failed: "):
        await tools(tree).dispatch(call("write_file", path="loop/x", content="x"))


async def test_write_keeps_the_files_mode_and_leaves_no_temporary_file(tree: Path) -> None:
    script = tree / "run.sh"
    script.write_text("echo 1\n")
    script.chmod(0o755)
    t = tools(tree)
    await t.dispatch(call("write_file", path="run.sh", content="echo 2\n"))
    await t.dispatch(call("edit_file", path="run.sh", old="2", new="3"))
    assert script.read_text() == "echo 3\n" and script.stat().st_mode & 0o777 == 0o755
    await t.dispatch(call("write_file", path="new.txt", content="café\n"))
    assert (tree / "new.txt").read_bytes() == "café\n".encode()
    assert (tree / "new.txt").stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tree.iterdir()) == [".git", "new.txt", "pkg", "run.sh"]


async def test_binary_and_non_utf8_files(tree: Path) -> None:
    (tree / "blob.bin").write_bytes(b"x = 1\0\1")
    (tree / "latin.txt").write_bytes(b"x = caf\xe9\n")
    t = tools(tree)
    with pytest.raises(ToolError, match="binary file"):
        await t.dispatch(call("read_file", path="blob.bin"))
    with pytest.raises(ToolError, match="not UTF-8"):
        await t.dispatch(call("edit_file", path="latin.txt", old="x", new="y"))
    assert (tree / "latin.txt").read_bytes() == b"x = caf\xe9\n"
    assert await t.dispatch(call("read_file", path="latin.txt")) == "x = caf\ufffd\n"
    found = await t.dispatch(call("search", pattern="^x = "))
    assert found.splitlines() == ["latin.txt:1: x = caf\ufffd", "pkg/a.py:1: x = 1"]


async def test_long_reads_page_and_say_where_they_were_cut(tree: Path) -> None:
    """Issue 8, item 12: a read cut silently at 200 kB made read-modify-write truncate files."""
    line = "0123456789abcdef" * 4 + "\n"
    text = line * (3 * MAX_READ_BYTES // len(line) + 7)
    (tree / "big.txt").write_text(text)
    t = tools(tree)
    pages, offset = [], 0
    while True:
        page = await t.dispatch(call("read_file", path="big.txt", offset=offset))
        body, sep, note = page.partition("\n[… cut: ")
        pages.append(body)
        if not sep:
            break
        assert len(body) <= MAX_READ_BYTES and "edit_file" in note
        offset = int(note.split("offset=")[1].split(")")[0])
    assert len(pages) == 4
    assert "".join(pages) == text  # every byte, once, in order, on whole lines
    with pytest.raises(ToolError, match="offset must be"):
        await t.dispatch(call("read_file", path="big.txt", offset=-1))


async def test_a_malformed_tool_call_goes_back_to_the_model(tree: Path) -> None:
    """Issue 8, item 12: `content: null` (or any wrong type) is the model's error to fix; it
    must not end the builder."""
    t = tools(tree)
    for args in ({"path": "n.txt", "content": None}, {"path": "n.txt", "content": 7}):
        with pytest.raises(ToolError, match="write_file failed"):
            await t.dispatch(call("write_file", **args))
    with pytest.raises(ToolError):
        await t.dispatch(call("edit_file", path="pkg/a.py", old=None, new="x"))
    with pytest.raises(ToolError):
        await t.dispatch(call("read_file", path=["pkg/a.py"]))
    assert not (tree / "n.txt").exists()
    assert await t.dispatch(call("read_file", path="pkg/a.py")) == "x = 1\ny = 2\n"


async def test_run_has_its_own_git_global_config(tree: Path) -> None:
    out = await tools(tree).dispatch(call("run", command='echo "$GIT_CONFIG_GLOBAL"'))
    assert out == f"[exit code 0]\n{tree.resolve() / '.git' / 'flow-user.gitconfig'}\n"


CATASTROPHIC = r"(a|aa)+$"
"""Backtracks exponentially on a run of a's that ends otherwise (`regex` guards `(a+)+$`)."""


@pytest.fixture
def watchdog() -> Iterator[None]:
    """A search that freezes the loop would hang the test: end the process with a traceback."""
    faulthandler.dump_traceback_later(60, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


async def test_a_catastrophic_regex_is_a_tool_error_naming_it(tree: Path, watchdog: None) -> None:
    """Issue 8.12: a regex that backtracks forever comes back as a tool error within its bound."""
    (tree / "trap.txt").write_text("a" * 40 + "!\n")
    t = Tools(tree, command_timeout_s=10, output_cap=4000, search_timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(ToolError, match=re.escape(repr(CATASTROPHIC))):
        await t.dispatch(call("search", pattern=CATASTROPHIC))
    assert time.monotonic() - started < 10
    # The one `re` freezes on for ever (3 s at 25 characters, doubling per character) answers.
    assert await t.dispatch(call("search", pattern=r"(a+)+$")) == "no matches"
    assert await t.dispatch(call("search", pattern=r"a+!")) == "trap.txt:1: " + "a" * 40 + "!"


async def test_the_loop_goes_on_while_a_regex_search_runs(tree: Path, watchdog: None) -> None:
    """Issue 8.12: every builder and run share one event loop; a search must not stop it."""
    (tree / "trap.txt").write_text("a" * 40 + "!\n")
    t = Tools(tree, command_timeout_s=10, output_cap=4000, search_timeout_s=2.0)
    ticks = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.01)

    ticking = asyncio.create_task(ticker())
    try:
        with pytest.raises(ToolError, match="stopped after 2 s"):
            await t.dispatch(call("search", pattern=CATASTROPHIC))
        seen = ticks  # read before the ticker can run again
    finally:
        done.set()
        await ticking
    # 2 s of matching at 10 ms a tick: a frozen loop would have let through one at most.
    assert seen >= 50, seen
