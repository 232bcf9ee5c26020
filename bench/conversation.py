"""A scripted 100-turn builder on a 10k-file repository: what flow's own loop sends.

The builder is flow's own (`orchestrator.agents.builder.Builder` with the real `Tools`); its
model is a deterministic function of the conversation that reads files (and re-reads some,
before and after editing them), lists directories, runs commands (grep, ls, wc, python) and
edits, then finishes at turn 100. A recording door stands in for the model door: it answers
from the script and measures each request as the door would send it (OpenAI chat JSON of
the messages plus the tools).

Reported: total bytes sent, the largest request in tokens (litellm's tokenizer, as the door
counts a prompt it has a tokenizer for, margin included) against a 128k window, the
stable-prefix share (bytes of each request equal to the previous request's prefix, over all
bytes), and the input cost at Sonnet's list prices: $3/M input without caching; with
caching each request reads its stable prefix at $0.30/M and writes the rest at $3.75/M.

    PYTHONPATH=$PWD .venv/bin/python bench/conversation.py [--turns 100] [--files 10000]
        [--funcs 45] [--window 128000] [--share 0.6] [--no-window]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from orchestrator.agents.builder import Builder
from orchestrator.agents.tools import Tools
from orchestrator.llm import wire
from orchestrator.llm.messages import Completion, Message, ToolCall, ToolSpec, Usage
from orchestrator.redact import Redactor

PRICE_IN, PRICE_READ, PRICE_WRITE = 3.0, 0.30, 3.75  # USD per million tokens
TOKENIZER_MODEL = "gpt-4o"


def make_repo(root: Path, files: int, funcs: int) -> list[str]:
    """`files` Python modules of `funcs` functions (45: ~12 KB) in 100 packages."""
    rng = random.Random(7)
    paths = []
    for i in range(files):
        rel = f"src/pkg_{i % 100:02d}/mod_{i:05d}.py"
        lines = [f'"""Module {i}: generated for the conversation bench."""', ""]
        lines.append(f"VALUE_{i} = {i}")
        for f in range(funcs):
            arg = rng.choice(["items", "path", "count", "config", "text"])
            lines += [
                "",
                f"def func_{i}_{f}({arg}, limit=None):",
                f'    """Compute step {f} of module {i} from {arg}."""',
                f"    total = {rng.randint(0, 999)}",
                f"    for n, value in enumerate({arg} or []):",
                "        if limit is not None and n >= limit:",
                "            break",
                f"        total += hash((value, {f})) % {rng.randint(2, 97)}",
                "    return total",
            ]
        paths.append(rel)
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def _call(turn: int, name: str, **arguments: Any) -> Message:
    return Message(
        role="assistant",
        content=None,
        tool_calls=[ToolCall(id=f"call_{turn}", name=name, arguments=json.dumps(arguments))],
    )


def script(paths: list[str], turns: int) -> Any:
    """The model: turn t's action is a function of t alone (so every run asks the same)."""

    def reply(messages: list[Message], tools: list[ToolSpec], choice: str | None) -> Message:
        t = sum(1 for m in messages if m.role == "assistant")
        if t >= turns - 1:
            return _call(t, "finish", summary="done")
        pkg = t % 100
        kind = t % 10
        if kind in (0, 2, 4, 6):  # read a new file
            return _call(t, "read_file", path=paths[(t * 37) % len(paths)])
        if kind == 1:  # re-read one read a few turns ago (unchanged)
            return _call(t, "read_file", path=paths[((t - 1) * 37) % len(paths)])
        if kind == 3:
            return _call(t, "list_files", path=f"src/pkg_{pkg:02d}")
        if kind == 5:
            return _call(t, "run", command=f"grep -n 'def func_' -r src/pkg_{pkg:02d} | head -60")
        if kind == 7:  # edit the file read at kind 6
            i = (t - 1) * 37 % len(paths)
            return _call(
                t, "edit_file", path=paths[i], old=f"VALUE_{i} = {i}", new=f"VALUE_{i} = {i + 1}"
            )
        if kind == 8:  # read it again: it changed, so it must come back whole
            return _call(t, "read_file", path=paths[(t - 2) * 37 % len(paths)])
        return _call(t, "run", command="python -c 'import sys; print(sys.version)'; ls -la src")

    return reply


