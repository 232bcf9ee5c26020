"""Typed messages ⇄ OpenAI-shaped dicts, the lazy litellm call, and provider error triage."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import importlib
import json
import math
import os
import time
import weakref
from dataclasses import dataclass
from typing import Any

from orchestrator import pools
from orchestrator.llm.messages import Message, ToolCall, ToolSpec, Usage
from orchestrator.llm.quirks import DEFAULTS, ResolvedQuirks, normalize_schema

TOOL_CHOICE_KEYWORDS = ("auto", "required", "none")
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
AUTH_STATUSES = frozenset({401, 403})
RETRY_AFTER_CAP_S = 120.0
# Assistant fields that carry reasoning, besides `reasoning_content`.
REASONING_FIELDS = ("thinking_blocks", "reasoning_details")


def message_to_wire(message: Message, quirks: ResolvedQuirks = DEFAULTS) -> dict[str, Any]:
    """One message as the OpenAI chat format; assistant reasoning travels back verbatim."""
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.role == "tool":
        out["tool_call_id"] = message.tool_call_id
        out["content"] = message.content or ""
        return out
    if message.role != "assistant":
        out["content"] = message.content or ""
        if message.name:
            out["name"] = message.name
        return out
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
                **c.provider_fields,
            }
            for c in message.tool_calls
        ]
    extra = dict(message.provider_fields)
    if quirks.reasoning_passback:
        # DeepSeek, Kimi and MiniMax answer 400 when a tool-calling turn's reasoning is dropped;
        # Anthropic wants its signed thinking blocks back unchanged.
        if message.reasoning_content is not None:
            out["reasoning_content"] = message.reasoning_content
    else:
        for key in REASONING_FIELDS:
            extra.pop(key, None)
    for key, value in extra.items():
        out.setdefault(key, value)
    return out


def messages_to_wire(
    messages: list[Message], quirks: ResolvedQuirks = DEFAULTS
) -> list[dict[str, Any]]:
    """The conversation in OpenAI chat format, shaped by the endpoint's quirks."""
    out = [message_to_wire(m, quirks) for m in messages]
    if quirks.system_role == "developer":
        for m in out:
            if m["role"] == "system":
                m["role"] = "developer"
    elif quirks.system_role == "user":
        out = _fold_system(out)
    return out


EPHEMERAL = {"type": "ephemeral"}


