"""The model door with scripted models: completion, ledger, events, budget refusal, replay."""

from __future__ import annotations

import asyncio
import email.utils
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator.budget import Budget, Cap
from orchestrator.config import LoadedConfig, Provider, Window, parse_config
from orchestrator.errors import BudgetExceeded, ConfigError, ProviderError
from orchestrator.events import ModelCall
from orchestrator.ledger import Ledger
from orchestrator.llm import wire
from orchestrator.llm.door import Door, cost_of, request_key
from orchestrator.llm.limits import Limiter
from orchestrator.llm.messages import Message, ToolCall, ToolSpec, Usage
from orchestrator.protocols import ListSink, ModelDoor

SCRIPT = """
replies:
  - tool_calls: [{name: write_file, arguments: {path: a.py, content: "x = 1\\n"}}]
    usage: {prompt: 1000, completion: 200}
  - tool_calls: [{name: finish, arguments: {summary: done}}]
    usage: {prompt: 1500, completion: 100}
"""

WRITE = ToolSpec(name="write_file", description="write a file", parameters={"type": "object"})


def config(tmp_path: Path, **extra: Any) -> LoadedConfig:
    script = tmp_path / "builder.yaml"
    script.write_text(SCRIPT)
    return parse_config(
        {
            "models": {
                # $1 / $2 per million tokens: costs are visible but small
                "builder": {
                    "id": "scripted/builder",
                    "script": str(script),
                    "price": {"input": 1.0, "output": 2.0},
                    "max_output_tokens": 1000,
                },
                "free": {"id": "scripted/free", "script": str(script)},
                **extra,
            },
            "stages": {"planner": {"model": "free"}, "builders": [{"model": "builder"}]},
        }
    )


def convo() -> list[Message]:
    return [Message.system("You build."), Message.user("Make a.py")]


async def test_completion_ledger_row_and_event(tmp_path: Path) -> None:
    sink = ListSink()
    ledger = Ledger(tmp_path / "ledger.db")
    door = Door(config(tmp_path), run_id="r1", spec="a.md", ledger=ledger, events=sink)
    as_protocol: ModelDoor = door  # mypy checks Door against the protocol
    assert as_protocol is door
    done = await door.complete("builder", convo(), stage="build.1", tools=[WRITE])
    call = done.message.tool_calls[0]
    assert (call.id, call.name, call.parsed()) == (
        "call_0_0",
        "write_file",
        {"path": "a.py", "content": "x = 1\n"},
    )
    assert done.usage.prompt_tokens == 1000 and done.usage.completion_tokens == 200
    assert done.cost_usd == pytest.approx(1000 * 1e-6 + 200 * 2e-6)
    assert done.model == "builder"
    [row] = ledger.rows("r1")
    assert (row.stage, row.model, row.provider, row.outcome, row.spec) == (
        "build.1",
        "builder",
        "scripted",
        "ok",
        "a.md",
    )
    assert row.cost_usd == pytest.approx(done.cost_usd)
    assert row.request_key == request_key("r1", "build.1/", "builder", convo(), [WRITE], None)
    [event] = sink.events
    assert isinstance(event, ModelCall)
    assert (event.outcome, event.prompt_tokens, event.cost_usd) == ("ok", 1000, done.cost_usd)


