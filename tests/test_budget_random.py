"""Randomized, seeded budget cases: caps hold under concurrency, failures and retries.

Each case draws prices (zero included), an output limit, a batch cap shared by 2-4 runs
(Doors), run caps, sometimes a per-call cap and a batch already partly spent, then many calls
with random prompts, usages and failures, all at once. The ledger must then agree with the
caps to the cent: nothing over a limit, every ok row counted once, refused calls unbilled.

The scripted model bills at most what the door reserved for: prompt tokens ≤ the door's own
estimate (`wire.estimate_tokens`), completion ≤ `max_output_tokens`, cached ≤ prompt at a
cache price ≤ the input price. That estimate (UTF-8 bytes of the request plus allowances) is
meant to bound what a provider can bill: `test_cap_holds_when_prompt_tokens_are_counted_for_real`
checks it against a real tokenizer.

Scripted calls never yield to the event loop, so each Door's calls run in a thread of its own
(its own loop, one shared Ledger and batch Cap) to make reservations really overlap; the HTTP
cases overlap inside one loop, as a batch does, with a shared Limiter.
"""

from __future__ import annotations

import asyncio
import random
import re
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from orchestrator.budget import Budget, Cap
from orchestrator.config import LoadedConfig, parse_config
from orchestrator.errors import BudgetExceeded, ProviderError
from orchestrator.ledger import CallRow, Ledger
from orchestrator.llm import wire
from orchestrator.llm.door import Door, request_key
from orchestrator.llm.limits import Limiter
from orchestrator.llm.messages import Completion, Message, ToolCall, ToolSpec, Usage
from orchestrator.llm.quirks import DEFAULTS as DEFAULT_QUIRKS
from orchestrator.llm.scripted import ScriptedModel
from orchestrator.testing import ChatServer, ServerReply, scripted_handler
from orchestrator.testing.server import error_body

SCRIPTED_CASES = 400
HTTP_CASES = 40
EPS = 1e-9
MODEL_ID = "sim"
PLAN = re.compile(r"\[call (\S+) p=(\d+) k=(\d+) c=(\d+) fail=(\S+)\]")
WORDS = ("the", "cap", "holds", "while", "many", "calls", "reserve", "and", "settle", "worst")
TOOLS = [
    ToolSpec(
        name="write_file",
        description="Write a file in the worktree.",
        parameters={
            "type": "object",
            "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
            "required": ["path", "content"],
        },
    ),
    ToolSpec(
        name="finish",
        description="Finish with a summary.",
        parameters={"type": "object", "properties": {"summary": {"type": "string"}}},
    ),
]


def brain(messages: list[Message], tools: list[ToolSpec], choice: str | None) -> object:
    """The model: usage as a fraction (‰) of the door's own prompt estimate, per the plan tag."""
    found = PLAN.search(messages[-1].content or "")
    assert found is not None, "every test request carries its plan"
    _cid, p, k, c, fail = found.groups()
    if fail == "raise":
        raise RuntimeError("scripted model failure")
    prompt = wire.estimate_tokens(messages, tools or None) * int(p) // 1000
    usage = Usage(
        prompt_tokens=prompt, cached_tokens=prompt * int(k) // 1000, completion_tokens=int(c)
    )
    return {"content": "done"}, usage


@dataclass
class Call:
    cid: str
    door: int
    messages: list[Message]
    tools: list[ToolSpec] | None
    fail: str
    """none | raise (scripted) | 429xN | 500xN | 400 (HTTP: the first N attempts fail)"""
    estimate: int = 0
    worst: float = 0.0
    result: Completion | BaseException | None = None

    def __repr__(self) -> str:
        return f"Call({self.cid}, fail={self.fail}, worst={self.worst:.6f}, {self.result!r})"


@dataclass
class Case:
    seed: int
    http: bool
    loaded: LoadedConfig
    retries: int
    batch: Cap
    prespent: float
    budgets: list[Budget]
    run_caps: list[Cap | None]
    per_call: float | None
    calls: list[Call]
    concurrency: int = 1
    counts: Counter[str] = field(default_factory=Counter)

    def __repr__(self) -> str:
        return f"Case(seed={self.seed}, http={self.http}, {len(self.calls)} calls)"


def price(rng: random.Random, high: float) -> float:
    return 0.0 if rng.random() < 0.25 else round(rng.uniform(0.01, high), 4)


