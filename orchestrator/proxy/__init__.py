"""A per-builder HTTP proxy on 127.0.0.1: an agent CLI's dialect in, flow's model door out.

The CLI holds only a throwaway token for its proxy; the provider key stays behind the door.
Every call goes through `ModelDoor.complete`, so slots, quotas, budget, ledger, quirks and
fallbacks apply as for flow's own builders. Replies are produced whole by the door, so a
streamed answer is synthesized from the complete reply (SSE events sent at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import shutil
import socketserver
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from orchestrator import pools
from orchestrator.errors import AuthenticationFailed, BudgetExceeded, FlowError, ProviderError
from orchestrator.llm.messages import Completion
from orchestrator.protocols import ModelDoor
from orchestrator.proxy import anthropic, chat, responses
from orchestrator.proxy.dialect import Dialect

DIALECTS: dict[str, Dialect] = {
    "/chat/completions": chat.DIALECT,
    "/v1/messages": anthropic.DIALECT,
    anthropic.COUNT_TOKENS: anthropic.DIALECT,
    "/responses": responses.DIALECT,  # Codex posts to {base_url}/responses
}
"""Path suffix -> the dialect served there (one module per dialect in this package)."""


def dialect_for(path: str) -> Dialect | None:
    for suffix in sorted(DIALECTS, key=len, reverse=True):
        if path.endswith(suffix):
            return DIALECTS[suffix]
    return None


_SOCKET_DIR_MAX = 80
"""A Unix socket path has ~108 bytes; the socket is `<dir>/flow-proxy-XXXXXXXX/proxy.sock`."""


class BadRequest(ValueError):
    """A CLI request the dialect cannot translate."""


@dataclass
class CallRecord:
    """One call the CLI made, as the proxy saw it: the truth for turns, tokens and money."""

    path: str
    ok: bool
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    error: str = ""
    shape: dict[str, Any] = field(default_factory=dict)


@dataclass
class ProxyLog:
    calls: list[CallRecord] = field(default_factory=list)
    refused: str = ""
    """Set when the budget refused a call: flow ends the CLI then."""
    key_refused: AuthenticationFailed | None = None
    """Set when the provider refused the key: the run stops once its siblings are done."""
    gave_up: str = ""
    """Set when a call failed after the door's own retries and fallbacks: flow ends the CLI
    then, since a CLI's own retries would only bill the same failure again."""

    @property
    def ok_calls(self) -> int:
        return sum(1 for c in self.calls if c.ok)

    @property
    def failed_calls(self) -> int:
        return sum(1 for c in self.calls if not c.ok)


def request_shape(path: str, body: dict[str, Any]) -> dict[str, Any]:
    """What a CLI sends, without the conversation: for the bench and the log."""
    tools = body.get("tools") or []
    # Responses tools without a name (web_search, local_shell) are shown by their type.
    names = [t.get("name") or (t.get("function") or {}).get("name") or t.get("type") for t in tools]
    return {
        "path": path,
        "stream": bool(body.get("stream")),
        "keys": sorted(body),
        "tools": [n for n in names if n],
    }


