"""Adaptive N against a fixed N: wall time and the provider's own bill, in one run.

    python bench/adaptive.py [--latency S] [--passing 2,5]

Six builders try the demo spec through litellm against a local chat server that answers every
call after a fixed latency and bills each by its own token count (`ChatServer(prices=...)`).
The builders at the `--passing` positions (1-based) write the honest fix; the others a wrong
one that fails the spec's check. The same setup runs twice, in fresh copies of the demo
repository: `builders: 6` (every builder starts) and `builders: {max: 6, enough: 2}`.
Printed: each run's wall time, server bill, chat calls served and builders not started, and
the adaptive run's ratios to the fixed one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from orchestrator.demo import prepare_demo
from orchestrator.llm.scripted import ScriptedModel
from orchestrator.testing import ChatServer, scripted_handler

PRICE_IN, PRICE_OUT = 1e-6, 4e-6  # USD per token, the server's own bill
HONEST = """

def median(values: list[float]) -> float:
    \"\"\"Middle value (mean of the two middle ones for even lengths).\"\"\"
    if not values:
        raise ValueError("median of an empty list")
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    return (ordered[mid - 1] + ordered[mid]) / 2
"""
BRANCH = "branch: flow/add-median\n"
WRONG = '\n\ndef median(values):\n    """Wrong on purpose."""\n    return 0\n'


def _call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"tool_calls": [{"name": name, "arguments": arguments}]}


def _builder(text: str) -> list[dict[str, Any]]:
    edit = _call("run", command=f"cat >> stats.py <<'EOF'\n{text}EOF")
    return [_call("read_file", path="stats.py"), edit, _call("finish", summary="done")]


def write_scripts(root: Path, passing: set[int]) -> dict[str, ScriptedModel]:
    """The planner's, the reviewer's and six builders' reply scripts."""
    scripts: dict[str, Any] = {
        "planner": [_call("submit_plan", summary="add median", steps=["add median"])],
        "judge": [_call("submit_review", score=8, verdict="approve", summary="ok", findings=[])],
    }
    for i in range(1, 7):
        scripts[f"b{i}"] = _builder(HONEST if i in passing else WRONG)
    for name, replies in scripts.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump({"replies": replies}))
    return {name: ScriptedModel(name, root / f"{name}.yaml") for name in scripts}


def write_config(root: Path, names: list[str], base_url: str) -> Path:
    price = {"input": PRICE_IN * 1e6, "output": PRICE_OUT * 1e6}
    models = {
        name: {
            "provider": "local",
            "id": name,
            "family": "openai" if name == "judge" else "zhipu",
            "price": price,
        }
        for name in names
    }
    config = {
        "providers": {"local": {"api": "openai", "base_url": base_url, "api_key": "${BENCH_KEY}"}},
        "models": models,
        "stages": {
            "planner": {"model": "planner"},
            "builders": [{"model": f"b{i}"} for i in range(1, 7)],
            "reviewers": [{"model": "judge"}],
        },
    }
    path = root / "bench-agents.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(root: Path, passing: set[int], latency_s: float, front: str) -> dict[str, Any]:
    """One `flow run` of the demo spec with six builders; the server's bill and wall time."""
    root.mkdir()
    demo = prepare_demo(root)
    text = demo.spec.read_text()
    demo.spec.write_text(text.replace(BRANCH, BRANCH + front, 1))
    scripts = write_scripts(root, passing)
    prices = (PRICE_IN, PRICE_OUT)
    with ChatServer(scripted_handler(scripts), latency_s=latency_s, prices=prices) as srv:
        config = write_config(root, list(scripts), srv.base_url)
        command = [sys.executable, "-m", "orchestrator", "run", str(demo.spec)]
        began = time.monotonic()
        out = subprocess.run(
            [*command, "--config", str(config)],
            cwd=demo.repo,
            env={**os.environ, "BENCH_KEY": "sk-bench-0001"},
            capture_output=True,
            text=True,
        )
        wall = time.monotonic() - began
        billed, served = srv.billed_usd, len(srv.requests)
    if out.returncode != 0:
        raise SystemExit(f"flow run failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    summary = json.loads(next((demo.repo / ".flow" / "runs").glob("*/run.json")).read_text())
    winner = summary["candidates"][summary["selection"]["winner"]]["model"]
    not_started = sum(c["status"] == "not started" for c in summary["candidates"])
    return {
        "wall_s": wall,
        "billed_usd": billed,
        "calls": served,
        "not_started": not_started,
        "winner": winner,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.5, help="seconds per chat call")
    parser.add_argument("--passing", default="2,5", help="1-based positions of the honest builders")
    args = parser.parse_args()
    passing = {int(p) for p in args.passing.split(",")}
    with tempfile.TemporaryDirectory(prefix="flow-bench-adaptive-") as tmp:
        fixed = run(Path(tmp) / "fixed", passing, args.latency, "")
        adaptive = run(
            Path(tmp) / "adaptive", passing, args.latency, "builders: {max: 6, enough: 2}\n"
        )
    for name, r in (("fixed N=6", fixed), ("{max: 6, enough: 2}", adaptive)):
        print(
            f"{name:22} wall_s={r['wall_s']:.2f} billed_usd={r['billed_usd']:.6f} "
            f"chat_calls={r['calls']} not_started={r['not_started']} winner={r['winner']}"
        )
    print(
        f"passing builders at {sorted(passing)}, latency {args.latency} s: "
        f"wall ratio {adaptive['wall_s'] / fixed['wall_s']:.2f}, "
        f"spend ratio {adaptive['billed_usd'] / fixed['billed_usd']:.2f}"
    )


if __name__ == "__main__":
    main()
