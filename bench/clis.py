"""Proxy overhead per call: flow's door called directly vs through a CLI proxy, in one run.

Run: LITELLM_LOCAL_MODEL_COST_MAP=True .venv/bin/python bench/clis.py
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.config import LoadedConfig, parse_config
from orchestrator.llm.door import Door
from orchestrator.llm.messages import Message
from orchestrator.llm.scripted import ScriptedModel
from orchestrator.proxy import Proxy
from orchestrator.testing import ChatServer, scripted_handler

N = 40


def config(base_url: str) -> LoadedConfig:
    provider = {"api": "openai", "base_url": base_url, "api_key": "LOCAL_TEST_KEY"}
    return parse_config(
        {
            "providers": {"local": provider},
            "models": {
                "glm": {"provider": "local", "id": "glm-4.7", "price": {"input": 0, "output": 0}}
            },
            "stages": {"planner": {"model": "glm"}, "builders": [{"model": "glm"}]},
        }
    )


def _call(proxy: Proxy, i: int) -> bytes:
    body = {
        "model": "x",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": f"p{i}"}],
    }
    req = urllib.request.Request(
        proxy.base_url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Authorization": "Bearer " + proxy.token, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req) as reply:
        return bytes(reply.read())


async def main() -> None:
    os.environ.setdefault("LOCAL_TEST_KEY", "sk-bench")
    model = ScriptedModel("glm-4.7", lambda m, t, c: {"content": "ok"})
    with ChatServer(scripted_handler({"glm-4.7": model})) as srv:
        door = Door(config(srv.base_url), run_id="bench")
        await door.complete("glm", [Message.user("warm")], stage="build")
        start = time.perf_counter()
        for i in range(N):
            await door.complete("glm", [Message.user(f"d{i}")], stage="build")
        direct = (time.perf_counter() - start) / N
        async with Proxy(door, "glm", stage="build", scope="p") as proxy:
            await asyncio.to_thread(_call, proxy, -1)
            start = time.perf_counter()
            for i in range(N):
                await asyncio.to_thread(_call, proxy, i)
            proxied = (time.perf_counter() - start) / N
    print(
        f"direct door call {direct * 1000:.1f} ms, through the proxy (SSE) "
        f"{proxied * 1000:.1f} ms, ratio {proxied / direct:.2f}"
    )


if __name__ == "__main__":
    asyncio.run(main())
