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

`test_random_budgets_billed_by_the_server` does not trust flow's ledger at all: the test
server bills every request by its own token count (bytes / 4), at its own long-prompt tier,
including requests whose client was cancelled in flight, replies without usage, hung and
truncated replies, and reports that count as the reply's usage, as a real provider does. The
caps are compared with what the server billed, and flow must never book less than it.

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
from orchestrator.testing.server import error_body, server_tokens

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
            worst = loaded.worst_call("m", "build", estimate)
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
        # Refused before it was sent, or (a retry) after attempts that failed unbilled.
        assert all(r.outcome == "retry" and r.cost_usd == 0 for r in rows), rows
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


def refusal_was_due(case: Case, call: Call, rows: list[CallRow]) -> bool:
    """A call waits for other calls' reservations to settle and is refused only when a cap
    cannot hold it: its worst case is more than the cap's limit minus what was spent, and
    spend only grows, so it is more than what was left at the very end too."""
    if case.per_call is not None and call.worst > case.per_call:
        return True
    batch_room = case.batch.limit_usd - case.prespent - sum(r.cost_usd for r in rows)
    if call.worst > batch_room + EPS:
        return True
    run_cap = case.run_caps[call.door]
    if run_cap is None:
        return False
    spent = sum(r.cost_usd for r in rows if r.run_id == f"run-{call.door}")
    return call.worst > run_cap.limit_usd - spent + EPS


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
            assert refusal_was_due(case, call, rows), f"call {call.cid} was refused with room left"
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


BILLED_KINDS = (
    "none",
    "none",
    "none",
    "none",
    "400",
    "429",
    "500",
    "nousage",
    "hang",
    "trunc",
    "cancel",
)


class BillingServer:
    """Replies for the server-billed cases: each request's plan says how its attempts fail.

    `hangxN`/`truncxN`: the first N attempts hang until the client gives up, or send half a
    body; `nousage`: a 200 reply without usage; `cancel`: the request is held until the test
    has cancelled the call that sent it (then answered and billed, as a provider would)."""

    def __init__(self) -> None:
        self.ok = scripted_handler({MODEL_ID: ScriptedModel(MODEL_ID, brain)})
        self.attempts: Counter[str] = Counter()
        self.arrived: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = {}
        self.release: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def __call__(self, request: dict[str, Any]) -> dict[str, Any] | ServerReply:
        found = PLAN.search(str(request.get("messages")))
        assert found is not None
        cid, fail = found.group(1), found.group(5)
        with self._lock:
            self.attempts[cid] += 1
            n = self.attempts[cid]
        kind, _, times = fail.partition("x")
        if kind == "400":
            return ServerReply(400, error_body("invalid request"))
        if kind == "429" and n <= int(times):
            return ServerReply(
                429, error_body("slow down", "rate_limit_exceeded"), {"Retry-After": "0.01"}
            )
        if kind == "500" and n <= int(times):
            return ServerReply(500, error_body("internal", "server_error"))
        if kind == "hang" and n <= int(times):
            return ServerReply(200, fault="hang")
        if kind == "trunc" and n <= int(times):
            return ServerReply(200, self.ok(request), fault="truncate")  # type: ignore[arg-type]
        reply = self.ok(request)
        assert isinstance(reply, dict)
        if kind == "nousage":
            reply["usage"] = None
        if kind == "cancel" and n == 1:
            loop, arrived = self.arrived[cid]
            loop.call_soon_threadsafe(lambda: arrived.done() or arrived.set_result(None))
            self.release[cid].wait(10)  # the provider keeps working after the client left
        return reply


def billed_case(seed: int, base_url: str) -> Case:
    """A randomized case whose calls fail in the ways a real provider bills differently."""
    case = build_case(seed, http=True, base_url=base_url)
    rng = random.Random(seed * 7 + 1)
    for call in case.calls:
        kind = rng.choice(BILLED_KINDS)
        fail = "none" if kind in ("none", "nousage", "cancel") else kind
        if kind in ("429", "500", "hang", "trunc"):
            fail = f"{kind}x{rng.randint(1, case.retries + 1)}"
        elif kind in ("nousage", "cancel", "400"):
            fail = kind
        tag = PLAN.search(call.messages[-1].content or "")
        assert tag is not None
        old = tag.group(0)
        new = old.replace(f"fail={tag.group(5)}", f"fail={fail}")
        text = (call.messages[-1].content or "").replace(old, new)
        call.messages[-1] = Message.user(text)
        call.fail = fail
    return case


def tiered(case: Case, rng: random.Random, base_url: str) -> tuple[int, float, float] | None:
    """Sometimes a long-prompt tier, in the server's bill and in flow's config alike."""
    rm = case.loaded.model("m")
    if rng.random() < 0.6:
        return None
    above = rng.randint(50, 1500)
    inp = rm.input_per_token * rng.uniform(1.0, 3.0)
    out = rm.output_per_token * rng.uniform(1.0, 3.0)
    data = case.loaded.config.model_dump(exclude_defaults=True)
    model = data["models"]["m"]
    model["price"]["tiers"] = [{"above_tokens": above, "input": inp * 1e6, "output": out * 1e6}]
    data["providers"]["local"]["base_url"] = base_url
    case.loaded = parse_config(data)
    for call in case.calls:
        call.worst = case.loaded.worst_call("m", "build", call.estimate)
    return above, inp, out


