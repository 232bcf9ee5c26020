"""An OpenAI-compatible chat server on 127.0.0.1, for testing the real HTTP path through litellm.

    with ChatServer(scripted_handler({"glm-4.7": model}), latency_s=0.1) as srv:
        ...  # call "openai/glm-4.7" with api_base=srv.base_url

The handler maps a request's JSON to a response dict, or to a ServerReply sent as-is
(status, body, headers) to inject faults such as 429 with Retry-After or 500.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from orchestrator.llm import wire
from orchestrator.llm.scripted import ScriptedModel


@dataclass
class ServerReply:
    """A raw HTTP reply: sent exactly as given."""

    status: int
    body: dict[str, Any] | str | bytes = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[dict[str, Any]], "dict[str, Any] | ServerReply"]


def error_body(message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": None}}


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
        messages = [wire.message_from_wire(m) for m in request.get("messages") or []]
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
        body = reply.body
        if isinstance(body, dict):
            data = json.dumps(body).encode()
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = body
        self.send_response(reply.status)
        headers = {"Content-Type": "application/json", **reply.headers}
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        owner = self.server.owner
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            self._send(ServerReply(404, error_body(f"no route {self.path}", "not_found")))
            return
        length = int(self.headers.get("Content-Length") or 0)
        try:
            request = json.loads(self.rfile.read(length) or b"{}")
        except json.JSONDecodeError:
            self._send(ServerReply(400, error_body("request body is not JSON")))
            return
        self._send(owner.serve(request))


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    owner: ChatServer


class ChatServer:
    """A threaded local chat-completions server; use as a context manager."""

    def __init__(
        self,
        handler: Handler,
        *,
        latency_s: float = 0.0,
        max_concurrency: int | None = None,
        retry_after_s: float = 1.0,
    ):
        self.handler = handler
        self.latency_s = latency_s
        self.max_concurrency = max_concurrency
        self.retry_after_s = retry_after_s
        self.requests: list[dict[str, Any]] = []
        self.rejected = 0
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the server is not running")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

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

    def serve(self, request: dict[str, Any]) -> ServerReply:
        """Answer one decoded request (runs on a server thread)."""
        with self._lock:
            self.requests.append(request)
            if self.max_concurrency is not None and self._in_flight >= self.max_concurrency:
                self.rejected += 1
                return ServerReply(
                    429,
                    error_body(
                        "Rate limit reached: too many requests in flight", "rate_limit_exceeded"
                    ),
                    {"Retry-After": f"{self.retry_after_s:g}"},
                )
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            if request.get("stream"):
                return ServerReply(
                    400, error_body("this test server does not stream; call without stream=true")
                )
            if self.latency_s:
                time.sleep(self.latency_s)  # simulated model work, not synchronisation
            reply = self.handler(request)
            return reply if isinstance(reply, ServerReply) else ServerReply(200, reply)
        except Exception as err:  # a broken handler becomes a visible 500, not a hung client
            return ServerReply(500, error_body(f"handler failed: {err!r}", "server_error"))
        finally:
            with self._lock:
                self._in_flight -= 1
