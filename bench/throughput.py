"""How busy flow keeps a provider's slots during a real batch, against the bound C / latency.

    python bench/throughput.py [--concurrency C] [--latency S] [--specs N]

A local chat server allows C requests in flight (429 beyond) and answers each after a fixed
latency, with the demo's scripted models. N copies of the demo spec run as one batch
(`run_batch`, `--parallel N`) through litellm, as in production. A provider slot can serve at
most C / latency calls per second; the ratio of the achieved rate to that bound says how much
of the plan flow used, and the server's 429 count how often flow overran it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from batchloop import (
    Probes,
    StallWatch,
    StampSink,
    idle_between_specs,
    ms,
    pool_waits,
    slot_use,
)

from orchestrator.batch import BatchOptions, run_batch
from orchestrator.config import LoadedConfig, load_config
from orchestrator.demo import DemoPaths, prepare_demo
from orchestrator.llm.door import Door
from orchestrator.llm.messages import Message
from orchestrator.testing import ChatServer, ServerReply, scripted_handler
from orchestrator.testing.demo_http import demo_scripts, http_config
from orchestrator.testing.server import Handler
from orchestrator.workspace import Repo

DEMO_BRANCH = "branch: flow/add-median"


class Timed:
    """The demo's scripted models behind a fixed latency, with each served call's interval."""

    def __init__(self, inner: Handler, latency_s: float):
        self.inner = inner
        self.latency_s = latency_s
        self.intervals: list[tuple[float, float]] = []
        self._lock = threading.Lock()

    def __call__(self, request: dict[str, Any]) -> dict[str, Any] | ServerReply:
        start = time.monotonic()
        time.sleep(self.latency_s)  # the model's work; the server counts it as in flight
        reply = self.inner(request)
        with self._lock:
            self.intervals.append((start, time.monotonic()))
        return reply


def write_config(demo: DemoPaths, base_url: str, concurrency: int) -> Path:
    data = http_config(demo, base_url, max_concurrency=concurrency, timeout_s=120)
    path = demo.root / "bench-agents.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def write_specs(demo: DemoPaths, n: int) -> list[Path]:
    text = demo.spec.read_text()
    if DEMO_BRANCH not in text:
        raise SystemExit(f"the demo spec no longer says {DEMO_BRANCH!r}; update the benchmark")
    paths = []
    for i in range(n):
        path = demo.root / f"spec-{i:02d}.md"
        path.write_text(text.replace(DEMO_BRANCH, f"{DEMO_BRANCH}-{i:02d}"))
        paths.append(path)
    return paths


def idle_slots(
    intervals: list[tuple[float, float]], concurrency: int
) -> tuple[float, float, float]:
    """Idle slot-seconds of the busy period: before all C slots first fill, after they last
    were all full, and in between."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    level, last = 0, events[0][0]
    idle: list[tuple[float, float]] = []  # (time, idle slot-seconds of the span ending there)
    full_first = full_last = None
    for t, step in events:
        idle.append((t, (concurrency - level) * (t - last)))
        level += step
        last = t
        if level >= concurrency:
            full_first = t if full_first is None else full_first
            full_last = t
    if full_first is None or full_last is None:
        total = sum(x for _, x in idle)
        return total, 0.0, 0.0
    head = sum(x for t, x in idle if t <= full_first)
    tail = sum(x for t, x in idle if t > full_last)
    return head, sum(x for _, x in idle) - head - tail, tail


async def calls_only(config: LoadedConfig, n: int) -> str:
    """The same number of calls from one Door, no batch: litellm and HTTP overhead alone."""
    door = Door(config, run_id="calls-only")
    await door.complete("flash-sim", [Message.user("warm-up")], stage="warm-up")
    calls = [
        door.complete("flash-sim", [Message.user(f"call {i}")], stage="bench") for i in range(n)
    ]
    await asyncio.gather(*calls)
    return f"calls-only: {n} calls"


async def batch(
    config: LoadedConfig, demo: DemoPaths, n_specs: int, parallel: int, sink: StampSink
) -> str:
    specs = write_specs(demo, n_specs)
    options = BatchOptions(budget_usd=1000.0, parallel=parallel)
    result = await run_batch(specs, config, Repo.open(demo.repo), sink, options)
    statuses = sorted({i.status for i in result.items})
    counts = " ".join(f"{s}:{sum(1 for i in result.items if i.status == s)}" for s in statuses)
    return f"specs={n_specs} parallel={parallel} outcomes={counts}"


