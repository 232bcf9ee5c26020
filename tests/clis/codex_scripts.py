"""Scripted models that drive Codex through the tools it offers (`exec_command`)."""

from __future__ import annotations

import json
from typing import Any

from orchestrator.llm.messages import Message, ToolSpec

SHOW_ENV = 'env; cat "$CODEX_HOME/config.toml"; ls -a "$HOME" "$CODEX_HOME"'
PATCH = "*** Begin Patch\n*** Add File: hello.txt\n+hi from codex\n*** End Patch\n"
REVIEW = {"score": 8.0, "verdict": "approve", "summary": "hello.txt says hi as asked"}


def _turn(messages: list[Message]) -> int:
    return sum(1 for m in messages if m.role == "assistant")


def _shell(cmd: str) -> dict[str, Any]:
    return {"tool_calls": [{"name": "exec_command", "arguments": {"cmd": cmd}}]}


def builder(messages: list[Message], tools: list[ToolSpec], choice: str | None) -> Any:
    """Shows what Codex sees of its environment and config, then edits with apply_patch
    (which Codex runs itself when the shell command is one)."""
    turn = _turn(messages)
    if turn == 0:
        return _shell(SHOW_ENV)
    if turn == 1:
        return _shell(f"apply_patch <<'EOF'\n{PATCH}EOF")
    return {"content": "Done: wrote hello.txt.", "reasoning_content": "The file is written."}


def one_call(messages: list[Message], tools: list[ToolSpec], choice: str | None) -> Any:
    return {"content": "Nothing to do."}


def busy(messages: list[Message], tools: list[ToolSpec], choice: str | None) -> Any:
    """Keeps Codex working forever."""
    return _shell("echo again")


def reviewer(messages: list[Message], tools: list[ToolSpec], choice: str | None) -> Any:
    """Reads the candidate, then answers with the review as JSON (Codex's structured output)."""
    if _turn(messages) == 0:
        return _shell("cat hello.txt; echo x > probe.txt")
    return {"content": json.dumps(REVIEW)}
