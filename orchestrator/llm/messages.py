"""Typed conversation: messages, tool calls, tool specs, usage."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, Field

Role = Literal["system", "user", "assistant", "tool"]


class ToolCall(BaseModel):
    """One call the model asked for; `arguments` is the raw JSON text the model wrote."""

    id: str
    name: str
    arguments: str = "{}"
    provider_fields: dict[str, Any] = Field(default_factory=dict)
    """Extra fields the provider put on the call (e.g. Gemini's thought signature under
    `extra_content`), sent back unchanged on later turns."""

    def parsed(self) -> dict[str, Any]:
        """The arguments as a dict; raises ValueError when the model wrote invalid JSON."""
        value = json.loads(self.arguments or "{}")
        if not isinstance(value, dict):
            raise ValueError("tool arguments must be a JSON object")
        return value


class Message(BaseModel):
    role: Role
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    tool_call_id: str | None = None
    name: str | None = None
    reasoning_content: str | None = None
    """Reasoning returned by the provider; sent back on later turns (some providers insist)."""
    provider_fields: dict[str, Any] = Field(default_factory=dict)
    """Other provider-specific assistant fields kept verbatim (e.g. Anthropic thinking_blocks)."""

    @classmethod
    def system(cls, text: str) -> Message:
        return cls(role="system", content=text)

    @classmethod
    def user(cls, text: str) -> Message:
        return cls(role="user", content=text)

    @classmethod
    def tool(cls, call_id: str, name: str, text: str) -> Message:
        return cls(role="tool", tool_call_id=call_id, name=name, content=text)


class ToolSpec(BaseModel):
    """A tool offered to the model; `parameters` is a JSON schema object."""

    name: str
    description: str
    parameters: dict[str, Any]


class Usage(BaseModel):
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    cache_write_tokens: int = 0
    """Prompt tokens written to the provider's cache (Anthropic bills them above input)."""


class Completion(BaseModel):
    """One model reply with what it cost."""

    message: Message
    usage: Usage
    cost_usd: float = 0.0
    model: str
