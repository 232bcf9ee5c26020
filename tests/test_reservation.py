"""Reservations that are tight and still true (issue 8, items 7 and 8).

Calls whose worst case does not fit now wait for other calls' reservations to settle instead
of failing; a call reserves only once its provider slot is taken; every stage sends its own
output cap, so a review's worst case is a review's, not the model's whole output limit;
long-prompt price tiers are reserved at the highest tier the prompt can reach; OpenAI's
models are counted with their own tokenizer. Money is judged by the test server's own bill.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from orchestrator.budget import Budget, Cap
from orchestrator.config import LoadedConfig, parse_config
from orchestrator.errors import BudgetExceeded
from orchestrator.ledger import Ledger
from orchestrator.llm import wire
from orchestrator.llm.door import Door, cost_of
from orchestrator.llm.messages import Message, Usage
from orchestrator.testing import ChatServer

PRICE_IN, PRICE_OUT = 1.25e-6, 10e-6  # GPT-5's list prices, per token
PROMPT = "Review this diff for correctness: " + "+ x = 1\n" * 200


def reply(request: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "r",
        "object": "chat.completion",
        "created": 0,
        "model": request["model"],
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        ],
    }


def config(base_url: str, concurrency: int = 8) -> LoadedConfig:
    """A GPT-5-priced model on the local server, with GPT-5's 128k output limit."""
    return parse_config(
        {
            "providers": {
                "local": {"api": "openai", "base_url": base_url, "max_concurrency": concurrency}
            },
            "models": {
                "m": {
                    "provider": "local",
                    "id": "m",
                    "price": {"input": PRICE_IN * 1e6, "output": PRICE_OUT * 1e6},
                    "max_output_tokens": 128_000,
                }
            },
            "stages": {"planner": {"model": "m"}, "builders": [{"model": "m"}]},
        }
    )


def door(loaded: LoadedConfig, cap: Cap, tmp: Path) -> Door:
    return Door(loaded, run_id="r", ledger=Ledger(tmp / "l.db"), budget=Budget([cap]))


