"""Scripted models that drive aider through its own edit format (search/replace blocks).

aider sends no tools: a reply is text, and the edits are the SEARCH/REPLACE blocks in it.
Its side calls (commit messages) go to the weak model, which flow makes the same model.
"""

from __future__ import annotations

from typing import Any

from orchestrator.llm.messages import Message, ToolSpec

COMMIT_MESSAGE = "feat: greet from aider"


def block(path: str, search: str, replace: str) -> str:
    return f"{path}\n```\n<<<<<<< SEARCH\n{search}=======\n{replace}>>>>>>> REPLACE\n```\n"


def is_commit_message(messages: list[Message]) -> bool:
    first = (messages[0].content or "") if messages else ""
    return "Git commit messages" in first


def edit(messages: list[Message], tools: list[ToolSpec], choice: str | None) -> Any:
    """Creates hello.txt and changes README.md (an existing file) in one reply: aider applies
    both and ends, so any further call would be a reflection on a failed edit."""
    if is_commit_message(messages):
        return {"content": COMMIT_MESSAGE}
    return {
        "content": "Creating hello.txt.\n\n"
        + block("hello.txt", "", "hi from aider\n")
        + block("README.md", "base\n", "base, greeted\n")
    }


def never_matches(messages: list[Message], tools: list[ToolSpec], choice: str | None) -> Any:
    """Searches for what README.md does not hold, so aider reflects on every reply (up to
    its own limit of three reflections)."""
    return {"content": block("README.md", "nowhere in the file\n", "again\n")}
