"""Atomic spend reservations against one or more caps (per run, per batch).

A call first reserves its worst-case cost against every cap. When the room is held by other
calls' reservations, `wait_reserve` waits for them to settle; a call is refused only when a
cap itself cannot hold it (its limit minus what is spent is less than the worst case).
Settling releases the reservation, records what was really spent and wakes the waiters.
One module-wide lock makes check-and-reserve atomic across Budgets that share a Cap, across
asyncio tasks and threads alike.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterable

from orchestrator.errors import BudgetExceeded

log = logging.getLogger(__name__)
_LOCK = threading.Lock()
_EPSILON = 1e-12  # float noise, far below a billable amount
_WAITERS: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
"""Calls waiting for reservations to settle; every settle wakes them all to try again."""


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Cap:
    """A spending limit in USD; one Cap object may be shared by many Budgets (a batch cap)."""

    def __init__(self, name: str, limit_usd: float, spent_usd: float = 0.0):
        if limit_usd < 0 or spent_usd < 0:
            raise ValueError("a cap's limit and spend cannot be negative")
        self.name = name
        self.limit_usd = float(limit_usd)
        self._spent = float(spent_usd)
        self._reserved = 0.0
        self._holds = 0

    @property
    def spent_usd(self) -> float:
        return self._spent

    @property
    def reserved_usd(self) -> float:
        return self._reserved

    def remaining(self) -> float:
        """What is left to reserve: limit − spent − outstanding reservations."""
        with _LOCK:
            return self._left()

    def _left(self) -> float:
        return self.limit_usd - self._spent - self._reserved

    def __repr__(self) -> str:
        return f"Cap({self.name!r}, limit={self.limit_usd}, spent={self._spent:.6f})"


class Reservation:
    """Money held for one call until it settles; settle exactly once."""

    def __init__(self, budget: Budget, amount: float):
        self.budget = budget
        self.amount = amount
        self.settled: float | None = None

    def settle(self, actual: float) -> None:
        """Release the hold and record `actual` as spent on every cap."""
        if actual < 0:
            raise ValueError("actual spend cannot be negative")
        with _LOCK:
            if self.settled is not None:
                raise RuntimeError("reservation already settled")
            self.settled = actual
            for cap in self.budget.caps:
                cap._holds -= 1
                # Float residue must not pile up: with no holds left nothing is reserved.
                cap._reserved = max(0.0, cap._reserved - self.amount) if cap._holds else 0.0
                cap._spent += actual
            self.budget._spent += actual
            waiters = list(_WAITERS)
            _WAITERS.clear()
        for loop, future in waiters:
            if not loop.is_closed():
                loop.call_soon_threadsafe(_wake, future)
        if actual > self.amount + _EPSILON:
            log.warning("estimate miss: call reserved $%.6f but cost $%.6f", self.amount, actual)

    def release(self) -> None:
        """Settle with nothing spent (the call was not made or billed nothing)."""
        self.settle(0.0)


class Budget:
    """The caps one run spends against, plus an optional per-call ceiling."""

    def __init__(self, caps: Iterable[Cap] = (), *, per_call_usd: float | None = None):
        self.caps = list(caps)
        self.per_call_usd = per_call_usd
        self._spent = 0.0

    @property
    def spent(self) -> float:
        """What was settled through this Budget (a shared cap also counts others' spend)."""
        return self._spent

    def remaining(self) -> float:
        """The most a single call could reserve now (infinite when nothing is capped)."""
        with _LOCK:
            left = min((c._left() for c in self.caps), default=float("inf"))
        if self.per_call_usd is not None:
            left = min(left, self.per_call_usd)
        return max(0.0, left)

    def reserve(self, amount: float) -> Reservation:
        """Hold `amount` on every cap now, or raise BudgetExceeded naming the cap that refuses
        (counting other calls' outstanding reservations as spent)."""
        self._check(amount)
        with _LOCK:
            full = self._full(amount)
            if full is not None:
                cap, left = full
                raise BudgetExceeded(
                    f"budget cap {cap.name!r}: this call may cost up to ${amount:.4f} "
                    f"but ${max(left, 0.0):.4f} of ${cap.limit_usd:.2f} is left"
                )
            return self._hold(amount)

    async def wait_reserve(self, amount: float) -> Reservation:
        """Hold `amount` on every cap, waiting while other calls' reservations fill the room;
        BudgetExceeded only when a cap cannot hold it even after every reservation settles."""
        self._check(amount)
        loop = asyncio.get_running_loop()
        while True:
            with _LOCK:
                for cap in self.caps:
                    left = cap.limit_usd - cap._spent
                    if amount > left + _EPSILON:
                        raise BudgetExceeded(
                            f"budget cap {cap.name!r}: this call may cost up to ${amount:.4f} "
                            f"but ${max(left, 0.0):.4f} of ${cap.limit_usd:.2f} is left"
                        )
                if self._full(amount) is None:
                    return self._hold(amount)
                future: asyncio.Future[None] = loop.create_future()
                _WAITERS.append((loop, future))
            await future

    def _check(self, amount: float) -> None:
        if amount < 0:
            raise ValueError("a reservation cannot be negative")
        if self.per_call_usd is not None and amount > self.per_call_usd:
            raise BudgetExceeded(
                f"per-call cap: this call may cost up to ${amount:.4f}, "
                f"more than the ${self.per_call_usd:.4f} allowed per call"
            )

    def _full(self, amount: float) -> tuple[Cap, float] | None:
        """The first cap without room for `amount` now, and what it has left (under _LOCK)."""
        for cap in self.caps:
            left = cap._left()
            if amount > left + _EPSILON:
                return cap, left
        return None

    def _hold(self, amount: float) -> Reservation:
        for cap in self.caps:
            cap._reserved += amount
            cap._holds += 1
        return Reservation(self, amount)