def text(rng: random.Random, chars: int) -> str:
    out: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(WORDS)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)


def config(
    rng: random.Random, base_url: str | None, retries: int, concurrency: int
) -> LoadedConfig:
    inp, out = price(rng, 15.0), price(rng, 75.0)
    prices: dict[str, float] = {"input": inp, "output": out}
    if rng.random() < 0.5:
        prices["cached_input"] = round(rng.uniform(0, inp), 6)  # never above the input price
    model: dict[str, Any] = {"price": prices, "max_output_tokens": rng.randint(1, 8192)}
    data: dict[str, Any] = {
        "models": {"m": model},
        "stages": {"planner": {"model": "m"}, "builders": [{"model": "m"}]},
    }
    if base_url is None:
        model.update(id=f"scripted/{MODEL_ID}", script=f"{__name__}:brain")
    else:
        model.update(id=MODEL_ID, provider="local")
        data["providers"] = {
            "local": {
                "api": "openai",
                "base_url": base_url,
                "max_concurrency": concurrency,
                "retries": retries,
                "timeout_s": 30,
            }
        }
    return parse_config(data)


def conversation(rng: random.Random, tag: str) -> tuple[list[Message], list[ToolSpec] | None]:
    messages = [Message.system(text(rng, rng.randint(0, 400)))]
    if rng.random() < 0.4:  # an earlier turn: an assistant tool call and its result
        call = ToolCall(id="call_1", name="write_file", arguments='{"path": "a.py"}')
        messages += [
            Message.user(text(rng, rng.randint(0, 300))),
            Message(role="assistant", content=None, tool_calls=[call], reasoning_content="hm"),
            Message.tool("call_1", "write_file", text(rng, rng.randint(0, 500))),
        ]
    messages.append(Message.user(f"{tag} {text(rng, rng.randint(0, 2500))}"))
    return messages, TOOLS if rng.random() < 0.5 else None


def failure(rng: random.Random, http: bool, retries: int) -> str:
    roll = rng.random()
    if roll < 0.7:
        return "none"
    if not http:
        return "raise"
    if roll < 0.78:
        return "400"
    return f"{rng.choice(['429', '500'])}x{rng.randint(1, retries + 1)}"  # may run out of retries


def build_case(seed: int, http: bool, base_url: str | None) -> Case:
    rng = random.Random(seed)
    retries = rng.randint(0, 3)
    concurrency = rng.randint(1, 4)
    loaded = config(rng, base_url, retries, concurrency)
    rm = loaded.model("m")
    runs = rng.randint(2, 4)
    calls: list[Call] = []
    for n in range(runs):
        for i in range(rng.randint(2, 8 if http else 10)):
            cid = f"{seed}.{n}.{i}"
            p, k = rng.randint(0, 1000), rng.choice([0, 0, rng.randint(0, 1000)])
            completion = rng.randint(0, rm.max_output_tokens)
            fail = failure(rng, http, retries)
            tag = f"[call {cid} p={p} k={k} c={completion} fail={fail}]"
            messages, tools = conversation(rng, tag)
            estimate = wire.estimate_tokens(messages, tools)
            worst = estimate * rm.input_per_token + rm.max_output_tokens * rm.output_per_token
            calls.append(Call(cid, n, messages, tools, fail, estimate, worst))
    rng.shuffle(calls)
    typical = sum(c.worst for c in calls) / len(calls)
    limit = typical * rng.uniform(0.0, 2.0 * len(calls))
    prespent = rng.choice([0.0, limit * rng.uniform(0, 0.5)])  # a resumed batch
    batch = Cap("batch", limit, spent_usd=prespent)
    per_call = typical * rng.uniform(0.5, 1.5) if rng.random() < 0.3 else None
    run_caps: list[Cap | None] = []
    budgets = []
    for n in range(runs):
        mine = sum(1 for c in calls if c.door == n)
        run_cap = Cap("run", typical * rng.uniform(0, 2.0 * mine)) if rng.random() < 0.7 else None
        run_caps.append(run_cap)
        caps = [batch] if run_cap is None else [batch, run_cap]
        budgets.append(Budget(caps, per_call_usd=per_call))
    return Case(
        seed,
        http,
        loaded,
        retries,
        batch,
        prespent,
        budgets,
        run_caps,
        per_call,
        calls,
        concurrency,
    )


