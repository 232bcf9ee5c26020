"""The forecast's error against a provider's own bill, with and without history, in one run.

    python bench/forecast.py [--runs N] [--warmup W] [--seed S]

Three local chat servers on 127.0.0.1 (planner, builders, reviewer), each billing every call
by its own token count at its own prices (`ChatServer(prices=..., own_usage=True)`: the usage
flow sees is the server's count, as a real provider's usage is its bill). Scripted models
with realistic variety answer: a planner with 2-7 steps, a thorough builder (5-14 turns) and
a quick one (3-7 turns) that read the project's files, think aloud, write a module and
finish, and a reviewer with a few findings, each drawn from the spec and the model name. N
specs of different sizes (1-5 requirements) run one after another as real `flow run`s in one
repository, so the ledger's history grows. Before each run the forecast is made twice
(`orchestrator.forecast.forecast_run`): from prices only (no history) and from the ledger's
history (from run W+1 on); each is compared with the servers' bill for that run.
Printed: per run the two forecasts, the bill and the worst case; then the mean absolute
percentage error (MAPE) of each, overall and per stage; the MAPE of the best a constant could
do in hindsight (the scored runs' mean bill: the builders' turn counts are random, so no
forecast can beat their spread); and how often the bill exceeded the worst case.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from statistics import mean
from typing import Any

import yaml

from orchestrator.config import load_config
from orchestrator.forecast import Forecast, History, forecast_run
from orchestrator.llm.messages import Message, ToolSpec
from orchestrator.llm.scripted import ScriptedModel
from orchestrator.spec import load_spec
from orchestrator.testing import ChatServer, scripted_handler
from orchestrator.workspace import Repo

PRICES = {  # USD per million tokens: (input, output), like the models they stand in for
    "plan": (0.30, 2.50),
    "build": (0.60, 2.20),
    "review": (1.25, 10.0),
}
STAGE_OF = {"planner": "planner", "thorough": "builders", "quick": "builders", "judge": "reviewers"}
VOCABULARY = (
    "the function returns value list input output check edge case empty error raise module test "
    "helper parse format keep style docstring branch small change read file next step because "
    "so that then also first order sorted copy caller"
)
WORDS = VOCABULARY.split()


def _rng(messages: list[Message], name: str) -> random.Random:
    """The same spec and model behave the same on every call (a resumed call too)."""
    first = next((m.content or "" for m in messages if m.role == "user"), "")
    return random.Random(hashlib.sha256(f"{name}\n{first}".encode()).digest())


def _prose(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."


def _call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"tool_calls": [{"name": name, "arguments": arguments}]}


def planner(messages: list[Message], tools: list[ToolSpec], choice: str | None) -> dict[str, Any]:
    rng = _rng(messages, "planner")
    steps = [_prose(rng, 6, 18) for _ in range(rng.randint(2, 7))]
    return _call("submit_plan", summary=_prose(rng, 30, 90), steps=steps, files=["feature.py"])


def builder(name: str, low: int, high: int) -> Any:
    def reply(messages: list[Message], tools: list[ToolSpec], choice: str | None) -> Any:
        rng = _rng(messages, name)
        turns = rng.randint(low, high)
        turn = sum(1 for m in messages if m.role == "assistant")
        thought = {"reasoning_content": _prose(rng, 20, 160)}
        slug = hashlib.sha1(f"{name}{messages[1].content}".encode()).hexdigest()[:8]
        if turn < turns - 3:
            path = f"pkg/mod_{rng.randint(0, 5)}.py"
            return {**thought, **_call("read_file", path=path)}
        if turn == turns - 3:
            body = "\n".join(f"    # {_prose(rng, 5, 14)}" for _ in range(rng.randint(10, 60)))
            code = f'"""{_prose(rng, 5, 12)}"""\n\n\ndef feature():\n{body}\n    return 1\n'
            return {**thought, **_call("write_file", path=f"feature_{slug}.py", content=code)}
        if turn == turns - 2:
            return {**thought, **_call("run", command="python3 -m unittest -q")}
        return _call("finish", summary=_prose(rng, 10, 40))

    return reply


def judge(messages: list[Message], tools: list[ToolSpec], choice: str | None) -> dict[str, Any]:
    rng = _rng(messages, "judge")
    findings = [_prose(rng, 8, 30) for _ in range(rng.randint(0, 5))]
    return _call(
        "submit_review",
        score=rng.randint(6, 9),
        verdict="approve",
        summary=_prose(rng, 15, 60),
        findings=findings,
    )


def make_repo(root: Path) -> Path:
    repo = root / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "tests").mkdir()
    rng = random.Random(7)
    for i in range(6):
        lines = [f"def f{i}_{j}(x):\n    return x + {j}\n" for j in range(rng.randint(20, 160))]
        (repo / "pkg" / f"mod_{i}.py").write_text("\n\n".join(lines))
    (repo / "pkg" / "__init__.py").write_text("")
    (repo / "tests" / "__init__.py").write_text("")
    (repo / "tests" / "test_ok.py").write_text(
        "import unittest\n\n\nclass T(unittest.TestCase):\n    def test_ok(self):\n"
        "        self.assertTrue(True)\n"
    )
    for args in (
        ("init", "-q", "-b", "main"),
        ("config", "user.name", "bench"),
        ("config", "user.email", "bench@flow.invalid"),
        ("config", "commit.gpgsign", "false"),
        ("add", "-A"),
        ("commit", "-q", "-m", "project"),
    ):
        subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)
    return repo


def make_spec(root: Path, k: int, rng: random.Random) -> Path:
    parts = [f"# Feature {k}", "", _prose(rng, 20, 80), "", "## Requirements", ""]
    for r in range(rng.randint(1, 5)):
        parts += [f"### Requirement: Part {r}", f"The feature SHALL {_prose(rng, 8, 30)}", ""]
        for s in range(rng.randint(1, 3)):
            parts += [f"#### Scenario: case {s}", f"- WHEN {_prose(rng, 4, 12)}"]
            parts += [f"- THEN {_prose(rng, 4, 12)}", ""]
    front = textwrap.dedent(
        f"""\
        ---
        title: Feature {k}
        checks:
          - python3 -m unittest -q
        branch: flow/feature-{k}
        ---
        """
    )
    path = root / f"spec{k}.md"
    path.write_text(front + "\n".join(parts) + "\n")
    return path


def write_config(root: Path, servers: dict[str, ChatServer]) -> Path:
    def model(name: str, stage: str, family: str) -> dict[str, Any]:
        inp, out = PRICES[stage]
        price = {"input": inp, "output": out}
        return {"provider": stage, "id": name, "family": family, "price": price}

    providers = {
        stage: {"api": "openai", "base_url": srv.base_url, "api_key": "BENCH_KEY"}
        for stage, srv in servers.items()
    }
    config = {
        "providers": providers,
        "models": {
            "planner": model("planner", "plan", "google"),
            "thorough": model("thorough", "build", "zhipu"),
            "quick": model("quick", "build", "minimax"),
            "judge": model("judge", "review", "openai"),
        },
        "stages": {
            "planner": {"model": "planner"},
            "builders": [{"model": "thorough"}, {"model": "quick"}],
            "reviewers": [{"model": "judge"}],
        },
    }
    path = root / "agents.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def by_stage(found: Forecast) -> dict[str, float]:
    out: dict[str, float] = {}
    for row in found.rows:
        out[row.stage] = out.get(row.stage, 0.0) + row.expected_usd
    return out


def billed(servers: dict[str, ChatServer]) -> dict[str, float]:
    """The servers' bill so far per stage, by the model each request named."""
    out: dict[str, float] = {}
    for srv in servers.values():
        for request, amount in srv.bill_of:
            stage = STAGE_OF[str(request.get("model"))]
            out[stage] = out.get(stage, 0.0) + amount
    return out


