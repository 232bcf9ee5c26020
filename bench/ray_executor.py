"""The Ray executor against the local one, and what a second node buys (issue 13).

    PYTHONPATH=$PWD .venv/bin/python bench/ray_executor.py [--specs 6] [--latency 0.5]
                                                          [--check-cpu-s 2]

Three measurements, each a real batch of copies of the demo spec against a local chat server
that answers after a fixed latency (the demo's scripted models), through litellm:

1. overhead: the same latency-bound batch with the local executor and on a Ray cluster of
   this machine (orchestrator/testing/raycluster.py: a head without CPUs, one worker node);
   the cluster's start is not counted (a user's cluster is already up);
2. slot use: achieved calls/s against the bound C / latency, on one worker node and on two;
3. checks: every spec gets a CPU-heavy check (`--check-cpu-s` of busy work,
   `checks.resources: {num_cpus: 1}`, builders holding 0.05 CPU); one worker node of one
   CPU against two nodes of one CPU each.

This machine has two cores: two "nodes" are two sets of Ray processes on them, so (3) shows
that checks spread over the CPUs Ray is given, not what a second machine would add.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import Timed, write_specs

from orchestrator.batch import BatchOptions, run_batch
from orchestrator.config import load_config
from orchestrator.demo import DemoPaths, prepare_demo
from orchestrator.protocols import ListSink
from orchestrator.testing import ChatServer, scripted_handler
from orchestrator.testing.demo_http import demo_scripts, http_config
from orchestrator.testing.raycluster import Cluster
from orchestrator.workspace import Repo

CONCURRENCY = 4


def config_for(demo: DemoPaths, base_url: str, extra: dict[str, Any]) -> Path:
    data = http_config(demo, base_url, max_concurrency=CONCURRENCY, timeout_s=120)
    data.update(extra)
    path = demo.root / "bench-agents.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def busy_check(seconds: float) -> str:
    """A check that keeps one CPU busy for `seconds` of CPU time, then passes."""
    return (
        'python3 -c "import time; end = time.process_time() + '
        f'{seconds}; all(iter(lambda: time.process_time() < end, False))"'
    )


async def one_batch(
    tmp: Path, n: int, latency_s: float, ray: str | None, extra: dict[str, Any], check: str | None
) -> dict[str, float]:
    demo = prepare_demo(tmp)
    if check is not None:
        text = demo.spec.read_text()
        demo.spec.write_text(text.replace("checks:\n", f"checks:\n  - '{check}'\n", 1))
    timed = Timed(scripted_handler(demo_scripts(demo)), latency_s)
    sink = ListSink()
    with ChatServer(timed, max_concurrency=CONCURRENCY) as srv:
        config = load_config(config_for(demo, srv.base_url, extra))
        specs = write_specs(demo, n)
        began = time.monotonic()
        options = BatchOptions(budget_usd=1000.0, parallel=n, ray=ray)
        result = await run_batch(specs, config, Repo.open(demo.repo), sink, options)
        wall = time.monotonic() - began
    applied = sum(i.status == "applied" for i in result.items)
    intervals = sorted(timed.intervals)
    busy = max(e for _, e in intervals) - intervals[0][0]
    checks = [e for e in sink.events if e.kind == "check"]
    return {
        "wall_s": wall,
        "applied": applied,
        "calls": len(intervals),
        "slot_ratio": len(intervals) / busy / (CONCURRENCY / latency_s),
        "checks": len(checks),
        "rejected": srv.rejected,
    }


def cluster_of(tmp: Path, nodes: int, cpus: int) -> Cluster:
    cluster = Cluster(tmp / "cluster")
    cluster.root.mkdir(parents=True)
    cluster.start_head()
    cluster.wait_for(1)
    for i in range(nodes):
        cluster.add_node(f"node-{i}", cpus=cpus)
        cluster.wait_for(2 + i)
    return cluster


async def on_cluster(
    nodes: int, cpus: int, n: int, latency_s: float, extra: dict[str, Any], check: str | None
) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="flow-bench-ray-") as tmp:
        started = time.monotonic()
        cluster = cluster_of(Path(tmp), nodes, cpus)
        up = time.monotonic() - started
        try:
            out = await one_batch(Path(tmp), n, latency_s, cluster.address, extra, check)
        finally:
            cluster.stop()
    return {**out, "cluster_start_s": up}


def show(name: str, r: dict[str, float]) -> None:
    fields = " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items())
    print(f"{name}: {fields}", flush=True)


async def main_async(n: int, latency_s: float, check_cpu_s: float) -> None:
    with tempfile.TemporaryDirectory(prefix="flow-bench-local-") as tmp:
        local = await one_batch(Path(tmp), n, latency_s, None, {}, None)
    show("local", local)
    one = await on_cluster(1, 8, n, latency_s, {}, None)
    show("ray 1 node", one)
    two = await on_cluster(2, 4, n, latency_s, {}, None)
    show("ray 2 nodes", two)
    print(f"overhead: ray 1 node / local wall = {one['wall_s'] / local['wall_s']:.2f}")
    print(
        f"slot use: local {local['slot_ratio']:.2f}, one node {one['slot_ratio']:.2f}, "
        f"two nodes {two['slot_ratio']:.2f} of the bound"
    )
    heavy = {
        "checks": {"resources": {"num_cpus": 1}},
        "executor": {"ray": {"builder_resources": {"num_cpus": 0.05}}},
    }
    check = busy_check(check_cpu_s)
    c1 = await on_cluster(1, 1, n, latency_s, heavy, check)
    show("checks, 1 node x 1 CPU", c1)
    c2 = await on_cluster(2, 1, n, latency_s, heavy, check)
    show("checks, 2 nodes x 1 CPU", c2)
    print(
        f"checks: {c1['checks']:.0f} / {c2['checks']:.0f} candidates checked; wall "
        f"{c1['wall_s']:.1f} s on one node, {c2['wall_s']:.1f} s on two "
        f"(ratio {c2['wall_s'] / c1['wall_s']:.2f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", type=int, default=6)
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--check-cpu-s", type=float, default=2.0)
    args = parser.parse_args()
    asyncio.run(main_async(args.specs, args.latency, args.check_cpu_s))


if __name__ == "__main__":
    main()
