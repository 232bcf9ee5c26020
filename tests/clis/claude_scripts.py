"""Scripted models that drive Claude Code through its own tool names (Bash, Write, Read)."""

from __future__ import annotations

import re
from typing import Any

from orchestrator.llm.messages import Message, ToolSpec

SHOW_ENV = (
    "env; echo ==claude.json==; cat ~/.claude.json; "
    "echo ==settings.json==; cat ~/.claude/settings.json; ls -a ~ ~/.claude"
)
HELLO = "hi from claude\n"
REVIEW = {
    "score": 8,
    "verdict": "approve",
    "summary": "README says base; fine.",
    "findings": ["no tests touched"],
}


def checkout_of(messages: list[Message]) -> str:
    """The checkout Claude Code names in its system prompt (its Write wants absolute paths)."""
    found = re.search(r"Primary working directory: (\S+)", messages[0].content or "")
    assert found, "Claude Code's system prompt names no working directory"
    return found.group(1)


def turn(messages: list[Message]) -> int:
    return sum(1 for m in messages if m.role == "assistant")


def edit(messages: list[Message], tools: list[ToolSpec], choice: str | None) -> Any:
    """Shows its environment and config files, writes hello.txt, says done."""
    if "Write" not in {t.name for t in tools}:
        return {"content": "A title"}  # any side call with no tools
    if turn(messages) == 0:
        call = {"command": SHOW_ENV, "description": "show env"}
        return {"tool_calls": [{"name": "Bash", "arguments": call}]}
    if turn(messages) == 1:
        write = {"file_path": f"{checkout_of(messages)}/hello.txt", "content": HELLO}
        return {"tool_calls": [{"name": "Write", "arguments": write}]}
    return {"content": "Done: wrote hello.txt."}


def bash_hello(messages: list[Message], tools: list[ToolSpec], choice: str | None) -> Any:
    """Writes hello.txt with Bash (so a repository that denies Bash would show)."""
    if turn(messages) == 0:
        call = {"command": f"printf '{HELLO.strip()}\\n' > hello.txt", "description": "write"}
        return {"tool_calls": [{"name": "Bash", "arguments": call}]}
    return {"content": "Done."}


def review(messages: list[Message], tools: list[ToolSpec], choice: str | None) -> Any:
    """Reads the README, then answers through the structured-output tool."""
    if turn(messages) == 0:
        path = {"file_path": f"{checkout_of(messages)}/README.md"}
        return {"tool_calls": [{"name": "Read", "arguments": path}]}
    if turn(messages) == 1:
        return {"tool_calls": [{"name": "StructuredOutput", "arguments": REVIEW}]}
    return {"content": "Reviewed."}


def forever(messages: list[Message], tools: list[ToolSpec], choice: str | None) -> Any:
    """Keeps Claude Code busy until the budget ends it."""
    call = {"command": "echo again", "description": "loop"}
    return {"tool_calls": [{"name": "Bash", "arguments": call}]}