async def bench(
    concurrency: int,
    latency_s: float,
    n_specs: int,
    parallel: int,
    only_calls: int | None,
    stalls: bool = False,
) -> None:
    probes = Probes()
    probes.install(asyncio.get_running_loop())
    sink = StampSink()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="flow-bench-") as tmp, probes.wrapped():
        demo = prepare_demo(Path(tmp))
        timed = Timed(scripted_handler(demo_scripts(demo)), latency_s)
        with ChatServer(timed, max_concurrency=concurrency) as srv:
            config = load_config(write_config(demo, srv.base_url, concurrency))
            began = time.monotonic()
            watch = StallWatch() if stalls else None
            if watch is not None:
                watch.start()
            ticker = asyncio.ensure_future(probes.ticker(watch))
            if only_calls is None:
                what = await batch(config, demo, n_specs, parallel, sink)
            else:
                what = await calls_only(config, only_calls)
                timed.intervals = timed.intervals[1:]  # not the warm-up
            wall = time.monotonic() - began
            probes.stop()
            await ticker
            if watch is not None:
                watch.stop()
                for where, n in watch.samples.most_common(25):
                    print(f"stall_sample {n:4d} {where}")
            requests, rejected, peak = len(srv.requests), srv.rejected, srv.max_in_flight
        intervals = sorted(timed.intervals)
    if not intervals:
        raise SystemExit("no chat call was served")
    first, last = intervals[0][0], max(e for _, e in intervals)
    busy = last - first
    served = len(intervals)
    achieved = served / busy
    bound = concurrency / latency_s
    head, middle, tail = idle_slots(intervals, concurrency)
    print(f"{what} concurrency={concurrency} latency_s={latency_s}")
    print(f"wall_s={wall:.2f}")
    print(f"startup_s={first - began:.2f}  (start to the first request served)")
    print(f"chat_calls_served={served}")
    print(f"http_requests={requests}")
    print(f"busy_period_s={busy:.2f}")
    print(f"achieved_calls_per_s={achieved:.3f}")
    print(f"bound_calls_per_s={bound:.3f}")
    print(f"server_peak_in_flight={peak}")
    print(f"idle_slot_s_head={head:.2f} middle={middle:.2f} tail={tail:.2f}")
    if only_calls is None:
        between = idle_between_specs(intervals, concurrency, sink, n_specs, parallel)
        print(f"idle_slot_s_between_specs={between:.2f}")
    share = probes.writes.union_s() / wall
    print(
        f"checkpoint_writes={probes.n_writes} wall_share={share:.3f} "
        f"sum_s={probes.writes.sum_s():.2f} serialize_sum_s={probes.serialize.sum_s():.2f}"
    )
    if probes.slot_calls:
        overhead, waited, starved = slot_use(probes.slot_calls, intervals, concurrency)
        print(
            f"slot_s_held_not_served={overhead:.2f} free_while_a_call_waited={waited:.2f} "
            f"free_with_none_waiting={starved:.2f}"
        )
    print(f"default_executor_wait: {ms(probes.default_waits)}")
    for name, waits in pool_waits().items():
        print(f"pool_wait[{name}]: {ms(waits)}")
    print(f"loop_lag: {ms(probes.lags)}")
    print(f"loadavg_before={load[0]:.2f},{load[1]:.2f},{load[2]:.2f}")
    print(f"ratio={achieved / bound:.2f} rejected={rejected}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=4, help="server and provider slots")
    parser.add_argument("--latency", type=float, default=0.5, help="seconds per chat call")
    parser.add_argument("--specs", type=int, default=12, help="spec copies in the batch")
    parser.add_argument("--parallel", type=int, default=None, help="batch --parallel (default N)")
    parser.add_argument(
        "--calls-only",
        type=int,
        default=None,
        metavar="K",
        help="instead of a batch, K concurrent calls from one Door (the client's own overhead)",
    )
    parser.add_argument(
        "--stalls", action="store_true", help="sample where the event loop is blocked (> 30 ms)"
    )
    args = parser.parse_args()
    parallel = args.parallel if args.parallel is not None else args.specs
    asyncio.run(
        bench(args.concurrency, args.latency, args.specs, parallel, args.calls_only, args.stalls)
    )


if __name__ == "__main__":
    main()
