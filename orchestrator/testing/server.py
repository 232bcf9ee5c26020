"""A chat server on 127.0.0.1, for testing the real HTTP path through litellm.

    with ChatServer(scripted_handler({"glm-4.7": model}), latency_s=0.1) as srv:
        ...  # call "openai/glm-4.7" with api_base=srv.base_url

The handler maps a request's JSON to a response dict, or to a ServerReply sent as-is
(status, body, headers) to inject faults such as 429 with Retry-After or 500.

`rules` make the server behave like a particular provider: each looks at a request and,
when it breaks that provider's rule, answers 400 with the provider's own error body. With
`protocol="anthropic"` the server speaks the Anthropic Messages API instead
(`orchestrator.testing.anthropic`); `base_url` is then what litellm's `anthropic/` wants.

With `prices` the server keeps its own bill, as a provider would, independent of the `usage`
it reports: `server_tokens` counts what it received and sent, every request that reached a
handler is billed (a reply without usage too), and one whose reply never arrived whole (hang,
reset, truncate: the client gave up or was cut off) is billed at the output the request
allowed, since the provider would have generated it. Output is never billed past the
request's own output limit, as no provider generates past it. `tier` (above_tokens, input,
output) bills a prompt of more than `above_tokens` at the higher prices, as long-context
models do. With `own_usage` the server reports its own count as the reply's `usage` (a real
provider's usage is its bill), unless the handler left usage out on purpose (`usage: None`).
Tests compare `billed_usd` with caps.
"""

from __future__ import annotations

import itertools
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

from orchestrator.llm import wire
from orchestrator.llm.scripted import ScriptedModel


@dataclass
class ServerReply:
    """A raw HTTP reply: sent exactly as given, or broken on purpose by `fault`."""

    status: int
    body: dict[str, Any] | str | bytes = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    fault: Literal["hang", "reset", "truncate"] | None = None
    """hang: never answer (until the server stops); reset: drop the connection with a TCP
    reset before answering; truncate: promise the whole body, send half, close."""
    events: list[bytes] | None = None
    """A streamed reply's events, sent `stream_gap_s` apart (the body is all of them)."""


