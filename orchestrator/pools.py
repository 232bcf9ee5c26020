"""Bounded thread pools for blocking work, one per kind, all runs of a process sharing them.

asyncio's default executor (min(32, cores + 4) threads) also resolves host names for every
connection a model call opens; when git checkouts fill it, a call waits behind them. So
flow never puts its own blocking work there: git and file trees go to `git`, SQLite writes
to `db`, anything else that blocks (token counting, probes) to `work`. Each pool is created
on first use and its bound is read then (`FLOW_GIT_THREADS`, `FLOW_DB_THREADS`,
`FLOW_WORK_THREADS` override the defaults).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

WAITS_KEPT = 10_000


def _bound(env: str, default: int) -> int:
    raw = os.environ.get(env, "")
    return max(1, int(raw)) if raw.isdigit() else default


class Pool:
    """A named, bounded executor that records how long each job waited for a thread."""

    def __init__(self, name: str, env: str, default: Callable[[], int]):
        self.name = name
        self._env, self._default = env, default
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.workers = 0
        self.waits: deque[float] = deque(maxlen=WAITS_KEPT)
        self.busy = 0
        self.peak = 0
        self._pending: set[Future[Any]] = set()

    def executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self.workers = _bound(self._env, self._default())
                self._executor = ThreadPoolExecutor(
                    max_workers=self.workers, thread_name_prefix=f"flow-{self.name}"
                )
            return self._executor

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`fn(*args, **kwargs)` on one of this pool's threads, with the caller's context."""
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def submit(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        queued = time.monotonic()

        def timed() -> T:
            with self._lock:
                self.waits.append(time.monotonic() - queued)
                self.busy += 1
                self.peak = max(self.peak, self.busy)
            try:
                return call()
            finally:
                with self._lock:
                    self.busy -= 1

        job = self.executor().submit(timed)
        with self._lock:
            self._pending.add(job)
        job.add_done_callback(self._done)
        return job

    def _done(self, job: Future[Any]) -> None:
        with self._lock:
            self._pending.discard(job)

    def wait_idle(self) -> None:
        """Block until every job submitted so far has ended (or was cancelled unstarted)."""
        with self._lock:
            pending = list(self._pending)
        wait(pending)


def _cores() -> int:
    return os.cpu_count() or 2


GIT = Pool("git", "FLOW_GIT_THREADS", lambda: _cores() + 2)
"""git commands and checkout file trees: partly disk-bound, so a few more than the cores."""
DB = Pool("db", "FLOW_DB_THREADS", lambda: 2)
"""SQLite reads and writes of the ledger and the run store (writes serialize in SQLite)."""
WORK = Pool("work", "FLOW_WORK_THREADS", lambda: _cores() + 4)
"""Other blocking work: token counting, imports, probes of the machine."""


def all_pools() -> list[Pool]:
    return [GIT, DB, WORK]


async def git(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    return await GIT.run(fn, *args, **kwargs)


async def db(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    return await DB.run(fn, *args, **kwargs)


async def work(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    return await WORK.run(fn, *args, **kwargs)
