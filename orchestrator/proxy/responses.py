"""OpenAI Responses, both ways (Codex, which speaks nothing else).

litellm's Responses <-> chat bridge does the translation where it is faithful: input items
(messages, function_call / function_call_output, custom_tool_call, reasoning), function tools,
freeform `custom` tools (as a function with one `content` string, turned back into a
`custom_tool_call`) and `namespace` tools (flattened `ns__name`, restored on the way back).
Mended here, since a chat upstream cannot take them or a Responses client cannot read them:
- tools with no chat form (`web_search`, `local_shell`, `image_generation`, …) are dropped:
  litellm passes `local_shell` through as is and turns `web_search` into
  `web_search_options`, which flow's door does not send;
- a reasoning item is given as `summary_text`, where litellm writes `output_text` content
  (not a reasoning content type);
- a tool-calling reply with empty text gets no empty message item;
- the response id is `resp_…` (litellm reuses the chat completion's id);
- a `text.format` JSON schema becomes an instruction (litellm makes it a `response_format`,
  which the door does not send).
The SSE stream is synthesized from the whole reply, as the proxy does for every dialect.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from orchestrator.llm.messages import Completion, Message, ToolSpec
from orchestrator.proxy import chat
from orchestrator.proxy.dialect import Dialect

CHAT_TOOL_TYPES = ("function", "custom", "namespace")
"""Responses tool types that have a chat form; the rest are dropped."""


def _bridge() -> Any:
    # Imported on first use: litellm costs seconds to import.
    from litellm.responses.litellm_completion_transformation.transformation import (
        LiteLLMCompletionResponsesConfig,
    )

    return LiteLLMCompletionResponsesConfig


def error(message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": kind, "param": None}}


def usable_tools(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for t in body.get("tools") or [] if t.get("type") in CHAT_TOOL_TYPES]


def _plain(value: Any) -> Any:
    """litellm's messages mix dicts and pydantic objects: plain JSON values throughout."""
    return json.loads(json.dumps(value, default=lambda o: o.model_dump(exclude_none=True)))


def request_from_wire(body: dict[str, Any]) -> tuple[list[Message], list[ToolSpec], str | None]:
    params = {k: body[k] for k in ("instructions", "tool_choice") if body.get(k) is not None}
    params["tools"] = usable_tools(body)
    request = _bridge().transform_responses_api_request_to_chat_completion_request(
        model=str(body.get("model") or ""),
        input=body.get("input") or [],
        responses_api_request=params,
        stream=False,
    )
    request = _plain({k: request.get(k) for k in ("messages", "tools", "tool_choice")})
    messages, tools, choice = chat.request_from_wire(request)
    return _with_schema(messages, body), tools, choice


def _with_schema(messages: list[Message], body: dict[str, Any]) -> list[Message]:
    """A structured-output schema (`text.format`, Codex's `--output-schema`) as an instruction:
    the door sends no response format, and flow validates the answer itself."""
    fmt = (body.get("text") or {}).get("format") or {}
    if fmt.get("type") != "json_schema":
        return messages
    ask = Message.system(
        "Give your final answer as one JSON object, and nothing else, matching this JSON "
        f"schema:\n{json.dumps(fmt.get('schema') or {}, sort_keys=True)}"
    )
    lead = next((i for i, m in enumerate(messages) if m.role != "system"), len(messages))
    return [*messages[:lead], ask, *messages[lead:]]


def _reasoning_item(item: dict[str, Any]) -> dict[str, Any]:
    texts = [c.get("text", "") for c in item.get("content") or [] if c.get("text")]
    out: dict[str, Any] = {
        "type": "reasoning",
        "id": item.get("id") or f"rs_{uuid.uuid4().hex}",
        "summary": [{"type": "summary_text", "text": t} for t in texts],
    }
    if item.get("encrypted_content"):
        out["encrypted_content"] = item["encrypted_content"]
    return out


def _mend(item: dict[str, Any]) -> dict[str, Any] | None:
    kind = item.get("type")
    if kind == "reasoning":
        return _reasoning_item(item)
    if kind == "message":
        if not any(c.get("text") for c in item.get("content") or []):
            return None
        item.pop("role", None)
        return {"role": "assistant", **item}
    return item