async def test_budget_refusal_makes_no_call_and_bills_nothing(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    cap = Cap("run", 0.001)  # worst case is ≥ 1000 output tokens × $2/M = $0.002
    door = Door(config(tmp_path), run_id="r1", ledger=ledger, budget=Budget([cap]))
    with pytest.raises(BudgetExceeded, match="'run'"):
        await door.complete("builder", convo(), stage="build")
    assert ledger.rows() == [] and cap.spent_usd == 0 and cap.reserved_usd == 0


async def test_budget_is_settled_with_actual_cost(tmp_path: Path) -> None:
    cap = Cap("run", 1.0)
    budget = Budget([cap])
    door = Door(config(tmp_path), run_id="r1", budget=budget)
    done = await door.complete("builder", convo(), stage="build")
    assert cap.reserved_usd == 0
    assert cap.spent_usd == pytest.approx(done.cost_usd) == pytest.approx(budget.spent)


async def test_replay_from_response_cache_costs_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    loaded = config(tmp_path)
    first = Door(loaded, run_id="r1", ledger=Ledger(path))
    a = await first.complete("builder", convo(), stage="build.1", tools=[WRITE])
    turn2 = [*convo(), a.message, Message.tool("call_0_0", "write_file", "ok")]
    b = await first.complete("builder", turn2, stage="build.1", tools=[WRITE])

    sink, cap = ListSink(), Cap("run", 1.0)
    ledger = Ledger(path)
    resumed = Door(loaded, run_id="r1", ledger=ledger, events=sink, budget=Budget([cap]))
    again_a = await resumed.complete("builder", convo(), stage="build.1", tools=[WRITE])
    again_b = await resumed.complete("builder", turn2, stage="build.1", tools=[WRITE])
    assert again_a.message == a.message and again_b.message == b.message
    assert again_a.usage == a.usage and again_a.cost_usd == 0 and again_b.cost_usd == 0
    assert [r.outcome for r in ledger.rows("r1")] == ["ok", "ok", "replayed", "replayed"]
    assert ledger.total("r1") == pytest.approx(a.cost_usd + b.cost_usd)
    assert cap.spent_usd == 0
    assert [e.outcome for e in sink.events if isinstance(e, ModelCall)] == ["replayed"] * 2

    # Another run, or another stage, is not answered from this run's cache.
    other = Door(loaded, run_id="r2", ledger=ledger)
    await other.complete("builder", convo(), stage="build.1", tools=[WRITE])
    assert ledger.rows("r2")[0].outcome == "ok"


async def test_resume_replays_turns_whose_tool_output_changed(tmp_path: Path) -> None:
    """Tool output differs on resume (timings, temp paths); the turn is still the one paid for,
    while another prompt, another earlier reply or another scope asks anew."""
    path = tmp_path / "ledger.db"
    loaded = config(tmp_path)
    first = Door(loaded, run_id="r1", ledger=Ledger(path))
    a = await first.complete("builder", convo(), stage="build", tools=[WRITE], scope="build-0")
    said = [*convo(), a.message, Message.tool("call_0_0", "write_file", "ok in 0.013s")]
    b = await first.complete("builder", said, stage="build", tools=[WRITE], scope="build-0")

    ledger = Ledger(path)
    resumed = Door(loaded, run_id="r1", ledger=ledger)
    await resumed.complete("builder", convo(), stage="build", tools=[WRITE], scope="build-0")
    now = [*convo(), a.message, Message.tool("call_0_0", "write_file", "ok in 0.021s")]
    again = await resumed.complete("builder", now, stage="build", tools=[WRITE], scope="build-0")
    assert again.message == b.message and again.cost_usd == 0
    assert [r.outcome for r in ledger.rows("r1")] == ["ok", "ok", "replayed", "replayed"]

    def key(messages: list[Message], scope: str = "build-0") -> str:
        return request_key("r1", f"build/{scope}", "builder", messages, [WRITE], None)

    assert key(said) == key(now)
    other_prompt = [convo()[0], Message.user("Make b.py"), *now[2:]]
    other_reply = [*convo(), Message(role="assistant", content="hm"), now[3]]
    assert len({key(now), key(other_prompt), key(other_reply), key(now, "build-1")}) == 4


async def test_identical_requests_in_one_run_each_reach_the_model(tmp_path: Path) -> None:
    """Two builders of one model start alike; neither is handed the other's stored reply."""
    loaded = config(tmp_path)
    loaded.models["builder"].script = f"{tmp_path}/brain.py:reply"
    (tmp_path / "brain.py").write_text(
        "from orchestrator.llm.messages import Message\n"
        "n = [0]\n"
        "def reply(messages, tools, tool_choice):\n"
        "    n[0] += 1\n"
        "    return Message(role='assistant', content=f'reply {n[0]}')\n"
    )
    ledger = Ledger(tmp_path / "ledger.db")
    door = Door(loaded, run_id="r1", ledger=ledger)
    one = await door.complete("builder", convo(), stage="build")
    two = await door.complete("builder", convo(), stage="build")
    assert (one.message.content, two.message.content) == ("reply 1", "reply 2")
    resumed = Door(loaded, run_id="r1", ledger=ledger)
    replays = [await resumed.complete("builder", convo(), stage="build") for _ in range(2)]
    assert [r.message.content for r in replays] == ["reply 1", "reply 2"]
    assert [r.outcome for r in ledger.rows()] == ["ok", "ok", "replayed", "replayed"]


async def test_unknown_model_and_missing_key_are_config_errors(tmp_path: Path) -> None:
    loaded = parse_config(
        {
            "providers": {
                "zhipu": {
                    "api": "openai",
                    "base_url": "https://example.invalid/v4",
                    "api_key": "FLOW_TEST_MISSING_KEY",
                }
            },
            "models": {
                "glm": {"provider": "zhipu", "id": "glm-4.7", "price": {"input": 0, "output": 0}}
            },
            "stages": {"planner": {"model": "glm"}, "builders": [{"model": "glm"}]},
        }
    )
    door = Door(loaded, run_id="r", environ={})
    with pytest.raises(ConfigError, match="nope"):
        await door.complete("nope", convo(), stage="plan")
    with pytest.raises(ConfigError, match="FLOW_TEST_MISSING_KEY"):
        await door.complete("glm", convo(), stage="plan")
    blocked = Door(
        loaded,
        run_id="r",
        environ={"FLOW_TEST_MISSING_KEY": "sk-secret-value", "FLOW_ALLOW_MODEL_REQUESTS": "0"},
    )
    with pytest.raises(ProviderError, match="FLOW_ALLOW_MODEL_REQUESTS"):
        await blocked.complete("glm", convo(), stage="plan")


async def test_limiter_bounds_in_flight_and_releases_on_cancel() -> None:
    limiter = Limiter({"p": Provider(max_concurrency=2)})
    gate = asyncio.Event()
    entered = asyncio.Queue[int]()

    async def job(i: int) -> None:
        async with limiter.slot("p"):
            entered.put_nowait(i)
            await gate.wait()

    tasks = [asyncio.create_task(job(i)) for i in range(5)]
    await entered.get()
    await entered.get()
    await asyncio.sleep(0)  # give the other three a chance to (wrongly) enter
    assert limiter.in_flight("p") == 2 and entered.empty()
    tasks[0].cancel()
    await asyncio.gather(tasks[0], return_exceptions=True)
    await entered.get()  # the cancelled task's slot went to a waiter
    gate.set()
    await asyncio.gather(*tasks[1:])
    assert limiter.in_flight("p") == 0 and limiter.max_seen("p") == 2


async def test_window_quota_waits_until_the_oldest_request_ages_out() -> None:
    now = [100.0]
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    provider = Provider(max_concurrency=10, window=Window(requests=2, hours=1.0))
    limiter = Limiter({"plan": provider}, clock=lambda: now[0], sleep=fake_sleep)
    for _ in range(2):
        async with limiter.slot("plan"):
            now[0] += 60
    async with limiter.slot("plan"):
        pass
    assert slept == [pytest.approx(3600 - 120)]
    assert now[0] == pytest.approx(100 + 3600)


def test_import_does_not_load_litellm() -> None:
    code = (
        "import orchestrator.llm.door, orchestrator.budget, orchestrator.ledger, "
        "orchestrator.testing; import sys; assert 'litellm' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_wire_keeps_reasoning_and_thinking_blocks_both_ways() -> None:
    blocks = [{"type": "thinking", "thinking": "plan", "signature": "sig=="}]
    sent = Message(
        role="assistant",
        reasoning_content="plan",
        tool_calls=[ToolCall(id="t1", name="finish", arguments='{"summary": "x"}')],
        provider_fields={"thinking_blocks": blocks},
    )
    data = wire.message_to_wire(sent)
    assert data["reasoning_content"] == "plan" and data["thinking_blocks"] == blocks
    assert data["tool_calls"] == [
        {
            "id": "t1",
            "type": "function",
            "function": {"name": "finish", "arguments": '{"summary": "x"}'},
        }
    ]
    response = {
        "choices": [{"message": data}],
        "usage": {
            "prompt_tokens": 9,
            "completion_tokens": 4,
            "prompt_tokens_details": {"cached_tokens": 5},
        },
    }
    message, usage = wire.response_from_wire(response)
    assert message == sent
    assert usage == Usage(prompt_tokens=9, cached_tokens=5, completion_tokens=4)
    with pytest.raises(wire.MalformedResponse):
        wire.response_from_wire({"choices": []})


def test_tool_choice_and_retry_after_parsing() -> None:
    assert wire.tool_choice_to_wire(None) is None
    assert wire.tool_choice_to_wire("required") == "required"
    assert wire.tool_choice_to_wire("auto") == "auto"
    assert wire.tool_choice_to_wire("submit_plan") == {
        "type": "function",
        "function": {"name": "submit_plan"},
    }
    assert wire.parse_retry_after({"retry-after": "7"}) == 7
    assert wire.parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert wire.parse_retry_after({"retry-after": "86400"}) == wire.RETRY_AFTER_CAP_S
    date = email.utils.formatdate(1_000_030, usegmt=True)
    assert wire.parse_retry_after({"retry-after": date}, now=1_000_000) == pytest.approx(30)
    assert wire.parse_retry_after({"retry-after": "soon"}) is None
    assert wire.parse_retry_after(None) is None


def test_cost_uses_our_prices_with_cached_tokens(tmp_path: Path) -> None:
    rm = config(tmp_path).models["builder"].model_copy(update={"cached_per_token": 0.1e-6})
    usage = Usage(prompt_tokens=1000, cached_tokens=400, completion_tokens=10)
    assert cost_of(rm, usage) == pytest.approx(600e-6 + 400 * 0.1e-6 + 20e-6)


# ---- money: cancelled calls, replies without usage, vendor buckets (issue 8: 5, 6, 13) ----


def _http_config(base_url: str, max_output: int = 2000) -> LoadedConfig:
    return parse_config(
        {
            "providers": {"p": {"api": "openai", "base_url": base_url, "retries": 0}},
            "models": {
                "m": {
                    "provider": "p",
                    "id": "m",
                    "price": {"input": 1.0, "output": 4.0},
                    "max_output_tokens": max_output,
                }
            },
            "stages": {"planner": {"model": "m"}, "builders": [{"model": "m"}]},
        }
    )


PRICES = (1.0e-6, 4.0e-6)


async def test_a_call_cancelled_in_flight_is_charged_at_its_worst_case(tmp_path: Path) -> None:
    from orchestrator.testing.server import ChatServer, ServerReply

    arrived = asyncio.Event()
    loop = asyncio.get_running_loop()

    def hang(request: dict[str, Any]) -> ServerReply:
        loop.call_soon_threadsafe(arrived.set)
        return ServerReply(200, fault="hang")

    cap = Cap("run", 1.0)
    with ChatServer(hang, prices=PRICES) as srv, Ledger(tmp_path / "l.db") as ledger:
        door = Door(_http_config(srv.base_url), run_id="r", ledger=ledger, budget=Budget([cap]))
        task = asyncio.create_task(door.complete("m", convo(), stage="plan"))
        await asyncio.wait_for(arrived.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        [row] = ledger.rows("r")
        billed = srv.billed_usd
    assert row.outcome == "cancelled"
    assert billed > 0  # the provider billed the request it received
    assert row.cost_usd >= billed and cap.spent_usd == pytest.approx(row.cost_usd)
    assert cap.spent_usd <= cap.limit_usd and cap.reserved_usd == 0


async def test_a_call_cancelled_before_its_slot_is_free(tmp_path: Path) -> None:
    """Waiting for a provider slot, the request was provably never sent: $0, and the bare
    litellm ids of one vendor wait for the same slots (`providers.openai` sets them)."""
    loaded = parse_config(
        {
            "providers": {"openai": {"max_concurrency": 1}},
            "models": {"a": {"id": "gpt-5"}, "b": {"id": "gpt-5-mini"}},
            "stages": {"planner": {"model": "a"}, "builders": [{"model": "b"}]},
        }
    )
    limiter = Limiter(loaded.config.providers)
    env = {"OPENAI_API_KEY": "sk-test-not-used"}
    with Ledger(tmp_path / "l.db") as ledger:
        door = Door(loaded, run_id="r", ledger=ledger, limiter=limiter, environ=env)
        assert door.bucket(loaded.model("a")) == door.bucket(loaded.model("b")) == "openai"
        async with limiter.slot("openai"):  # gpt-5 holds the vendor's only slot
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(door.complete("b", convo(), stage="plan"), 0.5)
        [row] = ledger.rows("r")
    assert (row.outcome, row.cost_usd) == ("cancelled", 0.0)


async def test_a_reply_without_usage_is_never_free(tmp_path: Path) -> None:
    from orchestrator.testing.server import ChatServer, chat_response

    def no_usage(request: dict[str, Any]) -> dict[str, Any]:
        body = chat_response(request["model"], {"role": "assistant", "content": "x" * 400}, {})
        del body["usage"]
        return body

    cap = Cap("run", 1.0)
    with ChatServer(no_usage, prices=PRICES) as srv, Ledger(tmp_path / "l.db") as ledger:
        door = Door(_http_config(srv.base_url), run_id="r", ledger=ledger, budget=Budget([cap]))
        done = await door.complete("m", convo(), stage="plan")
        billed = srv.billed_usd
        [row] = ledger.rows("r")
    assert done.message.content == "x" * 400
    assert billed > 0 and done.cost_usd >= billed and row.cost_usd == done.cost_usd
    assert "without usage" in (row.error or "")
    assert billed <= cap.spent_usd <= cap.limit_usd