def doors(case: Case, ledger: Ledger) -> list[Door]:
    limiter = Limiter(case.loaded.config.providers)  # shared by the runs, as in a batch
    out = []
    for n, budget in enumerate(case.budgets):
        door = Door(case.loaded, run_id=f"run-{n}", ledger=ledger, budget=budget, limiter=limiter)
        door.backoff_base_s = 0.002  # the retry policy is under test, not the wall clock
        out.append(door)
    return out


async def complete(door: Door, call: Call) -> None:
    try:
        call.result = await door.complete("m", call.messages, stage="build", tools=call.tools)
    except (BudgetExceeded, ProviderError, RuntimeError) as err:
        call.result = err


def in_thread(door: Door, calls: list[Call]) -> None:
    async def main() -> None:
        await asyncio.gather(*(complete(door, c) for c in calls))

    asyncio.run(main())


async def run_scripted(case: Case, ledger: Ledger) -> None:
    threads = [
        threading.Thread(target=in_thread, args=(door, [c for c in case.calls if c.door == n]))
        for n, door in enumerate(doors(case, ledger))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


async def run_http(case: Case, ledger: Ledger) -> None:
    opened = doors(case, ledger)
    await asyncio.gather(*(complete(opened[c.door], c) for c in case.calls))


def expected(case: Case, call: Call) -> str:
    """What must have happened to a call that was not refused: ok, raise or provider."""
    if call.fail in ("none", "raise"):
        return "ok" if call.fail == "none" else "raise"
    if call.fail == "400":
        return "provider"
    return "ok" if int(call.fail.split("x")[1]) <= case.retries else "provider"


def check_call(case: Case, call: Call, rows: list[CallRow]) -> None:
    rm = case.loaded.model("m")
    result = call.result
    if isinstance(result, BudgetExceeded):
        case.counts["refused"] += 1
        assert rows == [], "a refused call reached the model or was billed"
        per_call = "per-call" in str(result)
        assert per_call == (case.per_call is not None and call.worst > case.per_call)
        return
    outcome = expected(case, call)
    if outcome == "ok":
        assert isinstance(result, Completion), result
        case.counts["ok"] += 1
        [ok] = [r for r in rows if r.outcome == "ok"]
        assert ok.cost_usd == result.cost_usd
        assert ok.prompt_tokens <= call.estimate and ok.completion_tokens <= rm.max_output_tokens
        assert ok.cost_usd <= call.worst + EPS  # within what the door reserved
        if case.per_call is not None:
            assert ok.cost_usd <= case.per_call + EPS
    elif outcome == "raise":
        assert isinstance(result, RuntimeError) and not isinstance(result, ProviderError)
        case.counts["failed"] += 1
        assert rows == []  # a failing script is not a provider call: nothing to bill
    else:
        assert isinstance(result, ProviderError), result
        case.counts["failed"] += 1
        assert all(r.outcome in ("retry", "error") for r in rows) and rows[-1].outcome == "error"
    retries = [r for r in rows if r.outcome == "retry"]
    if call.fail.startswith(("429", "500")):
        assert len(retries) == min(int(call.fail.split("x")[1]), case.retries)
    assert all(r.cost_usd == 0 for r in rows if r.outcome != "ok")
    case.counts["retry rows"] += len(retries)


def refusal_was_due(case: Case, call: Call) -> bool:
    """Even if every other call that went ahead held its worst case at once, this one cannot fit."""
    if case.per_call is not None and call.worst > case.per_call:
        return True
    admitted = [c for c in case.calls if c is not call and not isinstance(c.result, BudgetExceeded)]
    run_cap = case.run_caps[call.door]
    batch_room = case.batch.limit_usd - case.prespent - sum(c.worst for c in admitted)
    if call.worst > batch_room + EPS:
        return True
    if run_cap is None:
        return False
    run_room = run_cap.limit_usd - sum(c.worst for c in admitted if c.door == call.door)
    return call.worst > run_room + EPS


def check_case(case: Case, ledger: Ledger) -> None:
    rows = ledger.rows()
    by_key: dict[str | None, list[CallRow]] = {}
    for row in rows:
        by_key.setdefault(row.request_key, []).append(row)
    rm = case.loaded.model("m")
    for call in case.calls:
        key = request_key(f"run-{call.door}", "build/", rm.name, call.messages, call.tools, None)
        check_call(case, call, by_key.pop(key, []))
    assert by_key == {}, "ledger rows that belong to no call"
    for call in case.calls:
        if isinstance(call.result, BudgetExceeded):
            assert refusal_was_due(case, call), f"call {call.cid} was refused with room left"
    assert {r.outcome for r in rows} <= {"ok", "retry", "error"}

    spent = [
        sum(r.cost_usd for r in rows if r.run_id == f"run-{n}") for n in range(len(case.budgets))
    ]
    total = sum(spent)
    assert total == pytest.approx(
        sum(r.cost_usd for r in rows if r.outcome == "ok"), rel=1e-12, abs=1e-15
    )
    assert case.prespent + total <= case.batch.limit_usd + EPS
    assert case.batch.spent_usd == pytest.approx(case.prespent + total, rel=1e-12, abs=1e-15)
    assert case.batch.reserved_usd == 0
    for n, (budget, cap) in enumerate(zip(case.budgets, case.run_caps, strict=True)):
        assert budget.spent == pytest.approx(spent[n], rel=1e-12, abs=1e-15)
        if cap is not None:
            assert spent[n] <= cap.limit_usd + EPS
            assert cap.spent_usd == pytest.approx(spent[n], rel=1e-12, abs=1e-15)
            assert cap.reserved_usd == 0


class FaultyServer:
    """Scripted replies, after the failures each request's plan asks for (counted per call)."""

    def __init__(self) -> None:
        self.ok = scripted_handler({MODEL_ID: ScriptedModel(MODEL_ID, brain)})
        self.attempts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, request: dict[str, Any]) -> dict[str, Any] | ServerReply:
        found = PLAN.search(str(request.get("messages")))
        assert found is not None
        cid, fail = found.group(1), found.group(5)
        with self._lock:
            self.attempts[cid] += 1
            n = self.attempts[cid]
        if fail == "400":
            return ServerReply(400, error_body("invalid request"))
        if fail.startswith("429") and n <= int(fail[4:]):
            body = error_body("slow down", "rate_limit_exceeded")
            return ServerReply(429, body, {"Retry-After": "0.01"})
        if fail.startswith("500") and n <= int(fail[4:]):
            return ServerReply(500, error_body("internal", "server_error"))
        return self.ok(request)