def cache_breakpoints(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Anthropic prompt-cache breakpoints (litellm passes `cache_control` through): on the
    system prompt (which covers the tools, sent before it), on the last message of the
    previous request (where its cache entry ends, so this request reads it) and on this
    request's last message (written for the next). Returns new dicts; the input is kept."""
    out = [dict(m) for m in messages]
    marks = [i for i, m in enumerate(out) if m["role"] in ("system", "developer")][:1]
    replies = [i for i, m in enumerate(out) if m["role"] == "assistant"]
    if replies and replies[-1] > 0:
        marks.append(replies[-1] - 1)
    if out:
        marks.append(len(out) - 1)
    for i in dict.fromkeys(marks):
        m = out[i]
        content = m.get("content")
        if isinstance(content, str) and content:
            m["content"] = [{"type": "text", "text": content, "cache_control": dict(EPHEMERAL)}]
        elif isinstance(content, list) and content and isinstance(content[-1], dict):
            m["content"] = [*content[:-1], {**content[-1], "cache_control": dict(EPHEMERAL)}]
    return out


def _fold_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """System prompts prepended to the first user message, for endpoints without the role."""
    texts = [str(m["content"]) for m in messages if m["role"] == "system" and m["content"]]
    rest = [m for m in messages if m["role"] != "system"]
    if not texts:
        return rest
    prefix = "\n\n".join(texts)
    for m in rest:
        if m["role"] == "user":
            m["content"] = f"{prefix}\n\n{m['content']}" if m["content"] else prefix
            return rest
    return [{"role": "user", "content": prefix}, *rest]


def _text(content: Any) -> str | None:
    """Content as text: a string, or the text parts of a content list."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict)]
        return "".join(str(p) for p in parts)
    return str(content)


def message_from_wire(data: dict[str, Any]) -> Message:
    """An OpenAI-format message dict (request or response side) as a typed Message."""
    calls = []
    for i, raw in enumerate(data.get("tool_calls") or []):
        fn = raw.get("function") or {}
        args = fn.get("arguments")
        if not isinstance(args, str):
            args = json.dumps(args if args is not None else {})
        kept = {
            k: v
            for k, v in raw.items()
            if k not in ("id", "type", "function", "index") and v is not None
        }
        calls.append(
            ToolCall(
                id=str(raw.get("id") or f"call_{i}"),
                name=str(fn.get("name", "")),
                arguments=args,
                provider_fields=kept,
            )
        )
    extra: dict[str, Any] = {}
    if data.get("role") == "assistant":
        # litellm keeps Anthropic thinking blocks on the message and OpenRouter/MiniMax
        # `reasoning_details` under provider_specific_fields; both must be sent back.
        nested = data.get("provider_specific_fields") or {}
        for key in REASONING_FIELDS:
            value = data.get(key) or (nested.get(key) if isinstance(nested, dict) else None)
            if value:
                extra[key] = value
    reasoning = data.get("reasoning_content")
    if not isinstance(reasoning, str) or (reasoning == "" and not calls):
        reasoning = None  # an empty one is kept on tool calls: DeepSeek wants it sent back
    return Message(
        role=data.get("role", "assistant"),
        content=_text(data.get("content")),
        tool_calls=calls,
        tool_call_id=data.get("tool_call_id"),
        name=data.get("name"),
        reasoning_content=reasoning,
        provider_fields=extra,
    )


def tools_to_wire(
    tools: list[ToolSpec] | None, quirks: ResolvedQuirks = DEFAULTS
) -> list[dict[str, Any]] | None:
    if not tools:
        return None
    out = []
    for t in tools:
        params = normalize_schema(t.parameters) if quirks.normalize_tool_schema else t.parameters
        function: dict[str, Any] = {
            "name": t.name,
            "description": t.description,
            "parameters": params,
        }
        if quirks.strict_tools:
            function["strict"] = True
        out.append({"type": "function", "function": function})
    return out


def limit_params(quirks: ResolvedQuirks, max_tokens: int) -> dict[str, Any]:
    """The output-token limit and the reasoning effort, in the fields this endpoint accepts."""
    params: dict[str, Any] = {quirks.max_tokens_param: max_tokens}
    effort = quirks.reasoning_effort
    if effort == "default":
        return params
    how = quirks.reasoning_effort_param
    if how == "reasoning_effort":
        params["reasoning_effort"] = effort
    elif how == "reasoning":
        params["extra_body"] = {"reasoning": {"effort": effort}}
    elif how == "thinking":
        params["extra_body"] = {"thinking": {"type": "enabled"}}
    return params


def tools_from_wire(tools: list[dict[str, Any]] | None) -> list[ToolSpec]:
    out = []
    for t in tools or []:
        fn = t.get("function") or {}
        out.append(
            ToolSpec(
                name=fn.get("name", ""),
                description=fn.get("description", ""),
                parameters=fn.get("parameters") or {},
            )
        )
    return out


def tool_choice_to_wire(choice: str | None) -> str | dict[str, Any] | None:
    """A tool's name forces that tool; the OpenAI keywords pass through."""
    if choice is None or choice in TOOL_CHOICE_KEYWORDS:
        return choice
    return {"type": "function", "function": {"name": choice}}


def tool_choice_from_wire(choice: Any) -> str | None:
    if choice is None or isinstance(choice, str):
        return choice
    if isinstance(choice, dict):
        return str((choice.get("function") or {}).get("name") or choice.get("type"))
    return str(choice)


def _as_dict(obj: Any) -> dict[str, Any]:
    if obj is None:
        return {}
    if isinstance(obj, dict):
        return obj
    dump = getattr(obj, "model_dump", None)
    if callable(dump):
        value = dump()
        if isinstance(value, dict):
            return value
    return dict(getattr(obj, "__dict__", {}))


def usage_from_wire(usage: Any) -> Usage:
    """Usage as flow counts it: cached tokens from OpenAI's `prompt_tokens_details` or, where
    only that is given, Anthropic's `cache_read_input_tokens`."""
    data = _as_dict(usage)
    details = _as_dict(data.get("prompt_tokens_details"))
    cached = int(details.get("cached_tokens") or data.get("cache_read_input_tokens") or 0)
    return Usage(
        prompt_tokens=int(data.get("prompt_tokens") or 0),
        cached_tokens=cached,
        completion_tokens=int(data.get("completion_tokens") or 0),
        cache_write_tokens=int(data.get("cache_creation_input_tokens") or 0),
    )


class MalformedResponse(ValueError):
    """The provider answered 200 with something that is not a chat completion."""


def response_from_wire(response: Any) -> tuple[Message, Usage]:
    """A litellm ModelResponse (or an OpenAI response dict) as a Message and its Usage."""
    data = _as_dict(response)
    choices = data.get("choices") or []
    if not choices:
        raise MalformedResponse("the provider's response has no choices")
    try:
        message = message_from_wire(_as_dict(_as_dict(choices[0]).get("message")))
        usage = usage_from_wire(data.get("usage"))
    except (TypeError, ValueError) as err:
        raise MalformedResponse(f"the provider's response is malformed: {err}") from err
    message.role = "assistant"
    return message, usage


PER_MESSAGE_TOKENS = 16
"""Role markers and separators a chat template adds around each message."""
REQUEST_OVERHEAD_TOKENS = 1024
"""What a provider may add to a request: its own tool-use system prompt, templates."""


def estimate_tokens(
    messages: list[Message], tools: list[ToolSpec] | None, quirks: ResolvedQuirks = DEFAULTS
) -> int:
    """An upper bound on the prompt tokens a provider can bill for this request.

    A byte-level BPE token covers at least one byte, so the UTF-8 size of what is sent —
    measured after the quirks are applied, e.g. tool schemas with their `$ref`s inlined —
    bounds the token count whatever the tokenizer (CJK text included, where characters / 4
    would undercount), plus a per-message and a per-request allowance. A hard cap needs a
    bound, not an average: the price is reservations that are a few times the real cost.
    """
    size = len(json.dumps(messages_to_wire(messages, quirks), ensure_ascii=False).encode())
    if tools:
        sent = tools_to_wire(tools, quirks)
        size += len(json.dumps(sent, ensure_ascii=False).encode())
    return size + PER_MESSAGE_TOKENS * len(messages) + REQUEST_OVERHEAD_TOKENS


TOKENIZER_MARGIN = 1.10
"""A tokenizer's count is multiplied by this (plus the per-message allowances) before it is
used as a bound: the provider adds framing (roles, the tool schema's rendering) that a count
of the JSON we send does not see exactly."""


def prompt_bound(
    litellm_model: str,
    tokenizer: bool,
    messages: list[Message],
    tools: list[ToolSpec] | None,
    quirks: ResolvedQuirks = DEFAULTS,
) -> int:
    """The prompt tokens a call may be billed for: its model's own tokenizer (with a margin)
    where litellm has it offline, never more than the byte bound of `estimate_tokens`."""
    bound = estimate_tokens(messages, tools, quirks)
    if not tokenizer:
        return bound
    try:
        litellm = _load_litellm()
        sent = tools_to_wire(tools, quirks) if tools else None
        counted = litellm.token_counter(
            model=litellm_model, messages=messages_to_wire(messages, quirks), tools=sent
        )
    except Exception:  # no tokenizer after all: the byte bound holds for any tokenizer
        return bound
    margin = int(counted * TOKENIZER_MARGIN) + 1
    return min(bound, margin + PER_MESSAGE_TOKENS * len(messages) + REQUEST_OVERHEAD_TOKENS)


def litellm_cost(
    litellm_model: str, prompt: int, cached: int, completion: int, written: int = 0
) -> float | None:
    """litellm's own price of a reply (size tiers and cache writes included), or None if it
    cannot say."""
    try:
        inp, out = _load_litellm().cost_per_token(
            model=litellm_model,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cache_read_input_tokens=cached,
            cache_creation_input_tokens=written,
        )
    except Exception:
        return None
    return float(inp) + float(out)


def _load_litellm() -> Any:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")
    import litellm

    litellm.suppress_debug_info = True
    litellm.disable_hf_tokenizer_download = True
    return litellm


FIRST_CALL_IMPORTS = (
    "openai.resources",
    "litellm._service_logger",
    "litellm.proxy.openai_files_endpoints",
)
"""What litellm's first call would import on the event loop (~0.6 s, the OpenAI SDK's
resources): imported with litellm instead."""


def _load_for_calls() -> None:
    _load_litellm()
    for name in FIRST_CALL_IMPORTS:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


_loaded = False
_loading: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Future[Any]] = (
    weakref.WeakKeyDictionary()
)


