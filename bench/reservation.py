"""How close a call's reservation is to its real cost, before and after issue 8.8.

    python bench/reservation.py

The demo runs through litellm against a local chat server, which records every request flow
sends (plan, builder turns, reviews) and the usage it replied with. Each recorded request is
then priced for the models the README's mixed-vendor agents.yaml gives that stage (planner
gemini-2.5-flash, reviewers gpt-5 and claude-sonnet-4-5; the coding-plan builders cost $0):

- before: the old reservation, UTF-8 bytes of the request as its token bound and the model's
  whole output limit (`max_output_tokens` from litellm's map);
- after: `Door.worst_case`, the stage's output cap and, for OpenAI's models, the prompt
  counted by its own tokenizer (with the documented margin);
- real: the prompt counted by litellm's tokenizer for that model and the reply's completion
  tokens, at litellm's prices (`litellm.cost_per_token`).

Printed per stage and model: the mean ratio reservation / real, before and after, and how
many of the README's six concurrent reviews fit at once under its $3 per-run cap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from orchestrator.config import load_config
from orchestrator.demo import prepare_demo
from orchestrator.llm import wire
from orchestrator.llm.door import Door
from orchestrator.testing import ChatServer, scripted_handler
from orchestrator.testing.demo_http import demo_scripts, http_config

ROOT = Path(__file__).resolve().parent.parent
STAGE_MODELS = {"plan": ["flash"], "review": ["gpt", "sonnet"]}


def record_demo() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(stage, request, reply) of every call of one demo run over HTTP."""
    calls: list[tuple[dict[str, Any], dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="flow-bench-reserve-") as tmp:
        demo = prepare_demo(Path(tmp))
        inner = scripted_handler(demo_scripts(demo))

        def handler(request: dict[str, Any]) -> Any:
            reply = inner(request)
            if isinstance(reply, dict):
                calls.append((request, reply))
            return reply

        stages = yaml.safe_load(demo.config.read_text())["stages"]
        stage_of = {stages["planner"]["model"]: "plan"}
        stage_of.update({b["model"]: "build" for b in stages["builders"]})
        stage_of.update({r["model"]: "review" for r in stages["reviewers"]})
        with ChatServer(handler) as srv:
            config = Path(tmp) / "http.yaml"
            config.write_text(yaml.safe_dump(http_config(demo, srv.base_url)))
            out = subprocess.run(
                [sys.executable, "-m", "orchestrator", "run", str(demo.spec), "--config", config],
                cwd=demo.repo,
                capture_output=True,
                text=True,
                env=os.environ.copy(),
            )
        if out.returncode != 0:
            raise SystemExit(f"the demo run failed:\n{out.stdout}\n{out.stderr}")
    return [(stage_of[r["model"]], r, reply) for r, reply in calls]


def main() -> None:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # offline: the bundled map
    import litellm

    # The README's snippet of this agents.yaml sets no max_output_tokens: litellm's map
    # gives gpt-5 128k and claude-sonnet-4-5 64k.
    data = yaml.safe_load((ROOT / "agents.yaml").read_text())
    for model in data["models"].values():
        model.pop("max_output_tokens", None)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(data, f)
    loaded = load_config(Path(f.name))
    os.unlink(f.name)
    door = Door(loaded, run_id="bench")
    ratios: dict[tuple[str, str], list[tuple[float, float, float]]] = defaultdict(list)
    for stage, request, reply in record_demo():
        if stage not in STAGE_MODELS:
            continue
        messages = [wire.message_from_wire(m) for m in request.get("messages") or []]
        tools = wire.tools_from_wire(request.get("tools")) or None
        completion = int(reply["usage"]["completion_tokens"])
        for name in STAGE_MODELS[stage]:
            rm = loaded.model(name)
            counted = litellm.token_counter(
                model=rm.litellm_model,
                messages=request["messages"],
                tools=request.get("tools"),
            )
            real = sum(
                litellm.cost_per_token(
                    model=rm.litellm_model, prompt_tokens=counted, completion_tokens=completion
                )
            )
            before = (
                wire.estimate_tokens(messages, tools, rm.quirks)
                * max(rm.input_per_token, rm.cached_per_token)
                + rm.max_output_tokens * rm.output_per_token
            )
            after = door.worst_case(rm, messages, tools, stage)
            ratios[(stage, name)].append((before, after, real))
    cap = loaded.config.budget.per_run_usd or 3.0
    print(
        f"{'stage':7} {'model':7} {'calls':>5} {'before $':>10} {'after $':>10} "
        f"{'real $':>10} {'before/real':>12} {'after/real':>11}"
    )
    for (stage, name), rows in sorted(ratios.items()):
        before = sum(b for b, _, _ in rows) / len(rows)
        after = sum(a for _, a, _ in rows) / len(rows)
        real = sum(r for _, _, r in rows) / len(rows)
        print(
            f"{stage:7} {name:7} {len(rows):5d} {before:10.4f} {after:10.4f} {real:10.6f} "
            f"{before / real:12.1f} {after / real:11.1f}"
        )
    # Six reviews (three candidates, two reviewers) reserve at once under the run cap; before,
    # a reservation that did not fit was refused at once; now it waits for the others.
    six = [ratios[("review", n)][0] for _ in range(3) for n in STAGE_MODELS["review"]]
    fit = {"before": 0, "after": 0}
    for when, pick in (("before", 0), ("after", 1)):
        held = 0.0
        for row in six:
            if held + row[pick] <= cap:
                held += row[pick]
                fit[when] += 1
    print(
        json.dumps(
            {
                "cap_usd": cap,
                "reviews_reserved_at_once_before": fit["before"],
                "reviews_refused_before": 6 - fit["before"],
                "reviews_reserved_at_once_after": fit["after"],
                "reviews_refused_after": 0,
            }
        )
    )


if __name__ == "__main__":
    main()
