"""Budget reservations: refusals, settling, atomicity under concurrency, shared caps."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest

from orchestrator.budget import Budget, Cap
from orchestrator.errors import BudgetExceeded

EPS = 1e-9


def test_reserve_and_settle_records_actual_spend() -> None:
    cap = Cap("run", 1.0)
    budget = Budget([cap])
    r = budget.reserve(0.4)
    assert cap.reserved_usd == pytest.approx(0.4)
    assert budget.remaining() == pytest.approx(0.6)
    r.settle(0.1)
    assert cap.spent_usd == pytest.approx(0.1) and cap.reserved_usd == 0
    assert budget.spent == pytest.approx(0.1)
    assert budget.remaining() == pytest.approx(0.9)
    with pytest.raises(RuntimeError):
        r.settle(0.1)


def test_refuses_when_any_cap_would_be_exceeded() -> None:
    run, batch = Cap("run", 1.0), Cap("batch", 0.5, spent_usd=0.3)
    budget = Budget([run, batch])
    held = budget.reserve(0.15)
    with pytest.raises(BudgetExceeded) as err:
        budget.reserve(0.1)
    assert "'batch'" in str(err.value) and "$0.0500" in str(err.value)
    assert batch.reserved_usd == pytest.approx(0.15) and run.reserved_usd == pytest.approx(0.15)
    held.release()
    budget.reserve(0.2).settle(0.2)
    assert batch.spent_usd == pytest.approx(0.5) and run.spent_usd == pytest.approx(0.2)


def test_per_call_cap() -> None:
    budget = Budget([Cap("run", 10.0)], per_call_usd=0.5)
    with pytest.raises(BudgetExceeded, match="per-call"):
        budget.reserve(0.6)
    assert budget.remaining() == 0.5
    budget.reserve(0.5).settle(0.5)


def test_estimate_miss_records_the_truth(caplog: pytest.LogCaptureFixture) -> None:
    cap = Cap("run", 1.0)
    Budget([cap]).reserve(0.1).settle(0.3)
    assert cap.spent_usd == pytest.approx(0.3)
    assert "estimate miss" in caplog.text


def test_no_caps_means_unlimited() -> None:
    budget = Budget()
    budget.reserve(1e6).settle(5.0)
    assert budget.spent == 5.0 and budget.remaining() == float("inf")


def test_threads_never_overspend_a_shared_cap() -> None:
    batch = Cap("batch", 5.0)
    budgets = [Budget([Cap(f"run{i}", 2.0), batch]) for i in range(2)]
    rng = random.Random(7)
    plans = [[(rng.uniform(0.01, 0.5), rng.random()) for _ in range(40)] for _ in range(50)]
    violations: list[str] = []
    refused = [0]
    start = threading.Barrier(50)

    def check() -> None:
        for cap in [batch, *(c for b in budgets for c in b.caps)]:
            if cap.spent_usd + cap.reserved_usd > cap.limit_usd + EPS:
                violations.append(f"{cap!r} reserved={cap.reserved_usd}")

    def worker(i: int) -> None:
        budget = budgets[i % 2]
        start.wait()
        for price, share in plans[i]:
            try:
                r = budget.reserve(price)
            except BudgetExceeded:
                refused[0] += 1
                continue
            check()
            r.settle(price * share)
            check()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert violations == []
    assert refused[0] > 0  # the caps really were contended
    assert batch.spent_usd <= batch.limit_usd + EPS
    assert batch.reserved_usd == 0
    assert batch.spent_usd == pytest.approx(budgets[0].spent + budgets[1].spent)
    for b in budgets:
        assert b.caps[0].spent_usd == pytest.approx(b.spent)
        assert b.caps[0].spent_usd <= 2.0 + EPS


async def test_asyncio_tasks_never_overspend() -> None:
    cap = Cap("run", 3.0)
    budget = Budget([cap])
    rng = random.Random(11)

    async def task(price: float, share: float) -> bool:
        try:
            r = budget.reserve(price)
        except BudgetExceeded:
            return False
        await asyncio.sleep(0)  # let other tasks reserve while this one is "in flight"
        assert cap.spent_usd + cap.reserved_usd <= cap.limit_usd + EPS
        r.settle(price * share)
        assert cap.spent_usd <= cap.limit_usd + EPS
        return True

    results = await asyncio.gather(*(task(rng.uniform(0.05, 0.4), rng.random()) for _ in range(50)))
    assert not all(results)
    assert cap.spent_usd == pytest.approx(budget.spent)
    assert cap.spent_usd <= 3.0 + EPS
    assert cap.reserved_usd == 0


def test_negative_amounts_are_rejected() -> None:
    budget = Budget([Cap("run", 1.0)])
    with pytest.raises(ValueError):
        budget.reserve(-1)
    with pytest.raises(ValueError):
        budget.reserve(0.1).settle(-0.1)
