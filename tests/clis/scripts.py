"""Scripted models that drive each agent CLI through its own tool names."""

from __future__ import annotations

from typing import Any

from orchestrator.llm.messages import Message, ToolSpec, Usage

SHOW_ENV = 'env; cat "$XDG_CONFIG_HOME"/opencode/* 2>/dev/null; ls -a "$HOME"'


def opencode(messages: list[Message], tools: list[ToolSpec], choice: str | None) -> Any:
    names = {t.name for t in tools}
    if "write" not in names:
        return {"content": "A title"}  # OpenCode's first call names the session
    turn = sum(1 for m in messages if m.role == "assistant")
    if turn == 0:
        call = {"command": SHOW_ENV, "description": "show env"}
        return {"tool_calls": [{"name": "bash", "arguments": call}]}
    if turn == 1:
        edit = {"filePath": "hello.txt", "content": "hi from opencode\n"}
        return {"tool_calls": [{"name": "write", "arguments": edit}]}
    return {"content": "Done: wrote hello.txt."}


class Billed:
    """A script that keeps the CLI busy forever and records what the server billed."""

    def __init__(self) -> None:
        self.tokens = 0

    def __call__(self, messages: list[Message], tools: list[ToolSpec], choice: str | None) -> Any:
        reply: dict[str, Any]
        if "bash" not in {t.name for t in tools}:
            reply = {"content": "A title"}
        else:
            call = {"command": "echo again", "description": "loop"}
            reply = {"tool_calls": [{"name": "bash", "arguments": call}]}
        usage = Usage(prompt_tokens=2000, completion_tokens=100)
        self.tokens += usage.prompt_tokens + usage.completion_tokens
        return reply, usage


BAD_STATS = "def mean(values):\n    return 0\n\n\ndef median(values):\n    return 0\n"


def opencode_bad_stats(messages: list[Message], tools: list[ToolSpec], choice: str | None) -> Any:
    """Overwrites stats.py with a wrong median: its candidate must lose on the checks."""
    if "write" not in {t.name for t in tools}:
        return {"content": "A title"}
    if sum(1 for m in messages if m.role == "assistant") == 0:
        edit = {"filePath": "stats.py", "content": BAD_STATS}
        return {"tool_calls": [{"name": "write", "arguments": edit}]}
    return {"content": "Done."}
