"""OpenAI chat completions, both ways (OpenCode, aider, Qwen Code).

flow's Message is chat-shaped already, so the request side reuses `llm.wire`'s readers; the
CLI's `max_tokens` is ignored: the door applies the model's own output cap to every call.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from orchestrator.llm import wire
from orchestrator.llm.messages import Completion, Message, ToolSpec
from orchestrator.proxy.dialect import Dialect


def error(message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": kind}}


def models_list(model: str) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model, "object": "model", "owned_by": "flow"}]}


def request_from_wire(body: dict[str, Any]) -> tuple[list[Message], list[ToolSpec], str | None]:
    messages = []
    for m in body.get("messages") or []:
        role = m.get("role")
        # `developer` is OpenAI's newer name for the system prompt.
        messages.append(
            wire.message_from_wire({**m, "role": "system"} if role == "developer" else m)
        )
    tools = wire.tools_from_wire(body.get("tools"))
    return messages, tools, wire.tool_choice_from_wire(body.get("tool_choice"))


def _usage(c: Completion) -> dict[str, Any]:
    u = c.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


def _wire_calls(c: Completion) -> list[dict[str, Any]]:
    return [
        {"id": t.id, "type": "function", "function": {"name": t.name, "arguments": t.arguments}}
        for t in c.message.tool_calls
    ]


def response(c: Completion, body: dict[str, Any] | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": c.message.content}
    if c.message.tool_calls:
        msg["tool_calls"] = _wire_calls(c)
    if c.message.reasoning_content:
        msg["reasoning_content"] = c.message.reasoning_content
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:20]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": c.model,
        "choices": [
            {
                "index": 0,
                "message": msg,
                "finish_reason": "tool_calls" if c.message.tool_calls else "stop",
            }
        ],
        "usage": _usage(c),
    }


def sse(c: Completion, body: dict[str, Any]) -> bytes:
    """The whole reply as chat.completion.chunk events, usage last when asked for."""
    base = {
        "id": f"chatcmpl-{uuid.uuid4().hex[:20]}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": c.model,
    }
    delta: dict[str, Any] = {"role": "assistant", "content": c.message.content or ""}
    if c.message.reasoning_content:
        delta["reasoning_content"] = c.message.reasoning_content
    if c.message.tool_calls:
        delta["tool_calls"] = [{"index": i, **t} for i, t in enumerate(_wire_calls(c))]
    finish = "tool_calls" if c.message.tool_calls else "stop"
    chunks = [
        {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]},
    ]
    if (body.get("stream_options") or {}).get("include_usage"):
        chunks.append({**base, "choices": [], "usage": _usage(c)})
    out = b"".join(b"data: " + json.dumps(ch).encode() + b"\n\n" for ch in chunks)
    return out + b"data: [DONE]\n\n"


DIALECT = Dialect(
    "chat",
    request=request_from_wire,
    response=response,
    sse=sse,
    error=error,
)