class RecordingDoor:
    """Answers from the script; keeps the size and tokens of every request."""

    def __init__(self, model: Any):
        self.model = model
        self.sent: list[str] = []
        self.tokens: list[int] = []

    async def complete(
        self,
        model: str,
        messages: list[Message],
        *,
        stage: str,
        tools: list[ToolSpec] | None = None,
        tool_choice: str | None = None,
        scope: str = "",
        fallbacks: list[str] | None = None,
    ) -> Completion:
        body = {"messages": wire.messages_to_wire(messages), "tools": wire.tools_to_wire(tools)}
        self.sent.append(json.dumps(body, ensure_ascii=False))
        self.tokens.append(wire.prompt_bound(TOKENIZER_MODEL, True, messages, tools))
        message = self.model(messages, tools or [], tool_choice)
        return Completion(message=message, usage=Usage(), model=model)


def common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    lo, hi = 0, n
    while lo < hi:  # binary search on slices: C-speed comparisons
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def report(door: RecordingDoor, window: int, wall: float) -> dict[str, Any]:
    sizes = [len(s.encode()) for s in door.sent]
    stable = [0] + [
        len(cur[: common_prefix(prev, cur)].encode())
        for prev, cur in zip(door.sent, door.sent[1:], strict=False)
    ]
    tokens = door.tokens
    prefix_tokens = [t * s / z for t, s, z in zip(tokens, stable, sizes, strict=True)]
    plain = sum(tokens) * PRICE_IN / 1e6
    cached = sum(
        p * PRICE_READ + (t - p) * PRICE_WRITE for t, p in zip(tokens, prefix_tokens, strict=True)
    )
    biggest = max(tokens)
    return {
        "requests": len(sizes),
        "wall_s": round(wall, 1),
        "total_bytes": sum(sizes),
        "first_request_bytes": sizes[0],
        "last_request_bytes": sizes[-1],
        "largest_request_bytes": max(sizes),
        "largest_request_tokens": biggest,
        "largest_share_of_window": round(biggest / window, 3),
        "requests_over_60pct": sum(1 for t in tokens if t > 0.6 * window),
        "stable_prefix_share": round(sum(stable) / sum(sizes), 4),
        "input_usd_no_cache": round(plain, 2),
        "input_usd_cached": round(cached / 1e6, 2),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="flow-conv-") as tmp:
        root = Path(tmp) / "repo"
        paths = make_repo(root, args.files, args.funcs)
        door = RecordingDoor(script(paths, args.turns))
        tools = Tools(root, command_timeout_s=60, output_cap=16_000)
        extra: dict[str, Any] = {}
        if not args.no_window:
            from orchestrator.agents.window import ContextWindow

            extra["window"] = ContextWindow.for_model(
                TOKENIZER_MODEL, args.window, args.share, tokenizer=True
            )
        builder = Builder(
            door,  # type: ignore[arg-type]
            "bench",
            tools,
            max_turns=args.turns + 5,
            transcript=Path(tmp) / "transcript.jsonl",
            redact=Redactor([]),
            **extra,
        )
        start = time.monotonic()
        outcome = await builder.run("Change every VALUE constant you see by one.")
        wall = time.monotonic() - start
        if outcome.error:
            sys.exit(f"builder failed: {outcome.error}")
        return report(door, args.window, wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=100)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--funcs", type=int, default=45, help="functions per file (size)")
    parser.add_argument("--window", type=int, default=128_000)
    parser.add_argument("--share", type=float, default=0.6)
    parser.add_argument("--no-window", action="store_true", help="as before: no context policy")
    args = parser.parse_args()
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    result = asyncio.run(run(args))
    for key, value in result.items():
        print(f"{key}={value}")


if __name__ == "__main__":
    main()