async def run_billed(case: Case, ledger: Ledger, server: BillingServer) -> None:
    opened = doors(case, ledger)
    loop = asyncio.get_running_loop()

    async def one(call: Call) -> None:
        if call.fail != "cancel":
            await complete(opened[call.door], call)
            return
        arrived: asyncio.Future[None] = loop.create_future()
        server.arrived[call.cid] = (loop, arrived)
        server.release[call.cid] = threading.Event()
        task = asyncio.ensure_future(complete(opened[call.door], call))
        await asyncio.wait({task, arrived}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():  # in flight: the user pressed Ctrl-C
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            call.result = asyncio.CancelledError()
        server.release[call.cid].set()

    await asyncio.gather(*(one(c) for c in case.calls))


def server_bill(srv: ChatServer, case: Case) -> dict[str, float]:
    """What the server billed per call (by the plan tag each request carries)."""
    out: Counter[str] = Counter()
    for request, amount in srv.bill_of:
        found = PLAN.search(str(request.get("messages")))
        assert found is not None
        out[found.group(1)] += amount
    return dict(out)


async def test_random_budgets_billed_by_the_server(tmp_path: Path) -> None:
    """The caps hold against what the provider bills by its own count: its own tokenizer,
    long-prompt tiers, requests cancelled in flight, replies without usage, hung and cut-off
    replies; flow's ledger is never the oracle. Refused calls waited for room first."""
    total: Counter[str] = Counter()
    over = 0.0
    for seed in range(10_000, 10_000 + HTTP_CASES):
        server = BillingServer()
        rng = random.Random(seed)
        case = billed_case(seed, "http://127.0.0.1:9")  # the real address is set below
        rm = case.loaded.model("m")
        prices = (rm.input_per_token, rm.output_per_token)
        with ChatServer(server, latency_s=0.01, own_usage=True, prices=prices) as srv:
            data = case.loaded.config.model_dump(exclude_defaults=True)
            data["providers"]["local"].update(base_url=srv.base_url, timeout_s=0.5)
            case.loaded = parse_config(data)
            srv.tier = tiered(case, rng, srv.base_url)
            total["tiered cases"] += srv.tier is not None
            with Ledger(tmp_path / f"billed-{seed}.db") as ledger:
                await run_billed(case, ledger, server)
                rows = ledger.rows()
            assert srv.wait_idle(), "a request was still being worked on"
        bills = server_bill(srv, case)
        if srv.tier is not None:  # requests the server billed at its long-prompt prices
            above = srv.tier[0]
            total["tier hits"] += sum(
                server_tokens([r.get("system"), r.get("messages"), r.get("tools")]) > above
                for r, _ in srv.bill_of
            )
        try:
            check_billed(case, rows, bills)
        except AssertionError as err:
            raise AssertionError(f"billed case seed={seed}: {err}") from err
        billed = sum(bills.values())
        over = max(over, case.prespent + billed - case.batch.limit_usd)
        total.update(case.counts)
        total["billed cents"] += round(billed * 100)
    print(
        f"\nserver-billed: {HTTP_CASES} cases, "
        + ", ".join(f"{k} {v}" for k, v in sorted(total.items()))
    )
    assert over <= EPS
    assert total["refused"] > 10 and total["ok"] > 30 and total["cancelled"] > 5
    assert total["no usage"] > 5 and total["tier hits"] > 5 and total["billed failures"] > 5


def check_billed(case: Case, rows: list[CallRow], bills: dict[str, float]) -> None:
    rm = case.loaded.model("m")
    keys = {
        call.cid: request_key(
            f"run-{call.door}", "build/", rm.name, call.messages, call.tools, None
        )
        for call in case.calls
    }
    by_key: dict[str | None, list[CallRow]] = {}
    for row in rows:
        by_key.setdefault(row.request_key, []).append(row)
    per_run: Counter[int] = Counter()
    for call in case.calls:
        mine = by_key.get(keys[call.cid], [])
        billed = bills.get(call.cid, 0.0)
        per_run[call.door] += billed
        booked = sum(r.cost_usd for r in mine)
        # flow never books less than the provider billed: the caps count real money.
        assert booked + EPS >= billed, (call, billed, mine)
        if isinstance(call.result, BudgetExceeded):
            case.counts["refused"] += 1
            assert refusal_was_due(case, call, rows), f"{call.cid} was refused with room left"
        elif isinstance(call.result, asyncio.CancelledError):
            case.counts["cancelled"] += 1
            assert [r.outcome for r in mine][-1] == "cancelled"
        elif isinstance(call.result, Completion):
            case.counts["ok"] += 1
        if call.fail == "nousage" and isinstance(call.result, Completion):
            case.counts["no usage"] += 1
            assert any("without usage" in (r.error or "") for r in mine), mine
            assert call.result.cost_usd >= max(billed, 0.99 * call.worst)  # its worst case
        if billed and not isinstance(call.result, Completion):
            case.counts["billed failures"] += 1
    assert sum(per_run.values()) + case.prespent <= case.batch.limit_usd + EPS
    for n, cap in enumerate(case.run_caps):
        if cap is not None:
            assert per_run[n] <= cap.limit_usd + EPS, (n, per_run[n], cap)
    assert case.batch.reserved_usd == 0


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