def response(c: Completion, body: dict[str, Any]) -> dict[str, Any]:
    params = {"tools": usable_tools(body), "tool_choice": body.get("tool_choice")}
    converted = _bridge().transform_chat_completion_response_to_responses_api_response(
        request_input=body.get("input") or [],
        responses_api_request=params,
        chat_completion_response=chat.response(c),
    )
    data: dict[str, Any] = _plain(converted)
    output = [_mend(item) for item in data.get("output") or []]
    u = c.usage
    data.update(
        {
            "id": f"resp_{uuid.uuid4().hex}",
            "object": "response",
            "created_at": int(time.time()),
            "model": c.model,
            "status": "completed",
            "output": [item for item in output if item is not None],
            "usage": {
                "input_tokens": u.prompt_tokens,
                "input_tokens_details": {"cached_tokens": u.cached_tokens},
                "output_tokens": u.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": u.prompt_tokens + u.completion_tokens,
            },
        }
    )
    return data


def _event(kind: str, sequence: int, **fields: Any) -> bytes:
    data = json.dumps({"type": kind, "sequence_number": sequence, **fields})
    return f"event: {kind}\ndata: {data}\n\n".encode()


def _opened(item: dict[str, Any]) -> dict[str, Any]:
    """An output item as `response.output_item.added` announces it: nothing in it yet."""
    empty: dict[str, dict[str, Any]] = {
        "message": {"content": []},
        "function_call": {"arguments": ""},
        "custom_tool_call": {"input": ""},
        "reasoning": {"summary": []},
    }
    return {**item, **empty.get(str(item.get("type")), {}), "status": "in_progress"}


def _item_events(index: int, item: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The deltas between an item's `added` and `done` events."""
    kind, item_id = item.get("type"), item.get("id")
    at = {"item_id": item_id, "output_index": index}
    if kind == "message":
        out = []
        for n, part in enumerate(item.get("content") or []):
            text = part.get("text", "")
            where = {**at, "content_index": n}
            out.append(("response.content_part.added", {**where, "part": {**part, "text": ""}}))
            out.append(("response.output_text.delta", {**where, "delta": text}))
            out.append(("response.output_text.done", {**where, "text": text}))
            out.append(("response.content_part.done", {**where, "part": part}))
        return out
    if kind == "function_call":
        args = item.get("arguments", "")
        return [
            ("response.function_call_arguments.delta", {**at, "delta": args}),
            ("response.function_call_arguments.done", {**at, "arguments": args}),
        ]
    if kind == "custom_tool_call":
        text = item.get("input", "")
        return [
            ("response.custom_tool_call_input.delta", {**at, "delta": text}),
            ("response.custom_tool_call_input.done", {**at, "input": text}),
        ]
    if kind == "reasoning":
        out = []
        for n, part in enumerate(item.get("summary") or []):
            where = {**at, "summary_index": n}
            out.append(("response.reasoning_summary_part.added", {**where, "part": part}))
            delta = {**where, "delta": part.get("text", "")}
            out.append(("response.reasoning_summary_text.delta", delta))
            out.append(("response.reasoning_summary_text.done", {**where, "text": part["text"]}))
        return out
    return []


def sse(c: Completion, body: dict[str, Any]) -> bytes:
    """The whole reply as Responses events, ending with `response.completed` and its usage
    (Codex counts a turn finished only on that event)."""
    whole = response(c, body)
    started = {**whole, "status": "in_progress", "output": [], "usage": None}
    events: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"response": started}),
        ("response.in_progress", {"response": started}),
    ]
    for index, item in enumerate(whole["output"]):
        opened = {"output_index": index, "item": _opened(item)}
        events.append(("response.output_item.added", opened))
        events.extend(_item_events(index, item))
        events.append(("response.output_item.done", {"output_index": index, "item": item}))
    events.append(("response.completed", {"response": whole}))
    return b"".join(_event(kind, n, **fields) for n, (kind, fields) in enumerate(events))


DIALECT = Dialect(
    "responses",
    request=request_from_wire,
    response=response,
    sse=sse,
    error=error,
)