@pytest.fixture
def fine_switching() -> Iterator[None]:
    """Switch threads often, so reservations of concurrent runs interleave more."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(before)


def summary(kind: str, cases: list[Case]) -> Counter[str]:
    total: Counter[str] = Counter()
    for case in cases:
        total.update(case.counts)
    calls = sum(len(c.calls) for c in cases)
    print(
        f"\n{kind}: {len(cases)} randomized budget cases, {calls} calls: "
        + ", ".join(f"{k} {v}" for k, v in sorted(total.items()))
    )
    return total


async def test_random_budgets_scripted(tmp_path: Path, fine_switching: None) -> None:
    cases = []
    for seed in range(SCRIPTED_CASES):
        case = build_case(seed, http=False, base_url=None)
        with Ledger(tmp_path / f"scripted-{seed}.db") as ledger:
            await run_scripted(case, ledger)
            try:
                check_case(case, ledger)
            except AssertionError as err:
                raise AssertionError(f"scripted case seed={seed}: {err}") from err
        cases.append(case)
    total = summary("scripted", cases)
    assert len(cases) == SCRIPTED_CASES
    # The cases really exercised refusals, failures and successes.
    assert total["refused"] > 100 and total["ok"] > 300 and total["failed"] > 100


async def test_random_budgets_over_http(tmp_path: Path) -> None:
    cases = []
    server = FaultyServer()
    with ChatServer(server, latency_s=0.02) as srv:
        for seed in range(10_000, 10_000 + HTTP_CASES):
            case = build_case(seed, http=True, base_url=srv.base_url)
            with Ledger(tmp_path / f"http-{seed}.db") as ledger:
                await run_http(case, ledger)
                try:
                    check_case(case, ledger)
                    for call in case.calls:  # a refused call never reached the provider
                        made = server.attempts[call.cid] > 0
                        assert made != isinstance(call.result, BudgetExceeded), call
                except AssertionError as err:
                    raise AssertionError(f"http case seed={seed}: {err}") from err
            cases.append(case)
        peak = srv.max_in_flight
    total = summary("http", cases)
    assert len(cases) == HTTP_CASES
    assert total["refused"] > 10 and total["ok"] > 30 and total["failed"] > 10
    assert total["retry rows"] > 10
    assert peak > 1  # calls of several runs were in flight together


def tiktoken_usage(messages: list[Message], tools: list[ToolSpec], choice: str | None) -> object:
    """Bills the prompt as OpenAI counts the request flow sends (litellm's bundled tiktoken)."""
    import litellm

    prompt = litellm.token_counter(
        model="gpt-4o",
        messages=wire.messages_to_wire(messages, DEFAULT_QUIRKS),
        tools=wire.tools_to_wire(tools, DEFAULT_QUIRKS),
    )
    return {"content": "done"}, Usage(prompt_tokens=prompt, completion_tokens=0)


TARGET = {  # one definition, referenced many times: normalization inlines every reference
    "type": "object",
    "description": "A deployment target and all of its options. " * 30,
    "properties": {"host": {"type": "string"}},
}
REF_TOOL = ToolSpec(
    name="deploy",
    description="Deploy to many targets.",
    parameters={
        "type": "object",
        "$defs": {"Target": TARGET},
        "properties": {f"t{i}": {"$ref": "#/$defs/Target"} for i in range(20)},
    },
)


@pytest.mark.parametrize(
    ("prompt", "tools"),
    [
        pytest.param("", None, id="empty"),
        pytest.param("hi", None, id="short"),
        pytest.param("请把这个函数改成异步的，并且添加测试。" * 20, None, id="cjk"),
        pytest.param("9f8e7d6c5b4a3928" * 60, None, id="hex"),
        pytest.param("🚀✅" * 50, None, id="emoji"),
        pytest.param("Write a.py", TOOLS, id="tools"),
        pytest.param(
            "Deploy it",
            [REF_TOOL],
            id="tool-schema-with-refs",  # sized as sent: after the quirks inline the $refs
        ),
    ],
)
async def test_cap_holds_when_prompt_tokens_are_counted_for_real(
    prompt: str, tools: list[ToolSpec] | None
) -> None:
    loaded = parse_config(
        {
            "models": {
                "m": {
                    "id": "scripted/m",
                    "script": f"{__name__}:tiktoken_usage",
                    "price": {"input": 10.0, "output": 0.0},
                    "max_output_tokens": 100,
                }
            },
            "stages": {"planner": {"model": "m"}, "builders": [{"model": "m"}]},
        }
    )
    messages = [Message.system("Be brief."), Message.user(prompt)]
    worst = wire.estimate_tokens(messages, tools) * loaded.model("m").input_per_token
    cap = Cap("run", worst)  # exactly what the door will reserve: the call is allowed
    door = Door(loaded, run_id="r", budget=Budget([cap]))
    done = await door.complete("m", messages, stage="build", tools=tools)
    assert done.usage.prompt_tokens > 0
    assert cap.spent_usd <= cap.limit_usd + EPS


def test_a_cache_price_above_the_input_price_is_still_capped(tmp_path: Path) -> None:
    """The worst case prices every prompt token at the dearer of input and cache-read."""
    script = tmp_path / "cached.py"
    script.write_text(
        "from orchestrator.llm.messages import Message, Usage\n"
        "def reply(messages, tools, tool_choice):\n"
        "    return (Message(role='assistant', content='ok'),\n"
        "            Usage(prompt_tokens=1000, cached_tokens=1000, completion_tokens=0))\n"
    )
    loaded = parse_config(
        {
            "models": {
                "m": {
                    "id": "scripted/m",
                    "script": f"{script}:reply",
                    "family": "a",
                    "price": {"input": 0, "output": 0, "cached_input": 5},
                }
            },
            "stages": {"planner": {"model": "m"}, "builders": [{"model": "m"}]},
        }
    )
    cap = Cap("run", 0.004)  # less than the $0.005 the 1,000 cached tokens would cost
    door = Door(loaded, run_id="r", budget=Budget([cap]))
    with pytest.raises(BudgetExceeded):
        asyncio.run(door.complete("m", [Message.user("hi")], stage="plan"))
    assert cap.spent_usd == 0.0
