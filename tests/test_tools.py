"""The builder's tools: what they do, and that nothing outside the worktree is reachable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator.agents.tools import Submitted, ToolError, Tools
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


ESCAPES = [
    ("read_file", {"path": "../secret.txt"}),
    ("read_file", {"path": "pkg/../../secret.txt"}),
    ("read_file", {"path": "/etc/passwd"}),
    ("read_file", {"path": ".git"}),
    ("write_file", {"path": "../evil.txt", "content": "x"}),
    ("write_file", {"path": "/tmp/flow-evil.txt", "content": "x"}),
    ("write_file", {"path": ".git/hooks/pre-commit", "content": "x"}),
    ("edit_file", {"path": "../secret.txt", "old": "top", "new": "no"}),
    ("list_files", {"path": ".."}),
    ("search", {"pattern": "secret", "path": ".."}),
    ("read_file", {"path": "a\x00b"}),
    ("read_file", {"path": ""}),
]


@pytest.mark.parametrize(("name", "args"), ESCAPES)
async def test_escape_attempts_are_refused(tree: Path, name: str, args: dict[str, str]) -> None:
    with pytest.raises(ToolError):
        await tools(tree).dispatch(call(name, **args))
    assert (tree.parent / "secret.txt").read_text() == "top secret\n"
    assert not (tree.parent / "evil.txt").exists()


async def test_symlinks_pointing_out_are_refused(tree: Path) -> None:
    os.symlink(tree.parent / "secret.txt", tree / "link.txt")
    os.symlink(tree.parent, tree / "up")
    t = tools(tree)
    with pytest.raises(ToolError, match="outside"):
        await t.dispatch(call("read_file", path="link.txt"))
    with pytest.raises(ToolError, match="outside"):
        await t.dispatch(call("write_file", path="up/evil.txt", content="x"))
    with pytest.raises(ToolError, match="outside"):
        await t.dispatch(call("write_file", path="link.txt", content="overwritten"))
    assert (tree.parent / "secret.txt").read_text() == "top secret\n"
    assert not (tree.parent / "evil.txt").exists()
