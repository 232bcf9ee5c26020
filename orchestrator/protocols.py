"""The seams: small protocols that dependencies are injected through."""

from __future__ import annotations

from typing import Protocol

from orchestrator.events import Event
from orchestrator.llm.messages import Completion, Message, ToolSpec


class EventSink(Protocol):
    def emit(self, event: Event) -> None: ...


class ModelDoor(Protocol):
    """The one way to call a model: routing, limits, budget and the ledger live behind it."""

    async def complete(
        self,
        model: str,
        messages: list[Message],
        *,
        stage: str,
        tools: list[ToolSpec] | None = None,
        tool_choice: str | None = None,
        scope: str = "",
        fallbacks: list[str] | None = None,
    ) -> Completion:
        """`scope` separates agents that may send identical requests (e.g. parallel builders);
        `fallbacks` are tried in order when `model` keeps failing."""
        ...


class NullSink:
    def emit(self, event: Event) -> None:
        return None


class ListSink:
    """Collects events; used by tests and by the batch runner."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def emit(self, event: Event) -> None:
        self.events.append(event)