class Proxy:
    """Serves one CLI; use as a context manager from inside the run's event loop."""

    def __init__(
        self,
        door: ModelDoor,
        model: str,
        *,
        stage: str,
        scope: str,
        fallbacks: list[str] | None = None,
        on_call: Callable[[ProxyLog], None] | None = None,
        scratch: Path | None = None,
    ):
        self.door, self.model, self.stage, self.scope = door, model, stage, scope
        self.scratch = scratch
        """Where its socket directory goes (the run's own, so a killed run's cleanup takes
        it), when the path is short enough for a Unix socket; else the system's temp."""
        self.fallbacks = list(fallbacks or [])
        self.token = "flow-proxy-" + secrets.token_hex(16)
        self.log = ProxyLog()
        self.refused = threading.Event()
        self.on_call = on_call or (lambda log: None)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._httpd: ThreadingHTTPServer | None = None
        self._unix: socketserver.ThreadingUnixStreamServer | None = None
        self._socket_dir: Path | None = None

    @property
    def socket_path(self) -> Path:
        """The same service on a Unix socket, for a CLI whose sandbox has no network: the
        bridge (proxy/bridge.py) inside it forwards its loopback port here."""
        assert self._socket_dir is not None, "the proxy is not running"
        return self._socket_dir / "proxy.sock"

    @property
    def port(self) -> int:
        assert self._httpd is not None, "the proxy is not running"
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Proxy:
        self._loop = asyncio.get_running_loop()
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        httpd.daemon_threads = True
        httpd.proxy = self  # type: ignore[attr-defined]
        self._httpd = httpd
        short = self.scratch is not None and len(str(self.scratch)) <= _SOCKET_DIR_MAX
        self._socket_dir = Path(
            tempfile.mkdtemp(prefix="flow-proxy-", dir=self.scratch if short else None)
        )
        unix = socketserver.ThreadingUnixStreamServer(str(self.socket_path), _Handler)
        unix.daemon_threads = True
        unix.proxy = self  # type: ignore[attr-defined]
        self._unix = unix
        for server in (httpd, unix):
            threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            ).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for server in (self._httpd, self._unix):
            if server is not None:
                await pools.work(server.shutdown)
                server.server_close()
        self._httpd = self._unix = None
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    def authorized(self, headers: Any) -> bool:
        given = headers.get("Authorization", "") or ""
        bearer = given[7:] if given.lower().startswith("bearer ") else given
        return self.token in (bearer, headers.get("x-api-key", ""))

    def complete(self, dialect: Dialect, body: dict[str, Any]) -> Completion:
        """Run one door call on the run's loop (called from a server thread)."""
        assert self._loop is not None
        try:
            messages, tools, choice = dialect.request(body)
        except Exception as err:  # the CLI's request, not the provider: a 400 for the CLI
            raise BadRequest(f"cannot read the {dialect.name} request: {err}") from err
        future = asyncio.run_coroutine_threadsafe(
            self.door.complete(
                self.model,
                messages,
                stage=self.stage,
                tools=tools or None,
                tool_choice=choice,
                scope=self.scope,
                fallbacks=self.fallbacks,
            ),
            self._loop,
        )
        return future.result()

    def record(self, record: CallRecord) -> None:
        self.log.calls.append(record)
        self.on_call(self.log)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def _reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def handle(self) -> None:
        # A CLI ended mid-call (budget, time limit) drops its connection: nothing to report.
        with contextlib.suppress(ConnectionError, TimeoutError):
            super().handle()

    def do_HEAD(self) -> None:
        # Claude Code probes the base URL once before its first call.
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        proxy: Proxy = self.server.proxy  # type: ignore[attr-defined]
        if self.path.rstrip("/").endswith("/models"):
            self._reply(200, json.dumps(chat.models_list(proxy.model)).encode())
            return
        self._error(chat.DIALECT, 404, "not found", "not_found_error")

    def do_POST(self) -> None:
        proxy: Proxy = self.server.proxy  # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0].rstrip("/")
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        dialect = dialect_for(path) or chat.DIALECT
        if not proxy.authorized(self.headers):
            self._error(dialect, 401, "bad proxy token", "authentication_error")
            return
        if dialect_for(path) is None:
            self._error(dialect, 404, f"no route {path}", "not_found_error")
            return
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            self._error(dialect, 400, "request body is not JSON", "invalid_request_error")
            return
        local = dialect.local(path, body)
        if local is not None:  # answered here, no model call (e.g. counting tokens)
            self._reply(200, json.dumps(local).encode())
            return
        shape = request_shape(path, body)
        try:
            completion = proxy.complete(dialect, body)
        except BudgetExceeded as err:
            proxy.log.refused = str(err)
            proxy.record(CallRecord(path, ok=False, error=str(err), shape=shape))
            proxy.refused.set()
            # 400, not 429: a CLI retries a 429 for minutes; a refusal is final.
            self._error(dialect, 400, f"budget: {err}", "invalid_request_error")
            return
        except BadRequest as err:
            proxy.record(CallRecord(path, ok=False, error=str(err)[:300], shape=shape))
            self._error(dialect, 400, str(err)[:300], "invalid_request_error")
            return
        except (ProviderError, FlowError) as err:
            status_of = getattr(err, "status", None)
            if isinstance(err, AuthenticationFailed):
                proxy.log.key_refused = err
                proxy.refused.set()  # no later call can succeed: end the CLI now
            elif status_of is None or status_of in (408, 429) or status_of >= 500:
                # Retryable, and the door already retried (and tried the fallbacks): the
                # CLI's own retries would only bill the same failure again, so end it. A
                # request error (a 4xx such as a prompt too long) goes back to the CLI, which
                # may compact and try again.
                proxy.log.gave_up = str(err)[:300]
                proxy.refused.set()
            proxy.record(CallRecord(path, ok=False, error=str(err)[:300], shape=shape))
            status = int(getattr(err, "status", None) or 502)
            self._error(dialect, status, str(err)[:300], "api_error")
            return
        except Exception as err:  # never a dead handler thread: the CLI gets an answer
            proxy.record(CallRecord(path, ok=False, error=repr(err)[:300], shape=shape))
            self._error(dialect, 500, f"flow's proxy failed: {err!r}"[:300], "api_error")
            return
        proxy.record(
            CallRecord(
                path,
                ok=True,
                prompt_tokens=completion.usage.prompt_tokens,
                completion_tokens=completion.usage.completion_tokens,
                cost_usd=completion.cost_usd,
                shape=shape,
            )
        )
        if body.get("stream"):
            self._reply(200, dialect.sse(completion, body), "text/event-stream")
        else:
            self._reply(200, json.dumps(dialect.response(completion, body)).encode())

    def _error(self, dialect: Dialect, status: int, message: str, kind: str) -> None:
        self._reply(status, json.dumps(dialect.error(message, kind)).encode())
