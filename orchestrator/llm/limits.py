"""Per-provider in-flight limits and rolling request quotas, enforced by waiting, not failing."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager

from orchestrator.config import Provider

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class _State:
    """One provider's limits, bound to the event loop that created it."""

    def __init__(self, provider: Provider, starts: deque[float]):
        self.semaphore = asyncio.Semaphore(provider.max_concurrency)
        self.window = provider.window
        self.starts = starts
        self.in_flight = 0
        self.max_seen = 0


class Limiter:
    """`async with limiter.slot(name)` holds one of the provider's `max_concurrency` slots.

    Semaphores belong to one event loop; use one Limiter per process (per loop). A provider
    with a `window` quota also waits, before starting, until its oldest request in the rolling
    window has aged out. Unknown provider names get the default Provider limits; None (scripted
    models) is not limited.
    """

    def __init__(
        self,
        providers: Mapping[str, Provider] | None = None,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ):
        self._providers = dict(providers or {})
        self._clock = clock
        self._sleep = sleep
        self._states: dict[str, _State] = {}
        self._starts: dict[str, deque[float]] = {}  # quota history outlives any one loop
        self._loop: asyncio.AbstractEventLoop | None = None

    def _state(self, name: str) -> _State:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # Semaphores cannot cross loops; a new loop (a new `asyncio.run`) starts afresh.
            self._loop, self._states = loop, {}
        state = self._states.get(name)
        if state is None:
            starts = self._starts.setdefault(name, deque())
            state = self._states[name] = _State(self._providers.get(name) or Provider(), starts)
        return state

    async def _wait_for_window(self, state: _State) -> None:
        window = state.window
        if window is None:
            return
        span = window.hours * 3600.0
        while True:
            now = self._clock()
            while state.starts and state.starts[0] <= now - span:
                state.starts.popleft()
            if len(state.starts) < window.requests:
                state.starts.append(now)
                return
            await self._sleep(state.starts[0] + span - now)

    @asynccontextmanager
    async def slot(self, name: str | None) -> AsyncIterator[None]:
        if name is None:
            yield
            return
        state = self._state(name)
        async with state.semaphore:
            await self._wait_for_window(state)
            state.in_flight += 1
            state.max_seen = max(state.max_seen, state.in_flight)
            try:
                yield
            finally:
                state.in_flight -= 1

    def in_flight(self, name: str) -> int:
        state = self._states.get(name)
        return state.in_flight if state else 0

    def max_seen(self, name: str) -> int:
        state = self._states.get(name)
        return state.max_seen if state else 0