async def warm_up() -> None:
    """Import litellm in a thread, once: the seconds it takes must not hold a provider slot
    or block the event loop that every run shares. Concurrent callers wait for the one
    import rather than each holding a thread of the pool on the import lock."""
    global _loaded
    if _loaded:
        return
    loop = asyncio.get_running_loop()
    loading = _loading.get(loop)
    if loading is None:
        loading = _loading[loop] = asyncio.ensure_future(pools.work(_load_for_calls))
    try:
        await asyncio.shield(loading)
    except Exception:
        _loading.pop(loop, None)  # the next call tries again
        raise
    _loaded = True


async def acompletion(**kwargs: Any) -> Any:
    """litellm.acompletion, imported on first use (the import costs seconds)."""
    litellm = _load_litellm()
    return await litellm.acompletion(**kwargs)


def _tokens(usage: Any) -> int:
    return int(getattr(usage, "prompt_tokens", 0) or 0) + int(
        getattr(usage, "completion_tokens", 0) or 0
    )


STREAM_ABOVE_TOKENS = 16_384
"""`stream: auto` streams a call whose output limit is above this."""


async def acompletion_streamed(**kwargs: Any) -> tuple[Any, bool]:
    """A streamed call, assembled into one response by litellm; the flag says whether the
    stream carried usage (litellm fills in its own estimate when it did not, which is not
    the provider's bill). A stream that stops before its finish reason is a failure."""
    litellm = _load_litellm()
    stream = await litellm.acompletion(
        **kwargs, stream=True, stream_options={"include_usage": True}
    )
    chunks = []
    finished = False
    async for chunk in stream:
        chunks.append(chunk)
        for choice in getattr(chunk, "choices", None) or []:
            finished = finished or bool(getattr(choice, "finish_reason", None))
    # litellm puts a usage of its own counting on the last chunk it yields when the provider
    # sent none; what the provider sent is in the wrapper's record of received chunks.
    received = getattr(stream, "chunks", None)
    usage_seen = any(
        _tokens(getattr(c, "usage", None)) > 0 for c in (chunks if received is None else received)
    )
    if not chunks or not finished:
        raise MalformedResponse("the provider's stream ended before the reply was complete")
    return litellm.stream_chunk_builder(chunks, messages=kwargs.get("messages")), usage_seen


