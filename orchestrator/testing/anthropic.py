"""The Anthropic Messages API for the local test server: scripted replies with thinking blocks.

    with ChatServer(messages_handler({"claude-x": model}), protocol="anthropic",
                    rules=[requires_thinking()]) as srv:
        ...  # call "anthropic/claude-x" with api_base=srv.base_url

Thinking blocks carry a signature the server can check, so a client that drops, edits or
invents them gets Anthropic's 400, as from the real API.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from typing import Any

from orchestrator.llm.messages import Message, ToolCall, ToolSpec
from orchestrator.llm.scripted import ScriptedModel
from orchestrator.testing.server import Handler, Rule, ServerReply, anthropic_error

_EXTENDED_THINKING = "https://docs.claude.com/en/docs/build-with-claude/extended-thinking"


def sign(thinking: str) -> str:
    """The signature this server puts on (and expects back with) a thinking block."""
    return "sig-" + hashlib.sha256(thinking.encode()).hexdigest()[:32]


def _blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [b for b in content or [] if isinstance(b, dict)]


def _text(content: Any) -> str:
    return "".join(str(b.get("text", "")) for b in _blocks(content) if b.get("type") == "text")


def _assistant(blocks: list[dict[str, Any]]) -> Message:
    thinking = [b for b in blocks if b.get("type") in ("thinking", "redacted_thinking")]
    calls = [
        ToolCall(id=str(b["id"]), name=str(b["name"]), arguments=json.dumps(b.get("input") or {}))
        for b in blocks
        if b.get("type") == "tool_use"
    ]
    reasoning = "".join(str(b.get("thinking", "")) for b in thinking)
    return Message(
        role="assistant",
        content=_text(blocks) or None,
        tool_calls=calls,
        reasoning_content=reasoning or None,
        provider_fields={"thinking_blocks": thinking} if thinking else {},
    )


def messages_from_anthropic(request: dict[str, Any]) -> list[Message]:
    """An Anthropic request's system prompt and messages as flow's typed conversation."""
    out: list[Message] = []
    if request.get("system"):
        out.append(Message.system(_text(request["system"])))
    names: dict[str, str] = {}
    for m in request.get("messages") or []:
        blocks = _blocks(m.get("content"))
        if m.get("role") == "assistant":
            message = _assistant(blocks)
            names.update({c.id: c.name for c in message.tool_calls})
            out.append(message)
            continue
        for b in blocks:
            if b.get("type") == "tool_result":
                call_id = str(b.get("tool_use_id"))
                out.append(Message.tool(call_id, names.get(call_id, ""), _text(b.get("content"))))
        text = _text(blocks)
        if text:
            out.append(Message.user(text))
    return out


def _tool_choice(choice: Any) -> str | None:
    if not isinstance(choice, dict):
        return None
    kind = choice.get("type")
    if kind == "tool":
        return str(choice.get("name"))
    return "required" if kind == "any" else str(kind)


def _thinking_on(request: dict[str, Any], always: bool) -> bool:
    thinking = request.get("thinking")
    return always or (isinstance(thinking, dict) and thinking.get("type") == "enabled")


def messages_handler(scripts: dict[str, ScriptedModel], *, always_think: bool = False) -> Handler:
    """Answer `POST /v1/messages` from scripted models; reasoning becomes a signed thinking block.

    `always_think`: the model thinks whatever the request says (MiniMax M2 does).
    """
    counter = itertools.count(1)

    def handle(request: dict[str, Any]) -> dict[str, Any] | ServerReply:
        name = str(request.get("model", ""))
        model = scripts.get(name)
        if model is None:
            return ServerReply(404, anthropic_error(f"model: {name}", "not_found_error"))
        tools = [
            ToolSpec(
                name=t.get("name", ""),
                description=t.get("description", ""),
                parameters=t.get("input_schema") or {},
            )
            for t in request.get("tools") or []
        ]
        message, usage = model.reply(
            messages_from_anthropic(request), tools, _tool_choice(request.get("tool_choice"))
        )
        content: list[dict[str, Any]] = []
        if message.reasoning_content and _thinking_on(request, always_think):
            thought = message.reasoning_content
            content.append({"type": "thinking", "thinking": thought, "signature": sign(thought)})
        if message.content:
            content.append({"type": "text", "text": message.content})
        for call in message.tool_calls:
            content.append(
                {"type": "tool_use", "id": call.id, "name": call.name, "input": call.parsed()}
            )
        return {
            "id": f"msg_{next(counter):04d}",
            "type": "message",
            "role": "assistant",
            "model": name,
            "content": content,
            "stop_reason": "tool_use" if message.tool_calls else "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": usage.prompt_tokens
                - usage.cached_tokens
                - usage.cache_write_tokens,
                "cache_read_input_tokens": usage.cached_tokens,
                "cache_creation_input_tokens": usage.cache_write_tokens,
                "output_tokens": usage.completion_tokens,
            },
        }

    return handle


def _refuse(message: str) -> ServerReply:
    return ServerReply(400, anthropic_error(message))


def requires_thinking(*, always: bool = False) -> Rule:
    """Anthropic's rules for thinking: blocks come back unchanged, and while tools run the
    last assistant message starts with one (texts as the API words them: anthropics/claude-code
    #10627, anomalyco/opencode#3077, deepset-ai/haystack-core-integrations#2146)."""

    def rule(request: dict[str, Any]) -> ServerReply | None:
        messages = request.get("messages") or []
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            for j, b in enumerate(_blocks(m.get("content"))):
                if b.get("type") == "thinking" and b.get("signature") != sign(
                    b.get("thinking", "")
                ):
                    return _refuse(
                        f"messages.{i}.content.{j}: Invalid `signature` in `thinking` block"
                    )
        if not _thinking_on(request, always) or not messages:
            return None
        tool_loop = any(
            b.get("type") == "tool_result" for b in _blocks(messages[-1].get("content"))
        )
        last = max(
            (i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None
        )
        if not tool_loop or last is None:
            return None
        first = (_blocks(messages[last].get("content")) or [{"type": "text"}])[0]
        if first.get("type") in ("thinking", "redacted_thinking"):
            return None
        return _refuse(
            f"messages.{last}.content.0.type: Expected `thinking` or `redacted_thinking`, but "
            f"found `{first.get('type')}`. When `thinking` is enabled, a final `assistant` "
            "message must start with a thinking block (preceeding the lastmost set of "
            "`tool_use` and `tool_result` blocks). We recommend you include thinking blocks "
            "from previous turns. To avoid this requirement, disable `thinking`. Please "
            f"consult our documentation at {_EXTENDED_THINKING}"
        )

    return rule
