"""`flow run --dry-run` and `flow batch --dry-run`: the forecast, no model called; the report's
forecast against what was spent."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import MakeRepo, flow_in, git

from orchestrator.config import parse_config
from orchestrator.demo import prepare_demo
from orchestrator.forecast import (
    TOOL_RESULT_TOKENS,
    TURN_OUTPUT_TOKENS,
    Forecast,
    History,
    forecast_run,
)
from orchestrator.ledger import Ledger
from orchestrator.llm.messages import Usage
from orchestrator.spec import load_spec
from orchestrator.store import RunRecord, Store
from orchestrator.testing import ChatServer, scripted_handler
from orchestrator.workspace import Repo

SPEC = """\
---
title: Add a greeting
checks:
  - python3 -c "import greet"
branch: flow/greet{n}
---
# Add a greeting

`greet.py` has no `hello`. Add one that returns the string `hi`, with a docstring.

## Requirements

### Requirement: Hello
`greet.hello()` SHALL return `"hi"`.

#### Scenario: says hi
- WHEN `hello()` is called
- THEN it returns `"hi"`
"""
IN_B, OUT_B = 2.0e-6, 8.0e-6  # the builder's USD per token
WINDOW, BUILD_CAP, TURNS = 20_000, 1_000, 10


def config(base_url: str) -> dict[str, Any]:
    def model(name: str, family: str, inp: float, out: float, **more: Any) -> dict[str, Any]:
        price = {"input": inp, "output": out}
        return {"provider": "local", "id": name, "family": family, "price": price, **more}

    return {
        "providers": {"local": {"api": "openai", "base_url": base_url, "api_key": "FORECAST_KEY"}},
        "models": {
            "planner": model("planner", "google", 0.30, 2.50),
            "builder": model("builder", "zhipu", 2.0, 8.0, context_window=WINDOW),
            "judge": model("judge", "openai", 1.25, 10.0),
        },
        "stages": {
            "planner": {"model": "planner"},
            "builders": [{"model": "builder", "count": 2}],
            "reviewers": [{"model": "judge"}],
        },
        "builder": {"max_turns": TURNS},
        "budget": {"output_tokens": {"builders": BUILD_CAP}},
    }


@pytest.fixture
def counting() -> Any:
    """A provider on 127.0.0.1 that answers nothing a dry run may ask: it only counts."""
    with ChatServer(scripted_handler({}), prices=(1e-6, 1e-6)) as srv:
        yield srv


@pytest.fixture
def project(make_repo: MakeRepo, counting: ChatServer) -> Path:
    repo = make_repo({"greet.py": '"""Greetings."""\n', "README.md": "greetings\n"})
    for n in (1, 2):
        (repo.parent / f"spec{n}.md").write_text(SPEC.replace("{n}", str(n)))
    (repo.parent / "agents.yaml").write_text(yaml.safe_dump(config(counting.base_url)))
    return repo


ENV = {"FORECAST_KEY": "sk-forecast-0001"}


def dry(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return flow_in(repo, *args, "--config", str(repo.parent / "agents.yaml"), env=ENV)


def test_dry_run_calls_no_model_and_imports_no_litellm(project: Path, counting: ChatServer) -> None:
    spec = str(project.parent / "spec1.md")
    out = dry(project, "run", spec, "--dry-run")
    assert out.returncode in (0, 1), out.stderr
    assert "builders" in out.stdout and "reviewers" in out.stdout and "planner" in out.stdout
    code = (
        "import sys\nfrom orchestrator.cli import app\n"
        f"try:\n    app(['run', {spec!r}, '--dry-run', '--config', "
        f"{str(project.parent / 'agents.yaml')!r}, '--repo', {str(project)!r}])\n"
        "except SystemExit:\n    pass\n"
        "print('MODULES:' + ' '.join(m for m in sys.modules if m.split('.')[0] in "
        "('litellm', 'langgraph', 'openai', 'langchain_core')))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **ENV},
        check=True,
    )
    line = next(ln for ln in run.stdout.splitlines() if ln.startswith("MODULES:"))
    assert line == "MODULES:", line  # no litellm: nothing that could reach a network
    batch = dry(
        project, "batch", spec, str(project.parent / "spec2.md"), "--budget", "9", "--dry-run"
    )
    assert batch.returncode in (0, 1), batch.stderr
    assert counting.requests == [] and counting.billed_usd == 0
    assert not (project / ".flow" / "runs").exists()  # a dry run leaves no run behind
    assert "flow/greet1" not in git(project, "branch", "--list")


def _rows(found: Forecast) -> dict[tuple[str, str], Any]:
    return {(r.stage, r.model): r for r in found.rows}


def test_without_history_the_numbers_follow_from_prices(project: Path) -> None:
    loaded = parse_config(config("http://127.0.0.1:9/v1"))
    spec = load_spec(project.parent / "spec1.md")
    repo = Repo.open(project)
    found = forecast_run(spec, loaded, repo, repo.resolve("HEAD"), history=History())
    builder = _rows(found)[("builders", "builder")]
    assert builder.basis == "prices" and builder.instances == 2
    # Two slots, each 20 % of 10 turns; turn 2's prompt is turn 1's plus a reply and a result.
    turns = round(TURNS * 0.2)
    assert builder.calls == 2 * turns
    assert builder.output_tokens == 2 * turns * TURN_OUTPUT_TOKENS
    first, rest = divmod(
        builder.prompt_tokens // 2 - (TURN_OUTPUT_TOKENS + TOOL_RESULT_TOKENS + 32), 2
    )
    assert rest == 0 and first >= len(spec.body) / 4  # the first prompt holds the spec
    assert builder.prompt_tokens == 2 * (2 * first + TURN_OUTPUT_TOKENS + TOOL_RESULT_TOKENS + 32)
    assert builder.expected_usd == pytest.approx(
        builder.prompt_tokens * IN_B + builder.output_tokens * OUT_B
    )
    # Worst: every one of the 10 turns of both slots, the prompt at the context window (the
    # worst first prompt carries a plan at the planner's 8,192-token cap, so it is beyond it),
    # the reply at the builders' output cap.
    assert builder.worst_calls == 2 * TURNS
    assert builder.worst_usd == pytest.approx(2 * TURNS * (WINDOW * IN_B + BUILD_CAP * OUT_B))
    assert builder.worst_call_usd == pytest.approx(WINDOW * IN_B + BUILD_CAP * OUT_B)
    planner = _rows(found)[("planner", "planner")]
    assert planner.calls == 1 and planner.output_tokens == 700
    assert planner.expected_usd == pytest.approx(planner.prompt_tokens * 0.30e-6 + 700 * 2.50e-6)
    judge = _rows(found)[("reviewers", "judge")]
    assert judge.instances == 2 and judge.worst_calls == 2  # one review per candidate
    total = sum(r.expected_usd for r in found.rows)
    assert found.expected_usd == pytest.approx(total) and found.budget_usd is None


def test_history_moves_the_expected_cost_to_its_mean(project: Path) -> None:
    flow_dir = project / ".flow"
    Repo.open(project).ensure_excluded(".flow/")  # as flow's first run would
    with Ledger(flow_dir / "ledger.sqlite") as ledger:
        for run_id, calls, cost in (("r1", 3, 0.10), ("r2", 5, 0.30)):
            for _ in range(calls):
                usage = Usage(prompt_tokens=1000, completion_tokens=100)
                ledger.record(
                    run_id=run_id,
                    stage="build",
                    model="builder",
                    outcome="ok",
                    usage=usage,
                    cost_usd=cost / calls,
                )
        ledger.record(run_id="r2", stage="build", model="builder", outcome="replayed")
        # A run still going (or killed) has not spent all it will: it is left out.
        ledger.record(run_id="r3", stage="build", model="builder", outcome="ok", cost_usd=50.0)
    store = Store(flow_dir / "ledger.sqlite")
    store.start_run(
        RunRecord(
            run_id="r3",
            spec_path="x",
            spec_digest="x",
            title="x",
            branch="flow/x",
            status="running",
            started=0.0,
        )
    )
    store.close()
    out = dry(project, "run", str(project.parent / "spec1.md"), "--dry-run", "--json")
    assert out.returncode in (0, 1), out.stderr
    found = Forecast.model_validate(json.loads(out.stdout))
    builder = _rows(found)[("builders", "builder")]
    assert builder.basis == "history" and builder.history_runs == 2
    # The mean per builder slot of r1 and r2 ($0.10, $0.30; 3 and 5 calls), for two slots.
    assert builder.expected_usd == pytest.approx(2 * 0.20)
    assert builder.calls == pytest.approx(2 * 4)
    assert builder.prompt_tokens == 2 * 4000 and builder.output_tokens == 2 * 400
    assert _rows(found)[("planner", "planner")].basis == "prices"  # no history of its own
    assert (
        "history (2 runs)"
        in dry(project, "run", str(project.parent / "spec1.md"), "--dry-run").stdout
    )


def test_a_budget_below_the_worst_case_does_not_fit(project: Path) -> None:
    spec = str(project.parent / "spec1.md")
    found = json.loads(dry(project, "run", spec, "--dry-run", "--json").stdout)
    worst, expected = found["worst_usd"], found["expected_usd"]
    assert expected < 0.5 < worst
    # Between the expected cost and the worst case: it fits (exit 0), and says the caps may
    # stop the run early.
    short = dry(project, "run", spec, "--dry-run", "--budget", "0.5")
    assert short.returncode == 0, short.stderr
    assert "does not fit the worst case" in short.stdout and "$0.5000 (--budget)" in short.stdout
    below = dry(project, "run", spec, "--dry-run", "--budget", f"{expected * 0.9:.4f}")
    assert below.returncode in (1, 2), below.stdout + below.stderr
    if below.returncode == 1:
        assert "does not fit: the expected" in below.stdout
    roomy = dry(project, "run", spec, "--dry-run", "--budget", f"{math.ceil(worst) + 1}")
    assert roomy.returncode == 0 and "fits: even the worst case" in roomy.stdout
    as_json = json.loads(dry(project, "run", spec, "--dry-run", "--budget", "0.5", "--json").stdout)
    assert as_json["fits"] is False and as_json["expected_fits"] is True
    # What the run itself refuses, the dry run refuses: one pass cannot be afforded.
    tiny = dry(project, "run", spec, "--dry-run", "--budget", "0.05")
    assert tiny.returncode == 2 and "cannot afford one pass" in tiny.stderr
    assert "Traceback" not in tiny.stderr and tiny.stdout == ""
    git(project, "branch", "flow/greet1")
    taken = dry(project, "run", spec, "--dry-run")
    assert taken.returncode == 2 and "already exists" in taken.stderr


def test_batch_dry_run_sums_specs_and_lists_what_it_would_refuse(project: Path) -> None:
    specs = [str(project.parent / "spec1.md"), str(project.parent / "spec2.md")]
    one = json.loads(dry(project, "run", specs[0], "--dry-run", "--json").stdout)
    out = dry(project, "batch", *specs, "--budget", "100", "--dry-run", "--json")
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert len(found["runs"]) == 2 and found["fits"] is True
    assert found["worst_usd"] == pytest.approx(2 * one["worst_usd"], rel=0.01)
    tight = dry(project, "batch", *specs, "--budget", f"{one['worst_usd'] * 1.5:.2f}", "--dry-run")
    assert tight.returncode == 0 and "does not fit the worst case" in tight.stdout
    per_spec = dry(project, "batch", *specs, "--budget", "100", "--per-spec", "0.5", "--dry-run")
    assert per_spec.returncode == 0 and "do not fit their own cap" in per_spec.stdout
    git(project, "branch", "flow/greet2")
    refused = dry(project, "batch", *specs, "--budget", "100", "--dry-run")
    assert refused.returncode == 2
    assert "refused:" in refused.stdout and "flow/greet2" in refused.stdout


def test_report_compares_the_forecast_with_the_spend(tmp_path: Path) -> None:
    demo = prepare_demo(tmp_path)
    run = flow_in(demo.repo, "run", str(demo.spec), "--config", str(demo.config), "--json")
    assert run.returncode == 0, run.stderr
    (run_dir,) = (demo.repo / ".flow" / "runs").iterdir()
    forecast = Forecast.model_validate_json((run_dir / "forecast.json").read_text())
    assert all(r.basis == "prices" for r in forecast.rows)  # the first run has no history
    with Ledger(demo.repo / ".flow" / "ledger.sqlite") as ledger:
        spent = ledger.by("stage", run_dir.name)
        total = ledger.total(run_dir.name)
    report = (run_dir / "report.md").read_text()
    section = report[report.index("## Forecast vs spent") :].splitlines()
    planner = next(ln for ln in section if ln.startswith("| planner | flash-sim |"))
    cells = [c.strip() for c in planner.split("|")[1:-1]]
    planned = next(r for r in forecast.rows if r.stage == "planner")
    assert cells[4] == f"${planned.expected_usd:.4f}" and cells[5] == f"${spent['plan']:.4f}"
    error = (spent["plan"] - planned.expected_usd) / planned.expected_usd
    assert cells[6] == f"{error:+.0%}"
    last = next(ln for ln in section if ln.startswith("| total |"))
    assert f"${total:.4f}" in last and f"${forecast.expected_usd:.4f}" in last
    summary = json.loads((run_dir / "run.json").read_text())
    assert sum(v["spent_usd"] for v in summary["forecast_vs_spent"]) == pytest.approx(total)
    # The next forecast of this repository starts from what this run spent.
    again = demo.spec.read_text().replace("branch: flow/add-median", "branch: flow/median-2")
    demo.spec.write_text(again)
    out = flow_in(
        demo.repo, "run", str(demo.spec), "--config", str(demo.config), "--dry-run", "--json"
    )
    assert out.returncode in (0, 1), out.stderr
    rows = {(r["stage"], r["model"]): r for r in json.loads(out.stdout)["rows"]}
    assert rows[("planner", "flash-sim")]["basis"] == "history"
    assert rows[("planner", "flash-sim")]["expected_usd"] == pytest.approx(spent["plan"])
    reviews = sum(r["expected_usd"] for r in rows.values() if r["stage"] == "reviewers")
    assert reviews == pytest.approx(spent["review"])
