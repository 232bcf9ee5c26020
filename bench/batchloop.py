"""Where a batch's event loop and threads lose time: probes for bench/throughput.py.

- checkpoint writes: the union of the intervals in which at least one `aput`/`aput_writes`
  of the checkpointer is in progress, as a share of the wall time, and how much of it is
  serialization (`dumps_typed`, which LangGraph's saver runs on the calling thread);
- thread wait: for every job handed to the loop's default executor (and flow's own pools,
  when they exist), the time from submit to the start of its work;
- event-loop lag: a ticker that asks to wake every 10 ms and records how late it woke;
- idle slot-seconds between specs: idle slots while fewer runs have started than could run
  (a gate slot free while a spec waits, or a run still starting up).

The probes wrap library classes for measurement only; they are a benchmark's, not a test's.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from orchestrator.events import Event, RunFinished, RunStarted

TICK_S = 0.01


class Intervals:
    """Intervals of some activity, possibly overlapping, from several threads."""

    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] = []
        self._lock = threading.Lock()

    def add(self, start: float, end: float) -> None:
        with self._lock:
            self.spans.append((start, end))

    def union_s(self) -> float:
        total, cur_s, cur_e = 0.0, None, None
        for s, e in sorted(self.spans):
            if cur_e is None or s > cur_e:
                if cur_e is not None and cur_s is not None:
                    total += cur_e - cur_s
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        if cur_e is not None and cur_s is not None:
            total += cur_e - cur_s
        return total

    def sum_s(self) -> float:
        return sum(e - s for s, e in self.spans)


class TimingExecutor(ThreadPoolExecutor):
    """The default executor, recording each job's wait for a worker thread."""

    def __init__(self, waits: list[float]) -> None:
        super().__init__(thread_name_prefix="asyncio-default")
        self.waits = waits

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        queued = time.monotonic()

        def timed() -> Any:
            self.waits.append(time.monotonic() - queued)
            return fn(*args, **kwargs)

        return super().submit(timed)


class StampSink:
    """Collects events with their time, for when each run started and finished."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.started: dict[str, float] = {}
        self.finished: dict[str, float] = {}

    def emit(self, event: Event) -> None:
        self.events.append(event)
        if isinstance(event, RunStarted):
            self.started.setdefault(event.run_id, time.monotonic())
        elif isinstance(event, RunFinished):
            self.finished[event.run_id] = time.monotonic()


class Probes:
    def __init__(self) -> None:
        self.default_waits: list[float] = []
        self.lags: list[float] = []
        self.writes = Intervals()
        self.serialize = Intervals()
        self.n_writes = 0
        self.slot_calls: list[tuple[float, float, float]] = []
        self._stop = False

    @contextmanager
    def wrapped(self) -> Iterator[None]:
        """The checkpointer's writes and the serializer, timed while inside."""
        from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
        from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

        originals: list[tuple[type, str, Any]] = []

        def wrap_async(cls: type, name: str) -> None:
            inner = getattr(cls, name)
            originals.append((cls, name, inner))

            async def timed(*args: Any, **kwargs: Any) -> Any:
                start = time.monotonic()
                try:
                    return await inner(*args, **kwargs)
                finally:
                    self.writes.add(start, time.monotonic())
                    self.n_writes += 1

            setattr(cls, name, timed)

        savers: list[type] = [AsyncSqliteSaver]
        try:
            from orchestrator.checkpoints import FlowSaver

            savers.append(FlowSaver)
        except ImportError:  # flow before its own saver
            pass
        for cls in savers:
            for name in ("aput", "aput_writes"):
                if name in vars(cls):
                    wrap_async(cls, name)
        dumps = JsonPlusSerializer.dumps_typed
        originals.append((JsonPlusSerializer, "dumps_typed", dumps))

        def timed_dumps(serde: Any, obj: Any) -> Any:
            start = time.monotonic()
            try:
                return dumps(serde, obj)
            finally:
                self.serialize.add(start, time.monotonic())

        JsonPlusSerializer.dumps_typed = timed_dumps  # type: ignore[method-assign]
        from orchestrator.llm.limits import Limiter

        slot = Limiter.slot
        originals.append((Limiter, "slot", slot))
        calls = self.slot_calls

        @asynccontextmanager
        async def timed_slot(limiter: Any, name: str | None) -> AsyncIterator[None]:
            want = time.monotonic()
            async with slot(limiter, name):
                got = time.monotonic()
                try:
                    yield
                finally:
                    calls.append((want, got, time.monotonic()))

        Limiter.slot = timed_slot  # type: ignore[method-assign,assignment]
        try:
            yield
        finally:
            for cls, name, fn in originals:
                setattr(cls, name, fn)

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.set_default_executor(TimingExecutor(self.default_waits))

    async def ticker(self, watch: StallWatch | None = None) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop:
            due = loop.time() + TICK_S
            await asyncio.sleep(TICK_S)
            self.lags.append(max(0.0, loop.time() - due))
            if watch is not None:
                watch.beat = time.monotonic()

    def stop(self) -> None:
        self._stop = True


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(values: list[float]) -> str:
    if not values:
        return "n=0"
    return (
        f"n={len(values)} p50={pct(values, 0.5) * 1000:.1f}ms p99={pct(values, 0.99) * 1000:.1f}ms "
        f"max={max(values) * 1000:.1f}ms mean={statistics.fmean(values) * 1000:.1f}ms"
    )


