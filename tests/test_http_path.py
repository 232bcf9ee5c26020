"""The real HTTP path: Door → litellm → an OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.budget import Budget, Cap
from orchestrator.config import LoadedConfig, parse_config
from orchestrator.errors import ProviderError
from orchestrator.ledger import Ledger
from orchestrator.llm.door import Door
from orchestrator.llm.messages import Message, ToolSpec, Usage
from orchestrator.llm.scripted import ScriptedModel
from orchestrator.protocols import ListSink
from orchestrator.testing import ChatServer, ServerReply, scripted_handler

KEY = "sk-local-test-0123456789"
WRITE = ToolSpec(
    name="write_file",
    description="write a file",
    parameters={"type": "object", "properties": {"path": {"type": "string"}}},
)
USAGE = Usage(prompt_tokens=1234, cached_tokens=1000, completion_tokens=56)


def brain(messages: list[Message], tools: list[ToolSpec], choice: str | None) -> object:
    turn = sum(1 for m in messages if m.role == "assistant")
    if turn == 0:
        reply = {
            "reasoning_content": "I should write a.py first.",
            "tool_calls": [{"name": "write_file", "arguments": {"path": "a.py"}}],
        }
    else:
        reply = {"content": "done"}
    return reply, USAGE


def glm() -> ScriptedModel:
    return ScriptedModel("glm", brain)


def http_config(base_url: str, retries: int = 3) -> LoadedConfig:
    return parse_config(
        {
            "providers": {
                "local": {
                    "api": "openai",
                    "base_url": base_url,
                    "api_key": "LOCAL_TEST_KEY",
                    "max_concurrency": 2,
                    "retries": retries,
                    "timeout_s": 30,
                }
            },
            "models": {
                "glm": {
                    "provider": "local",
                    "id": "glm-4.7",
                    "max_output_tokens": 2000,
                    "price": {"input": 0.6, "output": 2.2, "cached_input": 0.11},
                }
            },
            "stages": {"planner": {"model": "glm"}, "builders": [{"model": "glm"}]},
        }
    )


@pytest.fixture(autouse=True)
def key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_TEST_KEY", KEY)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger(tmp_path / "ledger.db") as opened:
        yield opened


def convo() -> list[Message]:
    return [Message.system("You build."), Message.user("Make a.py")]


def fail_first(replies: list[ServerReply]) -> Any:
    """A handler that sends `replies` first, then answers with the scripted model."""
    pending = list(replies)
    ok = scripted_handler({"glm-4.7": glm()})

    def handle(request: dict[str, Any]) -> dict[str, Any] | ServerReply:
        return pending.pop(0) if pending else ok(request)

    return handle


async def test_request_response_and_exact_cost(ledger: Ledger) -> None:
    with ChatServer(scripted_handler({"glm-4.7": glm()})) as srv:
        cap = Cap("run", 1.0)
        door = Door(http_config(srv.base_url), run_id="r", ledger=ledger, budget=Budget([cap]))
        done = await door.complete(
            "glm", convo(), stage="build", tools=[WRITE], tool_choice="write_file"
        )
    [request] = srv.requests
    assert request["model"] == "glm-4.7"
    assert request["tools"] == [{"type": "function", "function": WRITE.model_dump()}]
    assert request["tool_choice"] == {"type": "function", "function": {"name": "write_file"}}
    assert request["max_tokens"] == 2000 and not request.get("stream")
    [call] = done.message.tool_calls
    assert (call.id, call.name, call.parsed()) == ("call_0_0", "write_file", {"path": "a.py"})
    assert done.message.reasoning_content == "I should write a.py first."
    assert done.usage == USAGE
    expected = (234 * 0.6 + 1000 * 0.11 + 56 * 2.2) / 1_000_000
    assert done.cost_usd == pytest.approx(expected, rel=1e-12)
    [row] = ledger.rows()
    assert (row.outcome, row.provider, row.cached_tokens) == ("ok", "local", 1000)
    assert row.cost_usd == pytest.approx(expected, rel=1e-12)
    assert cap.spent_usd == pytest.approx(expected, rel=1e-12) and cap.reserved_usd == 0


async def test_reasoning_content_is_sent_back_next_turn() -> None:
    with ChatServer(scripted_handler({"glm-4.7": glm()})) as srv:
        door = Door(http_config(srv.base_url), run_id="r")
        first = await door.complete("glm", convo(), stage="build", tools=[WRITE])
        call = first.message.tool_calls[0]
        turn2 = [*convo(), first.message, Message.tool(call.id, call.name, "wrote a.py")]
        second = await door.complete("glm", turn2, stage="build", tools=[WRITE])
    assert second.message.content == "done"
    sent = srv.requests[1]["messages"]
    assert sent[2]["role"] == "assistant"
    assert sent[2]["reasoning_content"] == "I should write a.py first."
    assert sent[2]["tool_calls"][0]["id"] == call.id
    assert sent[3] == {"role": "tool", "tool_call_id": call.id, "content": "wrote a.py"}


async def test_429_waits_for_retry_after_and_bills_once(ledger: Ledger) -> None:
    limited = ServerReply(
        429, {"error": {"message": "slow down", "type": "rate_limit"}}, {"Retry-After": "1"}
    )
    sink = ListSink()
    with ChatServer(fail_first([limited])) as srv:
        cap = Cap("run", 1.0)
        door = Door(
            http_config(srv.base_url), run_id="r", ledger=ledger, budget=Budget([cap]), events=sink
        )
        start = time.monotonic()
        done = await door.complete("glm", convo(), stage="build", tools=[WRITE])
        waited = time.monotonic() - start
    assert len(srv.requests) == 2
    assert waited >= 0.95
    assert [r.outcome for r in ledger.rows()] == ["retry", "ok"]
    assert ledger.rows()[0].cost_usd == 0 and "slow down" in (ledger.rows()[0].error or "")
    assert cap.spent_usd == pytest.approx(done.cost_usd) and cap.reserved_usd == 0
    assert any(e.kind == "notice" and "429" in getattr(e, "message", "") for e in sink.events)


async def test_500_then_success(ledger: Ledger) -> None:
    broken = ServerReply(500, {"error": {"message": "internal", "type": "server_error"}})
    with ChatServer(fail_first([broken, broken])) as srv:
        door = Door(http_config(srv.base_url), run_id="r", ledger=ledger)
        door.backoff_base_s = 0.05  # the policy is under test, not the wall clock
        done = await door.complete("glm", convo(), stage="build")
    assert done.message.tool_calls and len(srv.requests) == 3
    assert [r.outcome for r in ledger.rows()] == ["retry", "retry", "ok"]


async def test_retries_run_out(ledger: Ledger) -> None:
    busy = ServerReply(503, {"error": {"message": "overloaded", "type": "server_error"}})
    with ChatServer(fail_first([busy] * 5)) as srv:
        door = Door(http_config(srv.base_url, retries=2), run_id="r", ledger=ledger)
        door.backoff_base_s = 0.01
        with pytest.raises(ProviderError) as err:
            await door.complete("glm", convo(), stage="build")
    assert err.value.retryable and err.value.status == 503
    assert len(srv.requests) == 3
    assert [r.outcome for r in ledger.rows()] == ["retry", "retry", "error"]


async def test_401_is_not_retried_and_names_the_variable_not_the_key(ledger: Ledger) -> None:
    denied = ServerReply(
        401,
        {
            "error": {
                "message": f"Incorrect API key provided: {KEY}",
                "type": "invalid_request_error",
            }
        },
    )
    with ChatServer(fail_first([denied])) as srv:
        door = Door(http_config(srv.base_url), run_id="r", ledger=ledger)
        with pytest.raises(ProviderError) as err:
            await door.complete("glm", convo(), stage="build")
    assert len(srv.requests) == 1
    assert not err.value.retryable and err.value.status == 401
    assert "LOCAL_TEST_KEY" in str(err.value) and KEY not in str(err.value)
    [row] = ledger.rows()
    assert row.outcome == "error" and KEY not in (row.error or "")


async def test_in_flight_limit_holds_at_the_server(ledger: Ledger) -> None:
    with ChatServer(scripted_handler({"glm-4.7": glm()}), latency_s=0.2) as srv:
        door = Door(http_config(srv.base_url), run_id="r", ledger=ledger)
        results = await asyncio.gather(
            *(
                door.complete("glm", [Message.user(f"task {i}")], stage=f"build.{i}")
                for i in range(6)
            )
        )
    assert len(results) == 6 and all(r.message.tool_calls for r in results)
    assert len(srv.requests) == 6 and srv.rejected == 0
    assert srv.max_in_flight <= 2
    assert door.limiter.max_seen("local") == 2 and door.limiter.in_flight("local") == 0
    assert [r.outcome for r in ledger.rows()] == ["ok"] * 6


async def test_server_side_rejections_are_retried(ledger: Ledger) -> None:
    handler = scripted_handler({"glm-4.7": glm()})
    with ChatServer(handler, latency_s=0.2, max_concurrency=1, retry_after_s=0.05) as srv:
        door = Door(http_config(srv.base_url, retries=20), run_id="r", ledger=ledger)
        results = await asyncio.gather(
            *(door.complete("glm", [Message.user(f"task {i}")], stage="build") for i in range(2))
        )
    assert all(r.message.tool_calls for r in results)
    assert srv.rejected >= 1 and srv.max_in_flight == 1
    outcomes = [r.outcome for r in ledger.rows()]
    assert outcomes.count("ok") == 2 and outcomes.count("retry") == srv.rejected


def test_server_refuses_unknown_models() -> None:
    with ChatServer(scripted_handler({"glm-4.7": glm()})) as srv:
        for body, status, text in [
            ({"model": "other", "messages": []}, 404, "other"),
        ]:
            req = urllib.request.Request(
                f"{srv.base_url}/chat/completions",
                data=json.dumps(body).encode(),
                method="POST",
                headers={"Content-Type": "application/json"},
            )
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(req, timeout=5)
            assert err.value.code == status
            assert text in err.value.read().decode()


async def test_malformed_reply_is_retried(ledger: Ledger) -> None:
    with ChatServer(fail_first([ServerReply(200, "not json at all")])) as srv:
        door = Door(http_config(srv.base_url), run_id="r", ledger=ledger)
        door.backoff_base_s = 0.01
        done = await door.complete("glm", convo(), stage="build")
    assert done.message.tool_calls and len(srv.requests) == 2
    assert [r.outcome for r in ledger.rows()] == ["retry", "ok"]


async def test_cancellation_releases_slot_and_reservation(ledger: Ledger) -> None:
    arrived, release = threading.Event(), threading.Event()
    ok = scripted_handler({"glm-4.7": glm()})

    def slow(request: dict[str, Any]) -> dict[str, Any] | ServerReply:
        arrived.set()
        release.wait(10)
        return ok(request)

    with ChatServer(slow) as srv:
        cap = Cap("run", 1.0)
        door = Door(http_config(srv.base_url), run_id="r", ledger=ledger, budget=Budget([cap]))
        task = asyncio.create_task(door.complete("glm", convo(), stage="build"))
        assert await asyncio.to_thread(arrived.wait, 10)
        assert door.limiter.in_flight("local") == 1 and cap.reserved_usd > 0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
    assert door.limiter.in_flight("local") == 0
    # The request reached the provider, which may bill it: charged at its worst case (issue 8,
    # item 5), and nothing is left reserved.
    rows = ledger.rows()
    assert [r.outcome for r in rows] == ["cancelled"]
    assert cap.reserved_usd == 0 and cap.spent_usd > 0
    assert rows[0].cost_usd == pytest.approx(cap.spent_usd)