@dataclass(frozen=True)
class Failure:
    """What the door needs to know about a provider failure."""

    status: int | None
    retryable: bool
    auth: bool
    retry_after: float | None
    message: str
    maybe_billed: bool = False
    """No HTTP status came back (timeout, reset, broken body): the provider may have done, and
    billed, the work."""
    unreachable: bool = False
    """No connection was made (refused, unknown host, connect timeout): nothing was sent, and
    `message` says why in the words of the socket."""


def _unreachable(exc: BaseException) -> str | None:
    """Why no connection was made, when that is what happened (litellm reports it as an
    HTTP 500 'Connection error.'; the cause is further down the exception chain). Not a
    reset: litellm's aiohttp transport calls that an `httpx.ConnectError` too."""
    import socket

    import httpx

    seen: set[int] = set()
    link: BaseException | None = exc
    found: str | None = None
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        names = {(c.__module__.split(".")[0], c.__name__) for c in type(link).__mro__}
        if isinstance(link, ConnectionRefusedError):
            return "connection refused"
        if isinstance(link, socket.gaierror):
            return f"unknown host: {link.strerror or link}"
        if isinstance(link, httpx.ConnectTimeout):
            found = found or "timed out while connecting"
        elif ("aiohttp", "ClientConnectorError") in names or ("httpcore", "ConnectError") in names:
            found = found or str(link).split(" ssl:", 1)[0] or "no connection"
        link = link.__cause__ or link.__context__
    return found