def pool_waits() -> dict[str, list[float]]:
    """flow's own pools' waits, if this version of flow has them."""
    try:
        from orchestrator import pools
    except ImportError:
        return {}
    return {p.name: list(p.waits) for p in pools.all_pools()}


def idle_between_specs(
    intervals: list[tuple[float, float]],
    concurrency: int,
    sink: StampSink,
    n_specs: int,
    parallel: int,
) -> float:
    """Idle slot-seconds of the busy period while fewer runs are going than could be: a spec
    waits (or is still starting up) though the batch has room for it."""
    first = min(s for s, _ in intervals)
    last = max(e for _, e in intervals)
    marks = sorted(
        {first, last}
        | {s for s, _ in intervals}
        | {e for _, e in intervals}
        | {t for t in sink.started.values() if first < t < last}
        | {t for t in sink.finished.values() if first < t < last}
    )
    total = 0.0
    for a, b in itertools.pairwise(marks):
        mid = (a + b) / 2
        in_flight = sum(1 for s, e in intervals if s <= mid < e)
        going = sum(
            1
            for r, t in sink.started.items()
            if t <= mid and sink.finished.get(r, float("inf")) > mid
        )
        done = sum(1 for t in sink.finished.values() if t <= mid)
        room = min(parallel, n_specs - done)
        if going < room:
            total += (concurrency - in_flight) * (b - a)
    return total


class StallWatch:
    """A thread that, whenever the loop has not ticked for `stall_s`, samples the loop
    thread's stack: where the loop is blocked, by flow's innermost frame."""

    def __init__(self, stall_s: float = 0.03) -> None:
        self.stall_s = stall_s
        self.beat = time.monotonic()
        self.samples: Counter[str] = Counter()
        self._loop_thread = threading.get_ident()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.stall_s / 3):
            if time.monotonic() - self.beat < self.stall_s:
                continue
            frame = sys._current_frames().get(self._loop_thread)
            stack = traceback.extract_stack(frame) if frame else []
            ours = [f for f in stack if "/orchestrator/" in f.filename]
            lib = stack[-1] if stack else None
            where = (
                f"{ours[-1].filename.split('/orchestrator/')[-1]}:{ours[-1].lineno}"
                if ours
                else "?"
            )
            inner = f"{lib.filename.split('site-packages/')[-1]}:{lib.lineno}" if lib else "?"
            self.samples[f"{where} -> {inner}"] += 1


def slot_use(
    calls: list[tuple[float, float, float]], served: list[tuple[float, float]], concurrency: int
) -> tuple[float, float, float]:
    """From flow's side of the slots, over the server's busy period: slot-seconds held while
    the server was not serving (flow's own per-call work), free while a call waited for one
    (should be none), and free with no call waiting (the runs had nothing to send)."""
    first = min(s for s, _ in served)
    last = max(e for _, e in served)
    held = sum(max(0.0, min(d, last) - max(g, first)) for _, g, d in calls)
    busy = sum(e - s for s, e in served)
    marks = sorted({first, last} | {t for c in calls for t in c if first < t < last})
    waited = starved = 0.0
    for a, b in itertools.pairwise(marks):
        mid = (a + b) / 2
        holding = sum(1 for _, g, d in calls if g <= mid < d)
        waiting = sum(1 for w, g, _ in calls if w <= mid < g)
        free = max(0, concurrency - holding) * (b - a)
        if waiting:
            waited += free
        else:
            starved += free
    return held - busy, waited, starved
