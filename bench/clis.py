"""Agent CLIs through flow's proxy, measured in one run:

1. proxy overhead per call, per dialect: the same door call made directly, through the proxy's
   TCP port, and from inside a CLI's sandbox (bubblewrap, loopback bridge, Unix socket);
2. per CLI: the wall time of a whole one-answer session (start-up overhead) under the sandbox,
   and the request shapes the CLI sent (paths, stream flag, body keys, tool names).

Run: LITELLM_LOCAL_MODEL_COST_MAP=True FLOW_CLI_PATH="$(bash .ci/clis.sh)" \
     .venv/bin/python bench/clis.py [--calls N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator import sandbox
from orchestrator.agents.cli import CLIS, CliBuilder
from orchestrator.agents.cli.base import Launch, base_env, confined_argv
from orchestrator.config import LoadedConfig, parse_config
from orchestrator.ledger import Ledger
from orchestrator.llm.door import Door
from orchestrator.llm.messages import Message
from orchestrator.llm.scripted import ScriptedModel
from orchestrator.proxy import Proxy
from orchestrator.redact import Redactor
from orchestrator.testing import ChatServer, scripted_handler
from orchestrator.workspace import Repo

BODIES: dict[str, tuple[str, dict[str, Any]]] = {
    "chat": (
        "/v1/chat/completions",
        {"model": "x", "stream": True, "messages": [{"role": "user", "content": "p"}]},
    ),
    "anthropic": (
        "/v1/messages",
        {
            "model": "x",
            "max_tokens": 100,
            "stream": True,
            "messages": [{"role": "user", "content": "p"}],
        },
    ),
    "responses": ("/v1/responses", {"model": "x", "stream": True, "input": "p"}),
}

CLIENT = """
import json, sys, time, urllib.request
url, token, body, n = sys.argv[1], sys.argv[2], sys.argv[3].encode(), int(sys.argv[4])
def call():
    req = urllib.request.Request(url, data=body, headers={
        "Authorization": "Bearer " + token, "x-api-key": token,
        "Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        r.read()
call()
start = time.perf_counter()
for _ in range(n):
    call()
print(json.dumps({"per_call_s": (time.perf_counter() - start) / n}))
"""


def config(base_url: str) -> LoadedConfig:
    provider = {"api": "openai", "base_url": base_url, "api_key": "LOCAL_TEST_KEY"}
    return parse_config(
        {
            "providers": {"local": {**provider, "max_concurrency": 8}},
            "models": {
                "glm": {"provider": "local", "id": "glm-4.7", "price": {"input": 0, "output": 0}}
            },
            "stages": {"planner": {"model": "glm"}, "builders": [{"model": "glm"}]},
        }
    )


def _post(url: str, token: str, body: dict[str, Any]) -> None:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Authorization": "Bearer " + token, "x-api-key": token},
    )
    with urllib.request.urlopen(req) as reply:
        reply.read()


async def per_call(door: Door, n: int) -> dict[str, float]:
    """Seconds per call: direct, and per dialect via TCP and via the sandbox's bridge."""
    await door.complete("glm", [Message.user("warm")], stage="build")
    start = time.perf_counter()
    for i in range(n):
        await door.complete("glm", [Message.user(f"d{i}")], stage="build")
    out = {"direct": (time.perf_counter() - start) / n}
    for dialect, (path, body) in BODIES.items():
        async with Proxy(door, "glm", stage="build", scope=dialect) as proxy:
            url = proxy.base_url + path
            await asyncio.to_thread(_post, url, proxy.token, body)
            start = time.perf_counter()
            for _ in range(n):
                await asyncio.to_thread(_post, url, proxy.token, body)
            out[f"{dialect} tcp"] = (time.perf_counter() - start) / n
            if sandbox.bwrap() is not None:
                out[f"{dialect} sandbox"] = await _from_sandbox(proxy, url, body, n)
    return out


async def _from_sandbox(proxy: Proxy, url: str, body: dict[str, Any], n: int) -> float:
    with tempfile.TemporaryDirectory(prefix="flow-bench-") as tmp:
        home, checkout = Path(tmp) / "home", Path(tmp) / "checkout"
        (home / "tmp").mkdir(parents=True)
        checkout.mkdir()
        argv = [sys.executable, "-I", "-c", CLIENT, url, proxy.token, json.dumps(body), str(n)]
        launch = Launch(argv=argv, env=base_env(home))
        full = confined_argv(launch, checkout, home, proxy)
        proc = await asyncio.create_subprocess_exec(
            *full, env=launch.env, stdout=asyncio.subprocess.PIPE, cwd=checkout
        )
        out, _ = await proc.communicate()
    return float(json.loads(out.decode().strip().splitlines()[-1])["per_call_s"])


def _checkout(tmp: Path) -> Path:
    import subprocess

    repo = tmp / "user"
    repo.mkdir(parents=True)
    git = ["git", "-C", str(repo), "-c", "user.name=b", "-c", "user.email=b@b"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "README.md").write_text("base\n")
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "base"], check=True)
    user = Repo.open(repo)
    return user.add_worktree(tmp / "checkout", user.resolve("HEAD"))


async def session(door: Door, name: str, tmp: Path) -> dict[str, Any]:
    checkout = _checkout(tmp / name)
    builder = CliBuilder(
        door,
        "glm",
        "glm-4.7",
        CLIS[name](),
        transcript=tmp / name / "t.jsonl",
        redact=Redactor([]),
        timeout_s=300,
        scope=name,
    )
    start = time.perf_counter()
    await builder.run("Say done.", checkout)
    wall = time.perf_counter() - start
    shapes = {json.dumps(c.shape, sort_keys=True) for c in builder.log.calls}
    return {
        "wall_s": wall,
        "calls": len(builder.log.calls),
        "error": builder.outcome.error,
        "shapes": [json.loads(s) for s in sorted(shapes)],
    }


async def main(n: int) -> None:
    os.environ.setdefault("LOCAL_TEST_KEY", "sk-bench")
    model = ScriptedModel("glm-4.7", lambda m, t, c: {"content": "Done."})
    with (
        ChatServer(scripted_handler({"glm-4.7": model})) as srv,
        tempfile.TemporaryDirectory(prefix="flow-bench-") as tmp,
    ):
        door = Door(config(srv.base_url), run_id="bench", ledger=Ledger(Path(tmp) / "l.db"))
        calls = await per_call(door, n)
        direct = calls["direct"]
        print(f"per call, {n} calls each (ms; ratio to a direct door call):")
        for label, seconds in calls.items():
            print(f"  {label:20s} {seconds * 1000:7.1f} ms  x{seconds / direct:.2f}")
        print("one-answer session per CLI, under the sandbox:")
        for name in CLIS:
            walls, result = [], {}
            for i in range(3):
                result = await session(door, name, Path(tmp) / f"r{i}")
                walls.append(result["wall_s"])
            overhead = statistics.median(walls) - result["calls"] * direct
            print(
                f"  {name:9s} wall {statistics.median(walls):5.2f} s (median of 3), "
                f"{result['calls']} calls, start-up overhead {overhead:5.2f} s"
                + (f", error: {result['error']}" if result["error"] else "")
            )
            for shape in result["shapes"]:
                print(f"      {json.dumps(shape)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=40)
    asyncio.run(main(parser.parse_args().calls))
