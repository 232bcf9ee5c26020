"""The Anthropic Messages API, both ways (Claude Code).

Requests go through litellm's Anthropic adapter to the chat shape flow's Message already has,
with repairs the adapter does not make: images and documents become a text placeholder
(flow's messages are text; the adapter turns them into `image_url` parts, or drops a text
document), a tool result's `is_error` is said in its text (the adapter drops it), hosted
tools (web search) are left out, the system prompt is read here (the adapter runs its
blocks together and keeps Claude Code's billing header), and system messages between turns
join the user's turn. Thinking blocks that carry a
signature are kept in `provider_fields` for an Anthropic upstream; unsigned ones (flow made
them from another provider's reasoning) travel back as `reasoning_content` only.

Replies are written here: one list of content blocks serves the JSON body and the events,
which the adapter's chunk-stream iterator does not fit (the door returns whole replies).
The CLI's `max_tokens`, `thinking`, `output_config` and `context_management` are ignored:
the door applies the model's own caps.
"""

from __future__ import annotations

import json
import math
import uuid
from typing import Any

from orchestrator.llm.messages import Completion, Message, ToolSpec
from orchestrator.proxy import chat
from orchestrator.proxy.dialect import Dialect

COUNT_TOKENS = "/v1/messages/count_tokens"
BILLING_HEADER = "x-anthropic-billing-header:"


