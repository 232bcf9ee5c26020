"""Provider limits against a local server that enforces them: in-flight slots, 429s, windows.

The server answers 429 beyond its own concurrency, as coding plans do; flow must keep under
it by waiting for a slot (never by failing), and must free its slots on every path.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.budget import Budget, Cap
from orchestrator.config import LoadedConfig, parse_config
from orchestrator.errors import ProviderError
from orchestrator.events import Notice
from orchestrator.ledger import Ledger
from orchestrator.llm.door import Door
from orchestrator.llm.limits import Limiter
from orchestrator.llm.messages import Completion, Message, ToolSpec, Usage
from orchestrator.llm.scripted import ScriptedModel
from orchestrator.protocols import ListSink
from orchestrator.testing import ChatServer, ServerReply, scripted_handler
from orchestrator.testing.server import Handler, error_body

PROVIDER = "plan"
MODEL_ID = "glm-sim"
LATENCY_S = 0.2  # simulated model work on the server


def answer(messages: list[Message], tools: list[ToolSpec], choice: str | None) -> object:
    return {"content": "ok"}, Usage(prompt_tokens=100, completion_tokens=10)


def model_handler() -> Handler:
    return scripted_handler({MODEL_ID: ScriptedModel(MODEL_ID, answer)})


def config(
    base_url: str,
    concurrency: int,
    *,
    window: dict[str, float] | None = None,
    timeout_s: float = 30.0,
    retries: int = 3,
) -> LoadedConfig:
    provider: dict[str, Any] = {
        "api": "openai",
        "base_url": base_url,
        "max_concurrency": concurrency,
        "timeout_s": timeout_s,
        "retries": retries,
    }
    if window is not None:
        provider["window"] = window
    return parse_config(
        {
            "providers": {PROVIDER: provider},
            "models": {
                "glm": {
                    "provider": PROVIDER,
                    "id": MODEL_ID,
                    "max_output_tokens": 500,
                    "price": {"input": 1.0, "output": 2.0},
                }
            },
            "stages": {"planner": {"model": "glm"}, "builders": [{"model": "glm"}]},
        }
    )


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger(tmp_path / "ledger.db") as opened:
        yield opened


def ask(door: Door, i: int | str) -> Any:
    return door.complete("glm", [Message.user(f"task {i}")], stage="build")


def tagged(marker: str, gate: threading.Event, arrived: threading.Semaphore) -> Handler:
    """Requests whose text contains `marker` hang until `gate` opens; the rest answer at once."""
    ok = model_handler()

    def handle(request: dict[str, Any]) -> dict[str, Any] | ServerReply:
        if marker in str(request.get("messages")):
            arrived.release()
            gate.wait(30)
        return ok(request)

    return handle


async def within(*calls: Any, timeout: float = 60.0, errors: bool = False) -> list[Any]:
    """gather, but a leaked slot fails the test instead of hanging it."""
    gathered = asyncio.gather(*calls, return_exceptions=errors)
    return list(await asyncio.wait_for(gathered, timeout))


async def arrivals(arrived: threading.Semaphore, n: int) -> None:
    """Until `n` tagged requests are on the server (a failed wait fails the test)."""
    for _ in range(n):
        assert await asyncio.to_thread(arrived.acquire, True, 30)


# ---- in-flight slots ----------------------------------------------------------------------


async def test_one_door_waits_for_a_slot_instead_of_failing(ledger: Ledger) -> None:
    c = 3
    with ChatServer(model_handler(), latency_s=LATENCY_S, max_concurrency=c) as srv:
        door = Door(config(srv.base_url, c), run_id="r", ledger=ledger)
        results = await within(*(ask(door, i) for i in range(4 * c)))
    assert [r.message.content for r in results] == ["ok"] * (4 * c)
    assert srv.rejected == 0 and len(srv.requests) == 4 * c
    assert srv.max_in_flight == c  # every slot was used, none beyond
    assert door.limiter.max_seen(PROVIDER) == c and door.limiter.in_flight(PROVIDER) == 0
    assert [r.outcome for r in ledger.rows()] == ["ok"] * (4 * c)


async def test_runs_sharing_a_limiter_share_the_providers_slots(ledger: Ledger) -> None:
    c, runs, calls = 2, 4, 3
    with ChatServer(model_handler(), latency_s=LATENCY_S, max_concurrency=c) as srv:
        loaded = config(srv.base_url, c)
        limiter = Limiter(loaded.config.providers)  # one per process, as `shared_resources` makes
        batch = Cap("batch", 1.0)
        doors = [
            Door(
                loaded,
                run_id=f"run-{n}",
                ledger=ledger,
                limiter=limiter,
                budget=Budget([batch, Cap("run", 0.5)]),
            )
            for n in range(runs)
        ]
        results = await within(
            *(ask(door, f"{n}.{i}") for n, door in enumerate(doors) for i in range(calls))
        )
    assert len(results) == runs * calls and all(r.message.content == "ok" for r in results)
    assert srv.rejected == 0 and srv.max_in_flight == c
    assert limiter.max_seen(PROVIDER) == c and limiter.in_flight(PROVIDER) == 0
    rows = ledger.rows()
    assert [r.outcome for r in rows] == ["ok"] * (runs * calls)
    assert batch.spent_usd == pytest.approx(sum(r.cost_usd for r in rows), rel=1e-12)
    assert batch.reserved_usd == 0


async def test_runs_with_their_own_limiters_would_overrun_the_server(ledger: Ledger) -> None:
    """The control for the test above: without a shared Limiter the server does refuse."""
    c, runs = 2, 3
    handler = model_handler()
    with ChatServer(handler, latency_s=LATENCY_S, max_concurrency=c, retry_after_s=0.05) as srv:
        loaded = config(srv.base_url, c, retries=50)
        doors = [Door(loaded, run_id=f"run-{n}", ledger=ledger) for n in range(runs)]
        results = await within(
            *(ask(door, f"{n}.{i}") for n, door in enumerate(doors) for i in range(c))
        )
    assert all(r.message.content == "ok" for r in results)
    assert srv.rejected > 0 and srv.max_in_flight == c


# ---- a limit set above the server's: 429, Retry-After, billed once -------------------------


async def test_limit_above_the_servers_is_retried_after_retry_after(ledger: Ledger) -> None:
    server_c, flow_c, calls, retry_after = 2, 5, 8, 0.2
    sink = ListSink()
    with ChatServer(
        model_handler(), latency_s=0.3, max_concurrency=server_c, retry_after_s=retry_after
    ) as srv:
        cap = Cap("run", 1.0)
        door = Door(
            config(srv.base_url, flow_c, retries=30),
            run_id="r",
            ledger=ledger,
            budget=Budget([cap]),
            events=sink,
        )
        results: list[Completion] = await within(*(ask(door, i) for i in range(calls)))
    assert all(r.message.content == "ok" for r in results)
    assert srv.rejected > 0 and srv.max_in_flight <= server_c
    rows = ledger.rows()
    retries = [r for r in rows if r.outcome == "retry"]
    assert len(retries) == srv.rejected
    assert all(r.cost_usd == 0 and "Rate limit" in (r.error or "") for r in retries)
    oks = [r for r in rows if r.outcome == "ok"]
    assert len({r.request_key for r in oks}) == len(oks) == calls  # one ok row per call
    assert {r.outcome for r in rows} == {"ok", "retry"}
    billed = sum(r.cost_usd for r in rows)
    assert billed == pytest.approx(sum(r.cost_usd for r in results), rel=1e-12)
    assert cap.spent_usd == pytest.approx(billed, rel=1e-12) and cap.reserved_usd == 0
    # Each retry waited the server's Retry-After (not a jittered backoff) before trying again.
    for key in {r.request_key for r in retries}:
        attempts = [r for r in rows if r.request_key == key]
        for before, after in itertools.pairwise(attempts):
            assert after.ts - before.ts >= retry_after - 0.02
    notices = [e.message for e in sink.events if isinstance(e, Notice)]
    assert len(notices) == srv.rejected
    assert all("HTTP 429" in n and n.endswith(f"in {retry_after:.1f}s") for n in notices)


# ---- a request quota per rolling window ---------------------------------------------------


async def test_window_quota_makes_the_fourth_call_wait(ledger: Ledger) -> None:
    hours = 0.0005  # 1.8 s
    span = hours * 3600
    seen: list[float] = []
    ok = model_handler()

    def timed(request: dict[str, Any]) -> dict[str, Any] | ServerReply:
        seen.append(time.monotonic())
        return ok(request)

    with ChatServer(timed) as srv:
        loaded = config(srv.base_url, 4, window={"requests": 3, "hours": hours})
        # Warm litellm up through a Limiter of its own, so the quota sees only the calls below.
        await ask(Door(loaded, run_id="warm-up"), "warm-up")
        seen.clear()
        limiter = Limiter(loaded.config.providers)
        doors = [Door(loaded, run_id=f"run-{n}", ledger=ledger, limiter=limiter) for n in (1, 2)]
        start = time.monotonic()
        results = await within(*(ask(doors[i % 2], i) for i in range(4)))
        done = time.monotonic()
    assert [r.message.content for r in results] == ["ok"] * 4
    assert [r.outcome for r in ledger.rows()] == ["ok"] * 4  # waited, never refused
    first, fourth = sorted(seen)[:3], sorted(seen)[3]
    assert all(t - start < span / 2 for t in first)  # three went at once
    assert fourth - start >= span * 0.95  # the fourth waited for the oldest to age out
    assert done - start < span + 1.5  # ... and no longer than that
    assert limiter.in_flight(PROVIDER) == 0


# ---- slots are released on every path -----------------------------------------------------


async def follow_up(door: Door, c: int) -> None:
    """C further calls must all get a slot; a leaked slot would make this time out."""
    results = await within(*(ask(door, f"after {i}") for i in range(c)), timeout=20)
    assert [r.message.content for r in results] == ["ok"] * c
    assert door.limiter.max_seen(PROVIDER) == c


async def test_slots_are_released_after_errors(ledger: Ledger) -> None:
    c = 2
    ok = model_handler()

    def refuse_bad(request: dict[str, Any]) -> dict[str, Any] | ServerReply:
        if "bad" in str(request.get("messages")):
            return ServerReply(400, error_body("this request is malformed"))
        return ok(request)

    with ChatServer(refuse_bad, latency_s=0.05) as srv:
        cap = Cap("run", 1.0)
        door = Door(config(srv.base_url, c), run_id="r", ledger=ledger, budget=Budget([cap]))
        failed = await within(*(ask(door, f"bad {i}") for i in range(3 * c)), errors=True)
        assert all(isinstance(f, ProviderError) and f.status == 400 for f in failed)
        assert door.limiter.in_flight(PROVIDER) == 0
        await follow_up(door, c)
    assert door.limiter.in_flight(PROVIDER) == 0
    outcomes = [r.outcome for r in ledger.rows()]
    assert outcomes == ["error"] * (3 * c) + ["ok"] * c
    assert sum(r.cost_usd for r in ledger.rows() if r.outcome == "error") == 0
    assert cap.reserved_usd == 0


async def test_slots_are_released_after_timeouts(ledger: Ledger) -> None:
    c = 2
    gate, arrived = threading.Event(), threading.Semaphore(0)
    srv = ChatServer(tagged("slow", gate, arrived)).start()
    try:
        cap = Cap("run", 1.0)
        door = Door(
            config(srv.base_url, c, timeout_s=0.5, retries=0),
            run_id="r",
            ledger=ledger,
            budget=Budget([cap]),
        )
        started = time.monotonic()
        failed = await within(*(ask(door, f"slow {i}") for i in range(c)), errors=True)
        assert all(isinstance(f, ProviderError) for f in failed), failed
        assert time.monotonic() - started < 20  # the timeout fired; the server never answered
        assert door.limiter.in_flight(PROVIDER) == 0
        await follow_up(door, c)
    finally:
        gate.set()
        srv.stop()
    assert door.limiter.in_flight(PROVIDER) == 0
    assert [r.outcome for r in ledger.rows()] == ["error"] * c + ["ok"] * c
    assert cap.reserved_usd == 0


async def test_slots_are_released_after_cancellation(ledger: Ledger) -> None:
    c = 2
    gate, arrived = threading.Event(), threading.Semaphore(0)
    srv = ChatServer(tagged("hang", gate, arrived)).start()
    try:
        cap = Cap("run", 1.0)
        door = Door(config(srv.base_url, c), run_id="r", ledger=ledger, budget=Budget([cap]))
        hung = [asyncio.create_task(ask(door, f"hang {i}")) for i in range(c)]
        await arrivals(arrived, c)
        assert door.limiter.in_flight(PROVIDER) == c and cap.reserved_usd > 0
        for task in hung:
            task.cancel()
        outcomes = await asyncio.gather(*hung, return_exceptions=True)
        assert all(isinstance(o, asyncio.CancelledError) for o in outcomes)
        assert door.limiter.in_flight(PROVIDER) == 0 and cap.reserved_usd == 0
        await follow_up(door, c)
    finally:
        gate.set()
        srv.stop()
    assert door.limiter.in_flight(PROVIDER) == 0
    assert [r.outcome for r in ledger.rows()] == ["cancelled"] * c + ["ok"] * c
    assert cap.spent_usd == pytest.approx(ledger.total(), rel=1e-12) and cap.reserved_usd == 0