def ape(forecast: float, bill: float) -> float:
    return abs(forecast - bill) / bill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=12, help="specs run one after another")
    parser.add_argument("--warmup", type=int, default=3, help="runs before history is used")
    parser.add_argument("--seed", type=int, default=11, help="the specs' sizes and wording")
    args = parser.parse_args()
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")
    scripts = {
        "plan": {"planner": ScriptedModel("planner", planner)},
        "build": {
            "thorough": ScriptedModel("thorough", builder("thorough", 5, 14)),
            "quick": ScriptedModel("quick", builder("quick", 3, 7)),
        },
        "review": {"judge": ScriptedModel("judge", judge)},
    }
    rng = random.Random(args.seed)
    results = []
    with tempfile.TemporaryDirectory(prefix="flow-bench-forecast-") as tmp:
        root = Path(tmp)
        repo_path = make_repo(root)
        servers = {
            stage: ChatServer(
                scripted_handler(models),
                prices=(PRICES[stage][0] / 1e6, PRICES[stage][1] / 1e6),
                own_usage=True,
            ).start()
            for stage, models in scripts.items()
        }
        try:
            config_path = write_config(root, servers)
            loaded = load_config(config_path)
            repo = Repo.open(repo_path)
            for k in range(1, args.runs + 1):
                spec_path = make_spec(root, k, rng)
                spec = load_spec(spec_path)
                base = repo.resolve("HEAD")
                bare = forecast_run(spec, loaded, repo, base, history=History())
                known = History.load(repo_path / ".flow")
                hist = forecast_run(spec, loaded, repo, base, history=known)
                before = billed(servers)
                out = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "orchestrator",
                        "run",
                        str(spec_path),
                        "--json",
                        "--config",
                        str(config_path),
                    ],
                    cwd=repo_path,
                    env={**os.environ, "BENCH_KEY": "sk-bench-0001"},
                    capture_output=True,
                    text=True,
                )
                if out.returncode != 0:
                    raise SystemExit(f"run {k} failed ({out.returncode}):\n{out.stderr[-2000:]}")
                after = billed(servers)
                bill = {s: after.get(s, 0.0) - before.get(s, 0.0) for s in after}
                results.append((k, bare, hist, bill))
                total = sum(bill.values())
                print(
                    f"run {k:2}: bill ${total:.5f}  no-history ${bare.expected_usd:.5f} "
                    f"({ape(bare.expected_usd, total):.0%})  history ${hist.expected_usd:.5f} "
                    f"({ape(hist.expected_usd, total):.0%}{'' if k > args.warmup else ', warm-up'})"
                    f"  worst ${hist.worst_usd:.4f}",
                    flush=True,
                )
        finally:
            for srv in servers.values():
                srv.stop()
    later = [r for r in results if r[0] > args.warmup]
    print(f"\nruns={len(results)} warmup={args.warmup} (history forecasts scored on {len(later)})")
    for label, chosen in (
        ("no history", [(r[1], r[3]) for r in later]),
        ("history", [(r[2], r[3]) for r in later]),
    ):
        overall = mean(ape(f.expected_usd, sum(b.values())) for f, b in chosen)
        stages = {
            stage: mean(ape(by_stage(f).get(stage, 0.0), b[stage]) for f, b in chosen)
            for stage in ("planner", "builders", "reviewers")
        }
        per = " ".join(f"{s}={v:.0%}" for s, v in stages.items())
        print(f"MAPE {label:10}: total={overall:.0%}  {per}")
    bills = [sum(r[3].values()) for r in later]
    floor = mean(ape(mean(bills), b) for b in bills)
    print(f"MAPE of one constant, the scored runs' own mean bill (hindsight): {floor:.0%}")
    every = mean(ape(r[1].expected_usd, sum(r[3].values())) for r in results)
    print(f"MAPE no history over all {len(results)} runs: {every:.0%}")
    over = sum(1 for r in results if sum(r[3].values()) > r[2].worst_usd)
    print(f"bill above the worst case: {over} of {len(results)} runs")


if __name__ == "__main__":
    main()