async def test_six_reviews_wait_for_room_instead_of_failing(tmp_path: Path) -> None:
    """The cap holds three reviews' worst cases at once: the other three wait, then run."""
    with ChatServer(reply, latency_s=0.05, own_usage=True, prices=(PRICE_IN, PRICE_OUT)) as srv:
        loaded = config(srv.base_url)
        probe = Door(loaded, run_id="probe")
        worst = probe.worst_case(loaded.model("m"), [Message.user(PROMPT)], None, "review")
        cap = Cap("run", 3.5 * worst)
        d = door(loaded, cap, tmp_path)
        calls = [
            d.complete("m", [Message.user(f"{PROMPT} #{i}")], stage="review") for i in range(6)
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert srv.wait_idle()
    assert [type(r).__name__ for r in results] == ["Completion"] * 6
    assert len(srv.requests) == 6
    assert srv.billed_usd <= cap.limit_usd  # the provider's own bill
    assert cap.reserved_usd == 0


async def test_a_call_the_cap_cannot_hold_is_refused_at_once(tmp_path: Path) -> None:
    with ChatServer(reply, own_usage=True, prices=(PRICE_IN, PRICE_OUT)) as srv:
        loaded = config(srv.base_url)
        worst = Door(loaded, run_id="p").worst_case(
            loaded.model("m"), [Message.user(PROMPT)], None, "review"
        )
        d = door(loaded, Cap("run", 0.9 * worst), tmp_path)
        with pytest.raises(BudgetExceeded, match="budget cap 'run'"):
            await d.complete("m", [Message.user(PROMPT)], stage="review")
    assert srv.requests == []


async def test_a_call_queued_for_its_slot_holds_no_money(tmp_path: Path) -> None:
    """One slot: while the first call is in flight, the second waits for the slot without a
    reservation, so a third call of another provider could use that money meanwhile."""
    loop = asyncio.get_running_loop()
    arrived: asyncio.Future[None] = loop.create_future()
    release = threading.Event()

    def held(request: dict[str, Any]) -> dict[str, Any]:
        if not arrived.done():
            loop.call_soon_threadsafe(lambda: arrived.done() or arrived.set_result(None))
            release.wait(10)
        return reply(request)

    with ChatServer(held, own_usage=True, prices=(PRICE_IN, PRICE_OUT)) as srv:
        loaded = config(srv.base_url, concurrency=1)
        cap = Cap("run", 100.0)
        d = door(loaded, cap, tmp_path)
        first = asyncio.ensure_future(d.complete("m", [Message.user("one")], stage="review"))
        second = asyncio.ensure_future(d.complete("m", [Message.user("two")], stage="review"))
        await arrived
        one = d.worst_case(loaded.model("m"), [Message.user("one")], None, "review")
        reserved = cap.reserved_usd
        release.set()
        await asyncio.gather(first, second)
    assert reserved == pytest.approx(one)  # only the call that holds the slot
    assert len(srv.requests) == 2


async def test_each_stage_sends_its_output_cap_and_reserves_for_it(tmp_path: Path) -> None:
    with ChatServer(reply, own_usage=True, prices=(PRICE_IN, PRICE_OUT)) as srv:
        loaded = config(srv.base_url)
        d = door(loaded, Cap("run", 1.0), tmp_path)
        await d.complete("m", [Message.user("plan it")], stage="plan")
        await d.complete("m", [Message.user("review it")], stage="review")
        await d.complete("m", [Message.user("build it")], stage="build")
    sent = [r.get("max_tokens") or r.get("max_completion_tokens") for r in srv.requests]
    assert sent == [8192, 8192, 32768]
    review = d.worst_case(loaded.model("m"), [Message.user("review it")], None, "review")
    assert review < 8192 * PRICE_OUT * 1.1  # not the model's 128k tokens ($1.28)


async def test_the_stage_caps_are_configurable(tmp_path: Path) -> None:
    with ChatServer(reply, own_usage=True) as srv:
        data = config(srv.base_url).config.model_dump(exclude_defaults=True)
        data["budget"] = {"output_tokens": {"reviewers": 2000}}
        loaded = parse_config(data)
        d = Door(loaded, run_id="r")
        await d.complete("m", [Message.user("review it")], stage="review")
    assert srv.requests[0].get("max_tokens") == 2000


def test_long_prompt_tiers_are_reserved_at_the_tier_the_prompt_reaches() -> None:
    """litellm's map bills Gemini 2.5 Pro prompts above 200k tokens at twice the price: a
    400k-token call is reserved at that price and settled by litellm's own calculation."""
    import litellm

    loaded = parse_config(
        {
            "models": {"g": {"id": "gemini/gemini-2.5-pro"}},
            "stages": {"planner": {"model": "g"}, "builders": [{"model": "g"}]},
        }
    )
    rm = loaded.model("g")
    assert rm.tiers and rm.tiers[0].above_tokens == 200_000
    out = loaded.output_tokens("g", "build")
    prompt_cost, output_cost = litellm.cost_per_token(
        model="gemini/gemini-2.5-pro", prompt_tokens=400_000, completion_tokens=out
    )
    assert rm.worst_cost(400_000, out) >= prompt_cost + output_cost
    flat = 400_000 * rm.input_per_token + out * rm.output_per_token  # what was reserved before
    assert flat < prompt_cost + output_cost
    usage = Usage(prompt_tokens=400_000, completion_tokens=1000)
    assert cost_of(rm, usage) == pytest.approx(
        sum(
            litellm.cost_per_token(
                model="gemini/gemini-2.5-pro", prompt_tokens=400_000, completion_tokens=1000
            )
        )
    )
    assert rm.worst_cost(100_000, 0) == pytest.approx(100_000 * rm.input_per_token)  # below


def test_openai_prompts_are_counted_with_their_own_tokenizer() -> None:
    import litellm

    prose = "The function returns the median of the values it is given, sorted. " * 60
    messages = [Message.system("You are a careful reviewer."), Message.user(prose)]
    bound = wire.prompt_bound("gpt-5", True, messages, None)
    counted = litellm.token_counter(model="gpt-5", messages=wire.messages_to_wire(messages))
    assert counted <= bound <= wire.estimate_tokens(messages, None)
    assert bound < wire.estimate_tokens(messages, None) / 2  # bytes overcount ~4x for English
    other = wire.prompt_bound("openai/glm-4.6", False, messages, None)
    assert other == wire.estimate_tokens(messages, None)  # no tokenizer: the byte bound