def error(message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


def _placeholder(block: dict[str, Any]) -> dict[str, Any]:
    source = block.get("source") or {}
    what = source.get("media_type") or source.get("type") or "unknown"
    title = f" {block['title']!r}" if block.get("title") else ""
    return {
        "type": "text",
        "text": f"[{block.get('type')}{title} ({what}) left out: this model is given text only]",
    }


def _plain(blocks: Any) -> Any:
    """Content with images and documents replaced by text, tool errors said in the text."""
    if not isinstance(blocks, list):
        return blocks
    out: list[Any] = []
    for b in blocks:
        if not isinstance(b, dict):
            out.append(b)
        elif b.get("type") in ("image", "document"):
            out.append(_placeholder(b))
        elif b.get("type") == "tool_result":
            content = _plain(b.get("content"))
            if b.get("is_error"):
                first = {"type": "text", "text": "(the tool reported an error)\n"}
                content = [first, *(content if isinstance(content, list) else [content or ""])]
            out.append({**b, "content": content})
        else:
            out.append(b)
    return out


def _adapter() -> Any:
    from litellm.llms.anthropic.experimental_pass_through.adapters.transformation import (
        LiteLLMAnthropicMessagesAdapter,
    )

    adapter: Any = LiteLLMAnthropicMessagesAdapter  # untyped in litellm
    return adapter()


def _signed_only(message: Message) -> Message:
    blocks = message.provider_fields.get("thinking_blocks")
    if not isinstance(blocks, list):
        return message
    kept = [
        b
        for b in blocks
        if isinstance(b, dict) and (b.get("signature") or b.get("type") == "redacted_thinking")
    ]
    fields = {k: v for k, v in message.provider_fields.items() if k != "thinking_blocks"}
    if kept:
        fields["thinking_blocks"] = kept
    return message.model_copy(update={"provider_fields": fields})


def request_from_wire(body: dict[str, Any]) -> tuple[list[Message], list[ToolSpec], str | None]:
    request = {
        "model": body.get("model") or "model",
        "messages": [
            {**m, "content": _plain(m.get("content"))} for m in body.get("messages") or []
        ],
    }
    tools = [t for t in body.get("tools") or [] if _client_tool(t)]
    if tools:
        request["tools"] = [{"name": t["name"], **_tool_fields(t)} for t in tools]
    if body.get("tool_choice") and tools:
        request["tool_choice"] = body["tool_choice"]
    openai, _ = _adapter().translate_anthropic_to_openai(request)
    messages, specs, choice = chat.request_from_wire(openai)
    system = _system(body.get("system"))
    head = [Message.system(system)] if system else []
    return head + _no_midway_system([_signed_only(m) for m in messages]), specs, choice


def _no_midway_system(messages: list[Message]) -> list[Message]:
    """Claude Code's system messages between turns as a reminder in the user's turn: the chat
    templates of many open models refuse a system message anywhere but first."""
    out: list[Message] = []
    for m in messages:
        if m.role == "system":
            m = Message.user(f"<system-reminder>\n{m.content or ''}\n</system-reminder>")
        if m.role == "user" and out and out[-1].role == "user":
            joined = f"{out[-1].content or ''}\n\n{m.content or ''}"
            out[-1] = out[-1].model_copy(update={"content": joined})
        else:
            out.append(m)
    return out


def _system(system: Any) -> str:
    """The system prompt as one text: blocks apart by a blank line (the adapter runs them
    together), less Claude Code's billing header, which is Anthropic's and not an instruction."""
    if isinstance(system, str):
        return system
    texts = [
        str(b.get("text") or "")
        for b in system or []
        if isinstance(b, dict) and b.get("type") == "text"
    ]
    return "\n\n".join(t for t in texts if t and not t.startswith(BILLING_HEADER))


def _client_tool(tool: Any) -> bool:
    # Hosted tools (web search, code execution) have a dated `type`; no model here runs them.
    return (
        isinstance(tool, dict) and bool(tool.get("name")) and tool.get("type") in (None, "custom")
    )


def _tool_fields(tool: dict[str, Any]) -> dict[str, Any]:
    # Only what a client tool is; `type`, `cache_control` and the like are not the model's.
    return {
        "description": tool.get("description") or "",
        "input_schema": tool.get("input_schema") or {"type": "object", "properties": {}},
    }


def _input(arguments: str) -> dict[str, Any]:
    try:
        value = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def blocks(c: Completion) -> list[dict[str, Any]]:
    """The reply's content blocks: thinking, then text, then tool calls."""
    out: list[dict[str, Any]] = []
    m = c.message
    thinking = m.provider_fields.get("thinking_blocks")
    if isinstance(thinking, list) and thinking:
        out += [dict(b) for b in thinking if isinstance(b, dict)]
    elif m.reasoning_content:
        out.append({"type": "thinking", "thinking": m.reasoning_content, "signature": ""})
    if m.content:
        out.append({"type": "text", "text": m.content})
    for t in m.tool_calls:
        out.append({"type": "tool_use", "id": t.id, "name": t.name, "input": _input(t.arguments)})
    return out


def usage(c: Completion) -> dict[str, Any]:
    u = c.usage
    return {
        "input_tokens": max(u.prompt_tokens - u.cached_tokens, 0),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": u.cached_tokens,
        "output_tokens": u.completion_tokens,
    }


def _stop_reason(c: Completion) -> str:
    return "tool_use" if c.message.tool_calls else "end_turn"


def _message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def response(c: Completion, body: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "id": _message_id(),
        "type": "message",
        "role": "assistant",
        "model": c.model,
        "content": blocks(c),
        "stop_reason": _stop_reason(c),
        "stop_sequence": None,
        "usage": usage(c),
    }


def _deltas(block: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A block as it starts (empty) and the deltas that fill it."""
    kind = block["type"]
    if kind == "text":
        return {"type": "text", "text": ""}, [{"type": "text_delta", "text": block["text"]}]
    if kind == "tool_use":
        start = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
        return start, [{"type": "input_json_delta", "partial_json": json.dumps(block["input"])}]
    if kind == "thinking":
        deltas = [{"type": "thinking_delta", "thinking": block.get("thinking") or ""}]
        if block.get("signature"):
            deltas.append({"type": "signature_delta", "signature": block["signature"]})
        return {"type": "thinking", "thinking": "", "signature": ""}, deltas
    return block, []  # redacted_thinking arrives whole


def sse(c: Completion, body: dict[str, Any]) -> bytes:
    """The whole reply as Anthropic's stream: message_start, blocks, message_delta, stop."""
    head = response(c, body)
    start_usage = {**head["usage"], "output_tokens": 0}
    events: list[dict[str, Any]] = [
        {
            "type": "message_start",
            "message": {**head, "content": [], "stop_reason": None, "usage": start_usage},
        }
    ]
    for i, block in enumerate(head["content"]):
        start, deltas = _deltas(block)
        events.append({"type": "content_block_start", "index": i, "content_block": start})
        events += [{"type": "content_block_delta", "index": i, "delta": d} for d in deltas]
        events.append({"type": "content_block_stop", "index": i})
    events.append(
        {
            "type": "message_delta",
            "delta": {"stop_reason": head["stop_reason"], "stop_sequence": None},
            "usage": head["usage"],
        }
    )
    events.append({"type": "message_stop"})
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


def count_tokens(path: str, body: dict[str, Any]) -> dict[str, Any] | None:
    """`count_tokens` answered here: four bytes a token of what would be sent, no model call."""
    if not path.endswith(COUNT_TOKENS):
        return None
    sent = {k: body.get(k) for k in ("system", "messages", "tools")}
    size = len(json.dumps(sent, ensure_ascii=False).encode())
    return {"input_tokens": math.ceil(size / 4)}


DIALECT = Dialect(
    "anthropic",
    request=request_from_wire,
    response=response,
    sse=sse,
    error=error,
    local=count_tokens,
)
