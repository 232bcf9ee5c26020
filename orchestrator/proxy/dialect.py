"""What a proxy dialect provides: the wire format of one agent CLI family, both ways."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orchestrator.llm.messages import Completion, Message, ToolSpec


def _no_local(path: str, body: dict[str, Any]) -> dict[str, Any] | None:
    return None


@dataclass(frozen=True)
class Dialect:
    name: str
    request: Callable[[dict[str, Any]], tuple[list[Message], list[ToolSpec], str | None]]
    """The CLI's request body as flow's messages, tools and tool choice."""
    response: Callable[[Completion, dict[str, Any]], dict[str, Any]]
    """A whole reply as the dialect's JSON body (the request body given for its options)."""
    sse: Callable[[Completion, dict[str, Any]], bytes]
    """A whole reply as the dialect's server-sent events."""
    error: Callable[[str, str], dict[str, Any]]
    """An error body: (message, kind)."""
    local: Callable[[str, dict[str, Any]], dict[str, Any] | None] = _no_local
    """A request answered by the proxy itself without a model call (path, body), or None."""