def _header(headers: Any, name: str) -> str | None:
    if headers is None:
        return None
    try:
        value = headers.get(name)
    except AttributeError:
        return None
    return None if value is None else str(value)


def parse_retry_after(headers: Any, now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms` / `Retry-After` (seconds or HTTP date), capped."""
    ms = _header(headers, "retry-after-ms")
    seconds: float | None = None
    if ms is not None:
        try:
            seconds = float(ms) / 1000
        except ValueError:
            seconds = None
    raw = _header(headers, "retry-after")
    if seconds is None and raw is not None:
        try:
            seconds = float(raw)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(raw).timestamp()
            except (TypeError, ValueError):
                return None
            seconds = when - (time.time() if now is None else now)
    if seconds is None or math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_CAP_S)


_CUT_OFF = (
    "connection error",
    "peer closed connection",
    "incomplete chunked read",
    "payload is not completed",
    "midstreamfallbackerror",  # litellm: a stream that failed after it began
    # a 200 whose body is not JSON: the provider answered (and billed) but the reply broke
    "expecting value",
    "expecting ',' delimiter",
    "unterminated string",
    "invalid control character",
)


def classify(exc: BaseException) -> Failure | None:
    """Triage a failure of the provider call; None when it is not a provider failure (a bug)."""
    import httpx
    import openai

    status = getattr(exc, "status_code", None)
    status = status if isinstance(status, int) else None
    message = str(getattr(exc, "message", None) or exc)
    why = _unreachable(exc)
    if why is not None:
        return Failure(None, True, False, None, why, unreachable=True)
    if isinstance(
        exc,
        openai.APITimeoutError
        | openai.APIConnectionError
        | httpx.TransportError
        | TimeoutError
        | asyncio.TimeoutError
        | ConnectionError
        | MalformedResponse,
    ):
        # The request may have reached the provider, which then did (and billed) the work;
        # a refused connection never got that far.
        refused = isinstance(exc.__cause__ or exc, ConnectionRefusedError) or (
            "refused" in message.lower()
        )
        return Failure(status, True, False, None, message, maybe_billed=not refused)
    if not isinstance(exc, openai.APIError):
        return None
    if isinstance(exc, openai.RateLimitError):
        status = 429
    elif isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        status = status if status in AUTH_STATUSES else 401
    retry_after = None
    if status == 429:
        # litellm rebuilds `exc.response` without the provider's headers; the real ones are on
        # `litellm_response_headers` (`exc.headers` only carries litellm-proxy hints).
        for headers in (
            getattr(exc, "litellm_response_headers", None),
            getattr(getattr(exc, "response", None), "headers", None),
            getattr(exc, "headers", None),
        ):
            retry_after = parse_retry_after(headers)
            if retry_after is not None:
                break
    return Failure(
        status=status,
        retryable=status in RETRY_STATUSES,
        auth=status in AUTH_STATUSES,
        retry_after=retry_after,
        message=message,
        # litellm reports a connection dropped mid-reply (reset, truncated body or stream)
        # as a 500: the provider did, and billed, the work.
        maybe_billed=any(words in message.lower() for words in _CUT_OFF),
    )