def server_tokens(value: Any) -> int:
    """The server's own token count: one token per 4 UTF-8 bytes of the JSON, rounded up.

    Deterministic and independent of flow's estimate; close to what BPE tokenizers give for
    English and code (3.5-4.5 bytes a token)."""
    if value is None:
        return 0
    data = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return -(-len(data.encode()) // 4)


def _allowed_output(request: dict[str, Any]) -> int:
    for key in ("max_completion_tokens", "max_tokens"):
        value = request.get(key)
        if isinstance(value, int):
            return value
    return 0


def sse_events(body: dict[str, Any], include_usage: bool) -> list[bytes]:
    """A chat completion as the server-sent events of a streamed reply: the content in
    pieces, each tool call in two (name, then its arguments), the finish reason, the usage
    when the request asked for it (and the reply has one), then [DONE]."""
    base = {k: body.get(k) for k in ("id", "created", "model")}
    base["object"] = "chat.completion.chunk"
    choice = (body.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
    if message.get("reasoning_content"):
        deltas.append({"reasoning_content": message["reasoning_content"]})
    text = message.get("content") or ""
    deltas += [{"content": text[i : i + 64]} for i in range(0, len(text), 64)]
    for i, call in enumerate(message.get("tool_calls") or []):
        fn = call.get("function") or {}
        head = {"index": i, "id": call.get("id"), "type": "function"}
        deltas.append(
            {"tool_calls": [{**head, "function": {"name": fn.get("name"), "arguments": ""}}]}
        )
        deltas.append(
            {"tool_calls": [{"index": i, "function": {"arguments": fn.get("arguments", "")}}]}
        )
    chunks = [
        {**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas
    ]
    finish = choice.get("finish_reason") or "stop"
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    if include_usage and body.get("usage"):
        chunks.append({**base, "choices": [], "usage": body["usage"]})
    return [b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"]


Handler = Callable[[dict[str, Any]], "dict[str, Any] | ServerReply"]
Rule = Callable[[dict[str, Any]], "ServerReply | None"]
"""A provider's rule: None when the request keeps it, else the provider's 400."""
Protocol = Literal["openai", "anthropic"]
ROUTES: dict[Protocol, tuple[str, ...]] = {
    "openai": ("/v1/chat/completions", "/chat/completions"),
    "anthropic": ("/anthropic/v1/messages", "/v1/messages"),
}


def error_body(message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": None}}


def anthropic_error(message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    """The Anthropic API's error body."""
    return {
        "type": "error",
        "error": {"type": kind, "message": message},
        "request_id": "req_011CTestRequest",
    }


def chat_response(
    model: str, message: dict[str, Any], usage: dict[str, Any], response_id: str = "chatcmpl-test"
) -> dict[str, Any]:
    """A complete non-streaming OpenAI chat completion."""
    finish = "tool_calls" if message.get("tool_calls") else "stop"
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": usage,
    }


def scripted_handler(scripts: dict[str, ScriptedModel]) -> Handler:
    """Route each request by its `model` field to a scripted model and answer in OpenAI shape."""
    counter = itertools.count(1)

    def handle(request: dict[str, Any]) -> dict[str, Any] | ServerReply:
        name = str(request.get("model", ""))
        model = scripts.get(name)
        if model is None:
            return ServerReply(404, error_body(f"The model `{name}` does not exist", "not_found"))
        # The scripted model sees a developer prompt as the system prompt it is.
        messages = [
            wire.message_from_wire({**m, "role": "system"} if m.get("role") == "developer" else m)
            for m in request.get("messages") or []
        ]
        tools = wire.tools_from_wire(request.get("tools"))
        choice = wire.tool_choice_from_wire(request.get("tool_choice"))
        message, usage = model.reply(messages, tools, choice)
        body = wire.message_to_wire(message)
        body["role"] = "assistant"
        return chat_response(
            name,
            body,
            {
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "total_tokens": usage.prompt_tokens + usage.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
            },
            response_id=f"chatcmpl-{next(counter)}",
        )

    return handle


class _RequestHandler(BaseHTTPRequestHandler):
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        return None  # keep test output quiet

    def _send(self, reply: ServerReply) -> None:
        if reply.fault == "hang":
            self.server.owner.stopping.wait()
            return
        if reply.fault == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        body = reply.body
        if isinstance(body, dict):
            data = json.dumps(body).encode()
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = body
        self.send_response(reply.status)
        headers = {"Content-Type": "application/json"}
        headers.update(reply.headers)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        gap = self.server.owner.stream_gap_s
        if reply.events and gap and reply.fault is None:
            for event in reply.events:  # the model generating as it goes
                self.wfile.write(event)
                self.wfile.flush()
                time.sleep(gap)
            return
        if reply.fault == "truncate":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(data)

    def do_POST(self) -> None:
        owner = self.server.owner
        if self.path.rstrip("/") not in ROUTES[owner.protocol]:
            self._send(ServerReply(404, owner.error(f"no route {self.path}", "not_found")))
            return
        length = int(self.headers.get("Content-Length") or 0)
        given = self.headers.get("Authorization") or self.headers.get("x-api-key") or ""
        owner.authorizations.append(given)
        key = given[7:] if given.lower().startswith("bearer ") else given
        if owner.keys is not None and key not in owner.keys:
            self.rfile.read(length)
            with owner._lock:
                owner.unauthorized += 1
            self._send(ServerReply(401, owner.error("Incorrect API key provided", "auth_error")))
            return
        try:
            request = json.loads(self.rfile.read(length) or b"{}")
        except json.JSONDecodeError:
            self._send(ServerReply(400, owner.error("request body is not JSON")))
            return
        reply = owner.serve(request)
        try:
            self._send(reply)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (cancelled)
            self.close_connection = True


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    owner: ChatServer


class ChatServer:
    """A threaded local chat server (one protocol per server); use as a context manager."""

    def __init__(
        self,
        handler: Handler,
        *,
        rules: Sequence[Rule] = (),
        protocol: Protocol = "openai",
        latency_s: float = 0.0,
        max_concurrency: int | None = None,
        retry_after_s: float = 1.0,
        prices: tuple[float, float] | None = None,
        tier: tuple[int, float, float] | None = None,
        own_usage: bool = False,
        stream_gap_s: float = 0.0,
        keys: Sequence[str] | None = None,
    ):
        self.handler = handler
        self.keys = None if keys is None else set(keys)
        """The API keys it accepts; a request with another is answered 401, as a provider
        does, and neither served nor billed. None: any key."""
        self.unauthorized = 0
        self.prices = prices
        """USD per input and per output token for the server's own bill."""
        self.tier = tier
        self.stream_gap_s = stream_gap_s
        self.own_usage = own_usage
        self.bill_of: list[tuple[dict[str, Any], float]] = []
        """Each billed request with what it was billed, in billing order."""
        self.billed_usd = 0.0
        self.bills: list[float] = []
        self.rules = list(rules)
        self.protocol: Protocol = protocol
        self.refused: list[ServerReply] = []
        self.latency_s = latency_s
        self.max_concurrency = max_concurrency
        self.retry_after_s = retry_after_s
        self.requests: list[dict[str, Any]] = []
        self.authorizations: list[str] = []
        """The key each request carried (Authorization or x-api-key), for key-flow tests."""
        self.rejected = 0
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self.stopping = threading.Event()
        """Set when the server stops; hung replies wait for it."""
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the server is not running")
        root = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        # litellm appends /chat/completions to an OpenAI base and /v1/messages to an
        # Anthropic one; MiniMax and Kimi serve the latter under …/anthropic.
        return f"{root}/anthropic" if self.protocol == "anthropic" else f"{root}/v1"

    def error(self, message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
        """An error body in this server's protocol."""
        if self.protocol == "anthropic":
            return anthropic_error(message, kind)
        return error_body(message, kind)

    def start(self) -> ChatServer:
        httpd = _HTTPServer(("127.0.0.1", 0), _RequestHandler)
        httpd.owner = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="chat-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = self._thread = None

    def __enter__(self) -> ChatServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _bill(self, request: dict[str, Any], reply: ServerReply) -> None:
        """What a provider charges for one request the model worked on."""
        if self.prices is None or (reply.status != 200 and reply.fault is None):
            return
        prompt = server_tokens(
            [request.get("system"), request.get("messages"), request.get("tools")]
        )
        allowed = _allowed_output(request)
        if reply.fault is not None or not isinstance(reply.body, dict):
            output = allowed
        else:
            output = server_tokens(reply.body.get("choices") or reply.body.get("content"))
            output = min(output, allowed) if allowed else output
            if (
                self.own_usage
                and self.protocol == "openai"
                and reply.body.get("usage", {}) is not None
            ):
                reply.body["usage"] = {
                    "prompt_tokens": prompt,
                    "completion_tokens": output,
                    "total_tokens": prompt + output,
                }
        inp, out = self.prices
        if self.tier is not None and prompt > self.tier[0]:
            inp, out = self.tier[1], self.tier[2]
        amount = prompt * inp + output * out
        with self._lock:
            self.bills.append(amount)
            self.bill_of.append((request, amount))
            self.billed_usd += amount

    def serve(self, request: dict[str, Any]) -> ServerReply:
        """Answer one decoded request (runs on a server thread)."""
        with self._lock:
            self.requests.append(request)
            if self.max_concurrency is not None and self._in_flight >= self.max_concurrency:
                self.rejected += 1
                return ServerReply(
                    429,
                    self.error(
                        "Rate limit reached: too many requests in flight", "rate_limit_exceeded"
                    ),
                    {"Retry-After": f"{self.retry_after_s:g}"},
                )
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            if request.get("stream") and self.protocol != "openai":
                return ServerReply(
                    400, self.error("this test server streams only chat completions")
                )
            for rule in self.rules:
                refusal = rule(request)
                if refusal is not None:
                    with self._lock:
                        self.refused.append(refusal)
                    return refusal
            if self.latency_s:
                time.sleep(self.latency_s)  # simulated model work, not synchronisation
            reply = self.handler(request)
            reply = reply if isinstance(reply, ServerReply) else ServerReply(200, reply)
            self._bill(request, reply)
            if request.get("stream") and reply.status == 200 and isinstance(reply.body, dict):
                usage = bool((request.get("stream_options") or {}).get("include_usage"))
                events = sse_events(reply.body, usage)
                headers = {"Content-Type": "text/event-stream"}
                return ServerReply(200, b"".join(events), headers, reply.fault, events)
            return reply
        except Exception as err:  # a broken handler becomes a visible 500, not a hung client
            return ServerReply(500, self.error(f"handler failed: {err!r}", "server_error"))
        finally:
            with self._lock:
                self._in_flight -= 1
                if not self._in_flight:
                    self._idle.notify_all()

    def wait_idle(self, timeout_s: float = 10.0) -> bool:
        """Wait until no request is being worked on (each one's bill is then written)."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._in_flight, timeout=timeout_s)


# ---- provider rules (OpenAI-compatible endpoints) ------------------------------------------
# Each answers the way the real provider does; the texts come from public reports of the
# provider's 400s (cited per rule). Envelope shapes follow the same reports.

ReasoningStyle = Literal["deepseek", "moonshot", "minimax", "zhipu"]


def _reasoning_refusal(style: ReasoningStyle, index: int) -> ServerReply:
    if style == "deepseek":
        # DeepSeek thinking mode; reported in hotovo/aider-desk#529, continuedev/continue#9831.
        message = (
            f"Missing `reasoning_content` field in the assistant message at message index "
            f"{index}. For more information, please refer to "
            "https://api-docs.deepseek.com/guides/thinking_mode#tool-calls"
        )
        body: dict[str, Any] = {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_request_error",
            }
        }
        return ServerReply(400, body)
    # Kimi (cloudwego/eino-ext#700, mastra-ai/mastra#12592); the same text is reported for
    # GLM-5.1 (QuantumNous/new-api#4408). MiniMax's own wording is not public: the issue's.
    message = (
        f"thinking is enabled but reasoning_content is missing in assistant tool call message "
        f"at index {index}"
    )
    if style == "minimax":
        body = {
            "error": {"message": message, "type": "bad_request_error", "param": "", "code": None}
        }
    elif style == "zhipu":
        body = {"error": {"message": message, "type": "invalid_request_error"}, "type": "error"}
    else:
        body = {"error": {"message": message, "type": "invalid_request_error"}}
    return ServerReply(400, body)


def requires_reasoning(style: ReasoningStyle) -> Rule:
    """Thinking is on: every assistant tool-call message must carry its `reasoning_content`."""

    def rule(request: dict[str, Any]) -> ServerReply | None:
        for i, m in enumerate(request.get("messages") or []):
            tool_turn = m.get("role") == "assistant" and m.get("tool_calls")
            if tool_turn and m.get("reasoning_content") is None:
                return _reasoning_refusal(style, i)
        return None

    return rule


def _mfjs_problem(node: Any, path: str, defs: dict[str, Any]) -> tuple[str, str] | None:
    """The first thing Moonshot's "flavored JSON schema" validator rejects, as (path, problem)."""
    if not isinstance(node, dict):
        return None
    where = path or "root"
    ref = node.get("$ref")
    if isinstance(ref, str):
        if not ref.startswith("#/$defs/"):
            return f"{path}.$ref".lstrip("."), "references must start with #/$defs/"
        if ref.removeprefix("#/$defs/") not in defs:
            return f"{path}.$ref".lstrip("."), f"$defs not found for reference: {ref}"
        extra = sorted(k for k in node if k != "$ref")
        if extra:
            return where, f"conflicting keywords found after $ref expansion: {extra[0]}"
        return None
    branches = [k for k in ("anyOf", "oneOf") if isinstance(node.get(k), list)]
    if branches and "type" in node:
        return (
            where,
            "when using anyOf, type should be defined in anyOf items instead of the parent schema",
        )
    if not branches and "type" not in node:
        return where, "type is not defined"
    children: list[tuple[str, Any]] = []
    for name, sub in (node.get("properties") or {}).items():
        children.append((f"{path}.properties.{name}".lstrip("."), sub))
    if isinstance(node.get("items"), dict):
        children.append((f"{path}.items".lstrip("."), node["items"]))
    for key in branches:
        children += [(f"{path}.{key}.{i}".lstrip("."), b) for i, b in enumerate(node[key])]
    for sub_path, sub in children:
        found = _mfjs_problem(sub, sub_path, defs)
        if found is not None:
            return found
    return None


def moonshot_tool_schemas() -> Rule:
    """Moonshot validates tool parameters as "Moonshot flavored JSON schema"."""

    def rule(request: dict[str, Any]) -> ServerReply | None:
        for tool in request.get("tools") or []:
            params = (tool.get("function") or {}).get("parameters") or {}
            if params.get("type") != "object":
                # Reported in 14790897/MiqroForge-Desktop#1165 (a control request to Moonshot).
                message = 'tools.function.parameters.type is required and must be "object"'
            else:
                defs = params.get("$defs")
                found = _mfjs_problem(params, "", defs if isinstance(defs, dict) else {})
                if found is None:
                    continue
                # MoonshotAI/kimi-cli#2030, CommandCodeAI/command-code#566 and #594,
                # nicobailon/pi-subagents#127 (the last names the envelope).
                message = (
                    "Invalid request: tools.function.parameters is not a valid moonshot "
                    f"flavored json schema, details: <At path '{found[0]}': {found[1]}>"
                )
            return ServerReply(
                400, {"error": {"message": message, "type": "invalid_request_error"}}
            )
        return None

    return rule


def rejects_strict() -> Rule:
    """A Gemini-backed gateway: `strict` is not a field of a function declaration."""

    def rule(request: dict[str, Any]) -> ServerReply | None:
        for i, tool in enumerate(request.get("tools") or []):
            if "strict" in (tool.get("function") or {}):
                # router-for-me/CLIProxyAPI#102, GewoonJaap/gemini-cli-openai#157.
                message = (
                    'Invalid JSON payload received. Unknown name "strict" at '
                    f"'request.tools[0].function_declarations[{i}]': Cannot find field."
                )
                body = {"error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT"}}
                return ServerReply(400, body)
        return None

    return rule


def rejects_max_tokens() -> Rule:
    """OpenAI reasoning models (o-series, gpt-5): only `max_completion_tokens`."""

    def rule(request: dict[str, Any]) -> ServerReply | None:
        if "max_tokens" not in request:
            return None
        # griptape-ai/ComfyUI-Griptape#312, ITSpecialist111/ai_automation_suggester#38.
        message = (
            "Unsupported parameter: 'max_tokens' is not supported with this model. "
            "Use 'max_completion_tokens' instead."
        )
        body = {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": "max_tokens",
                "code": "unsupported_parameter",
            }
        }
        return ServerReply(400, body)

    return rule


def rejects_argument(name: str) -> Rule:
    """OpenAI's answer to a body field the model does not take (e.g. `reasoning_effort`)."""

    def rule(request: dict[str, Any]) -> ServerReply | None:
        if name not in request:
            return None
        # davidmigloz/langchain_dart#712, AAswordman/Operit#1048 (gpt-4o, reasoning_effort).
        message = f"Unrecognized request argument supplied: {name}"
        body = {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        }
        return ServerReply(400, body)

    return rule


def rejects_role(role: Literal["developer", "system"]) -> Rule:
    """`developer`: a gateway that knows only the classic roles; `system`: vLLM serving Gemma."""

    def rule(request: dict[str, Any]) -> ServerReply | None:
        for i, m in enumerate(request.get("messages") or []):
            if m.get("role") != role:
                continue
            if role == "system":
                # vllm-project/vllm#2964 (Gemma's chat template raises it).
                body: dict[str, Any] = {
                    "object": "error",
                    "message": "System role not supported",
                    "type": "BadRequestError",
                    "param": None,
                    "code": 400,
                }
            else:
                # QuantumNous/new-api#5330 (a gateway in front of gpt-5.4).
                message = (
                    f"invalid parameter 'messages[{i}].role': invalid role 'developer', "
                    "must be one of: system, user, assistant, tool"
                )
                body = {
                    "error": {
                        "message": message,
                        "type": "gateway_error",
                        "param": "",
                        "code": "400002",
                    }
                }
            return ServerReply(400, body)
        return None

    return rule
