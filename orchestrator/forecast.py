"""What a run will cost before it starts, and afterwards what it cost against that.

Per stage and model: the calls expected, their tokens and USD, from this repository's ledger
history (the mean per builder slot, tester or possible review over its recent runs) or, with no
history, from the spec's size and the model's prices; beside the worst case the caps reserve
(every call at its output cap, builders at all their turns) and whether the budget holds it.
Imports neither litellm nor langgraph, and calls no model: `flow run --dry-run` is fast and free.
The tables people read are in forecast_view.py.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from orchestrator.agents.prompts import (
    BUILDER_SYSTEM,
    MAX_DIFF_CHARS,
    PLANNER_SYSTEM,
    REVIEWER_SYSTEM,
    SUBMIT_PLAN,
    SUBMIT_REVIEW,
    TESTER_SYSTEM,
    build_request,
    plan_request,
    repo_overview,
    review_request,
    tester_request,
)
from orchestrator.agents.tools import TESTER_TOOL_SPECS, TOOL_SPECS
from orchestrator.config import LoadedConfig, ResolvedModel
from orchestrator.errors import FlowError, WorkspaceError
from orchestrator.fmt import usd
from orchestrator.llm import wire
from orchestrator.llm.messages import Message, ToolSpec
from orchestrator.spec import Spec
from orchestrator.state import CheckResult, Plan
from orchestrator.workspace import Repo

if TYPE_CHECKING:
    from orchestrator.layers import Layers

Stage = Literal["planner", "builders", "testers", "reviewers"]
STAGES: tuple[Stage, ...] = ("planner", "builders", "testers", "reviewers")
LEDGER_STAGE: dict[Stage, str] = {
    "planner": "plan",
    "builders": "build",
    "testers": "test",
    "reviewers": "review",
}
"""The stage names the model door writes into the ledger."""

# Without history: a typical run, in tokens (a token ≈ 4 characters of English or code).
CHARS_PER_TOKEN = 4
TURN_SHARE = 0.2
"""The share of `builder.max_turns` a builder or tester typically uses."""
PLAN_OUTPUT_TOKENS = 700
TURN_OUTPUT_TOKENS = 350
"""One builder turn's reply: a little reasoning and a tool call."""
TOOL_RESULT_TOKENS = 500
"""What one tool call's result adds to the next prompt (file excerpts, command output)."""
DIFF_TOKENS = 1_200
REVIEW_OUTPUT_TOKENS = 400
# The worst case: what the door reserves, every output at its cap.
WORST_BYTES_PER_TOKEN = 4
"""Bytes an output token takes when it comes back in the next prompt's byte bound."""
CHECK_TAIL_CHARS = 3_000
"""A check's output tail as a review request carries it."""
HISTORY_RUNS = 20
"""Past runs a stage and model's history is averaged over (the most recent)."""
_NO_WINDOW = (
    "no context_window: its worst case lets every turn's prompt grow by a reply at the output "
    "cap and a whole tool result; set `context_window:` for a tighter one"
)
_PARTIAL = ("running", "interrupted")
"""Runs whose spend is not whole yet: left out of the history."""


class Row(BaseModel):
    """One stage and model of a forecast."""

    stage: Stage
    model: str
    instances: int
    """planner 1; builders and testers: the slots of this model; reviewers: the candidates of
    another family it may review."""
    calls: float
    prompt_tokens: int
    output_tokens: int
    expected_usd: float
    basis: Literal["history", "prices", "login"]
    """history: the mean of past runs; prices: spec size × prices; login: not metered."""
    history_runs: int = 0
    worst_calls: int
    worst_usd: float
    """The sum of the reservations of every call the stage may make."""
    worst_call_usd: float
    """The largest single reservation (what `budget.per_call_usd` is compared with)."""
    notes: list[str] = Field(default_factory=list)


class Forecast(BaseModel):
    spec: str
    title: str
    rows: list[Row]
    expected_usd: float
    worst_usd: float
    budget_usd: float | None
    budget_from: str | None
    """Where the budget came from: --budget, budget.per_run_usd, --per-spec."""
    fits: bool | None
    """The worst case is within the budget (None: no budget)."""
    expected_fits: bool | None
    verdict: str
    notes: list[str] = Field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0: the expected cost fits (or nothing caps it; the verdict says whether the worst
        case does too, since the caps then may stop the run early); 1: it does not."""
        return 1 if self.expected_fits is False else 0


class Refusal(BaseModel):
    spec: str
    reason: str


class BatchForecast(BaseModel):
    runs: list[Forecast]
    refused: list[Refusal] = Field(default_factory=list)
    budget_usd: float
    per_spec_usd: float | None
    expected_usd: float
    worst_usd: float
    fits: bool
    """Every spec's worst case within its cap, and the sum within the batch's."""
    expected_fits: bool = True
    verdict: str

    @property
    def exit_code(self) -> int:
        """2: a spec the batch would refuse; else as a run's (0: the expected cost fits)."""
        return 2 if self.refused else (0 if self.expected_fits else 1)


class Past(BaseModel):
    """A stage and model's mean per instance over past runs."""

    runs: int
    calls: float
    prompt_tokens: float
    output_tokens: float
    cost_usd: float


class History:
    """Per ledger stage and model, the mean spend per instance of this repository's past runs."""

    def __init__(self, entries: dict[tuple[str, str], Past] | None = None):
        self.entries = entries or {}

    def get(self, stage: Stage, model: str) -> Past | None:
        return self.entries.get((LEDGER_STAGE[stage], model))

    @classmethod
    def load(cls, fdir: Path, limit: int = HISTORY_RUNS) -> History:
        """Read `<repo>/.flow/ledger.sqlite` (never created here; no file: no history)."""
        path = fdir / "ledger.sqlite"
        if not path.exists():
            return cls()
        # Not mode=ro: a read-only connection to a WAL database leaves its -wal and -shm behind.
        db = sqlite3.connect(f"file:{path}?mode=rw", uri=True)
        try:
            found = db.execute(
                "SELECT run_id, stage, model, "
                "SUM(CASE WHEN outcome IN ('replayed', 'fallback') THEN 0 ELSE 1 END), "
                "SUM(prompt_tokens), SUM(completion_tokens), SUM(cost_usd), MAX(ts) "
                "FROM calls GROUP BY run_id, stage, model ORDER BY MAX(ts) DESC"
            ).fetchall()
            partial = _partial_runs(db)
        except sqlite3.OperationalError:  # no calls table yet
            return cls()
        finally:
            db.close()
        per: dict[tuple[str, str], list[tuple[float, float, float, float]]] = defaultdict(list)
        counts: dict[str, dict[tuple[str, str], int]] = {}
        for run_id, stage, model, calls, prompt, output, cost, _ts in found:
            key = (str(stage), str(model))
            if run_id in partial or len(per[key]) >= limit:
                continue
            if run_id not in counts:
                counts[run_id] = _instances(fdir / "runs" / str(run_id))
            n = max(1, counts[run_id].get(key, 1))
            per[key].append((calls / n, prompt / n, output / n, cost / n))
        return cls(
            {
                key: Past(
                    runs=len(values),
                    calls=mean(v[0] for v in values),
                    prompt_tokens=mean(v[1] for v in values),
                    output_tokens=mean(v[2] for v in values),
                    cost_usd=mean(v[3] for v in values),
                )
                for key, values in per.items()
                if values
            }
        )


def _partial_runs(db: sqlite3.Connection) -> set[str]:
    try:
        rows = db.execute(
            f"SELECT run_id FROM runs WHERE status IN ({', '.join('?' * len(_PARTIAL))})",
            _PARTIAL,
        ).fetchall()
    except sqlite3.OperationalError:  # a ledger without the run store beside it
        return set()
    return {str(r[0]) for r in rows}


def _instances(run_dir: Path) -> dict[tuple[str, str], int]:
    """How many slots, testers or possible reviews each (ledger stage, model) had in a past run:
    from its forecast.json, else the candidates and reviews of its run.json."""
    try:
        data = json.loads((run_dir / "forecast.json").read_text(encoding="utf-8"))
        return {
            (LEDGER_STAGE[r["stage"]], str(r["model"])): int(r["instances"]) for r in data["rows"]
        }
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        summary = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    out: dict[tuple[str, str], int] = defaultdict(int)
    for c in summary.get("candidates") or []:
        out[("build", str(c.get("model")))] += 1
    for r in summary.get("reviews") or []:
        out[("review", str(r.get("reviewer")))] += 1
    return dict(out)


@dataclass
class _Shape:
    """What one instance of a stage sends: the prompt of each call, typical and worst."""

    prompts: list[int]
    output_each: int
    worst_bounds: list[int]
    worst_output: int


def _filler(chars: int) -> str:
    return "x" * max(0, chars)


def _request(messages: list[Message], tools: list[ToolSpec], rm: ResolvedModel) -> tuple[int, int]:
    """(typical prompt tokens, the byte bound the door reserves for) of one request."""
    bound = wire.estimate_tokens(messages, tools, rm.quirks)
    framing = wire.PER_MESSAGE_TOKENS * len(messages)
    size = bound - framing - wire.REQUEST_OVERHEAD_TOKENS
    return math.ceil(size / CHARS_PER_TOKEN) + framing, bound


class _Sizer:
    """The requests of one spec's stages, typical and at their worst."""

    def __init__(self, spec: Spec, loaded: LoadedConfig, overview: str):
        self.spec, self.loaded, self.overview = spec, loaded, overview
        planner = loaded.config.stages.planner.model
        plan_cap = loaded.output_tokens(planner, "plan")
        self.plan = Plan(summary=_filler(PLAN_OUTPUT_TOKENS * CHARS_PER_TOKEN))
        self.worst_plan = Plan(summary=_filler(plan_cap * WORST_BYTES_PER_TOKEN))

    def planner(self, rm: ResolvedModel) -> _Shape:
        messages = [
            Message.system(PLANNER_SYSTEM),
            Message.user(plan_request(self.spec.body, self.overview)),
        ]
        typical, bound = _request(messages, [SUBMIT_PLAN], rm)
        cap = self.loaded.output_tokens(rm.name, "plan")
        return _Shape([typical], min(PLAN_OUTPUT_TOKENS, cap), [bound], cap)

    def loop(self, rm: ResolvedModel, stage: Literal["build", "test"]) -> _Shape:
        """A builder's or tester's tool loop: each turn's prompt is the last one plus a reply
        and a tool result."""
        settings = self.loaded.config.builder
        if stage == "build":
            system, tools = BUILDER_SYSTEM, TOOL_SPECS
            first, worst_first = (
                build_request(self.spec.body, plan, self.spec.checks)
                for plan in (self.plan, self.worst_plan)
            )
        else:
            system, tools = TESTER_SYSTEM, TESTER_TOOL_SPECS
            first, worst_first = (
                tester_request(self.spec.body, plan) for plan in (self.plan, self.worst_plan)
            )
        cap = self.loaded.output_tokens(rm.name, stage)
        out = min(TURN_OUTPUT_TOKENS, cap)
        p0, _ = _request([Message.system(system), Message.user(first)], tools, rm)
        _, b0 = _request([Message.system(system), Message.user(worst_first)], tools, rm)
        turns = min(settings.max_turns, max(1, round(settings.max_turns * TURN_SHARE)))
        grow = out + TOOL_RESULT_TOKENS + 2 * wire.PER_MESSAGE_TOKENS
        worst_grow = (
            WORST_BYTES_PER_TOKEN * cap + settings.output_cap_bytes + 2 * wire.PER_MESSAGE_TOKENS
        )
        window = rm.context_window
        bounds = [b0 + t * worst_grow for t in range(settings.max_turns)]
        if window:
            bounds = [min(b, window) for b in bounds]
        return _Shape([p0 + t * grow for t in range(turns)], out, bounds, cap)

    def reviewer(self, rm: ResolvedModel) -> _Shape:
        def request(plan: Plan, diff_chars: int, tail: int) -> list[Message]:
            checks = [
                CheckResult(command=c, exit_code=0, passed=True, output_tail=_filler(tail))
                for c in self.spec.checks
            ]
            text = review_request(self.spec.body, plan, _filler(diff_chars), checks)
            return [Message.system(REVIEWER_SYSTEM), Message.user(text)]

        tools = [SUBMIT_REVIEW]
        typical, _ = _request(request(self.plan, DIFF_TOKENS * CHARS_PER_TOKEN, 0), tools, rm)
        # A diff past MAX_DIFF_CHARS is cut; ASCII assumed (a wider diff's bytes are more).
        worst = request(self.worst_plan, MAX_DIFF_CHARS, CHECK_TAIL_CHARS)
        _, bound = _request(worst, tools, rm)
        cap = self.loaded.output_tokens(rm.name, "review")
        return _Shape([typical], min(REVIEW_OUTPUT_TOKENS, cap), [bound], cap)


def _priced(rm: ResolvedModel, prompts: list[int], output_each: int) -> float:
    total = 0.0
    for prompt in prompts:
        inp, out, _ = rm.prices_for(prompt)
        total += prompt * inp + output_each * out
    return total


def _row(
    stage: Stage,
    rm: ResolvedModel,
    instances: int,
    shape: _Shape,
    history: History,
    notes: list[str],
) -> Row:
    worst_each = [rm.worst_cost(b, shape.worst_output) for b in shape.worst_bounds]
    row = Row(
        stage=stage,
        model=rm.name,
        instances=instances,
        calls=len(shape.prompts) * instances,
        prompt_tokens=sum(shape.prompts) * instances,
        output_tokens=shape.output_each * len(shape.prompts) * instances,
        expected_usd=_priced(rm, shape.prompts, shape.output_each) * instances,
        basis="prices",
        worst_calls=len(worst_each) * instances,
        worst_usd=sum(worst_each) * instances,
        worst_call_usd=max(worst_each, default=0.0),
        notes=notes,
    )
    past = history.get(stage, rm.name)
    if past is None:
        return row
    return row.model_copy(
        update={
            "calls": past.calls * instances,
            "prompt_tokens": round(past.prompt_tokens * instances),
            "output_tokens": round(past.output_tokens * instances),
            "expected_usd": past.cost_usd * instances,
            "basis": "history",
            "history_runs": past.runs,
        }
    )


def _login_row(stage: Stage, model: str, instances: int, agent: str | None) -> Row:
    return Row(
        stage=stage,
        model=model,
        instances=instances,
        calls=0,
        prompt_tokens=0,
        output_tokens=0,
        expected_usd=0.0,
        basis="login",
        worst_calls=0,
        worst_usd=0.0,
        worst_call_usd=0.0,
        notes=[f"{agent} on its user's own login: flow neither meters nor caps these calls"],
    )


def _rows(loaded: LoadedConfig, slots: list[str], sizer: _Sizer, history: History) -> list[Row]:
    stages = loaded.config.stages
    planner = loaded.model(stages.planner.model)
    rows = [_row("planner", planner, 1, sizer.planner(planner), history, [])]
    metered: dict[str, int] = defaultdict(int)
    login: dict[str, tuple[int, str | None]] = {}
    agents: dict[str, set[str]] = defaultdict(set)
    for i, model in enumerate(slots):
        entry = loaded.builder_entry(i)
        if entry.login:
            count, _ = login.get(model, (0, None))
            login[model] = (count + 1, entry.agent)
            continue
        metered[model] += 1
        if entry.agent:
            agents[model].add(entry.agent)
    for model, count in metered.items():
        rm = loaded.model(model)
        notes = [
            f"agent CLI {a}: its own prompts, estimated as flow's loop"
            for a in sorted(agents[model])
        ]
        if not rm.context_window:
            notes.append(_NO_WINDOW)
        rows.append(_row("builders", rm, count, sizer.loop(rm, "build"), history, notes))
    rows += [_login_row("builders", m, n, agent) for m, (n, agent) in login.items()]
    testers: dict[str, int] = defaultdict(int)
    for t in stages.testers:
        testers[t.model] += 1
    for model, count in testers.items():
        rm = loaded.model(model)
        notes = [] if rm.context_window else [_NO_WINDOW]
        rows.append(_row("testers", rm, count, sizer.loop(rm, "test"), history, notes))
    for ref in stages.reviewers:
        rm = loaded.model(ref.model)
        pairs = sum(1 for m in slots if ref.model in loaded.reviewers_for(m))
        if not pairs:
            continue
        if ref.login:
            rows.append(_login_row("reviewers", ref.model, pairs, ref.agent))
            continue
        notes = [f"agent CLI {ref.agent}: estimated as one review call"] if ref.agent else []
        rows.append(_row("reviewers", rm, pairs, sizer.reviewer(rm), history, notes))
    return rows


def _verdict(expected: float, worst: float, budget: float | None, where: str) -> str:
    if budget is None:
        return f"no budget set: nothing caps this run; worst case {usd(worst)}"
    cap = f"{usd(budget)} ({where})"
    if worst <= budget:
        return f"fits: even the worst case {usd(worst)} is within the budget {cap}"
    if expected <= budget:
        return (
            f"does not fit the worst case: the expected {usd(expected)} is within the budget "
            f"{cap}, the worst case {usd(worst)} is not, so the caps may stop the run early; "
            f"a budget of {usd(worst)} covers the worst case"
        )
    return (
        f"does not fit: the expected {usd(expected)} is more than the budget {cap}; "
        f"raise it to at least {usd(expected)} ({usd(worst)} covers the worst case)"
    )


def forecast_run(
    spec: Spec,
    loaded: LoadedConfig,
    repo: Repo,
    base_sha: str,
    *,
    builders: int | None = None,
    budget_usd: float | None = None,
    budget_from: str = "--budget",
    history: History | None = None,
) -> Forecast:
    """The forecast of one run of `spec` (after its preflight passed)."""
    if history is None:
        history = History.load(repo.root / ".flow")
    if budget_usd is None and loaded.config.budget.per_run_usd is not None:
        budget_usd, budget_from = loaded.config.budget.per_run_usd, "budget.per_run_usd"
    names = repo.git("ls-tree", "-r", "--name-only", base_sha).splitlines()
    sizer = _Sizer(spec, loaded, repo_overview(names))
    slots = loaded.builder_slots(builders or spec.builders)
    rows = _rows(loaded, slots, sizer, history)
    expected = sum(r.expected_usd for r in rows)
    worst = sum(r.worst_usd for r in rows)
    notes = []
    per_call = loaded.config.budget.per_call_usd
    for r in rows:
        if per_call is not None and r.worst_call_usd > per_call:
            notes.append(
                f"{r.stage} {r.model}: a call may reserve {usd(r.worst_call_usd)}, more than "
                f"budget.per_call_usd {usd(per_call)}; such calls are refused"
            )
    return Forecast(
        spec=str(spec.path),
        title=spec.title,
        rows=rows,
        expected_usd=expected,
        worst_usd=worst,
        budget_usd=budget_usd,
        budget_from=budget_from if budget_usd is not None else None,
        fits=None if budget_usd is None else worst <= budget_usd,
        expected_fits=None if budget_usd is None else expected <= budget_usd,
        verdict=_verdict(expected, worst, budget_usd, budget_from),
        notes=notes,
    )


def forecast_batch(
    spec_paths: list[Path],
    layers: Layers,
    repo: Repo,
    *,
    budget_usd: float,
    per_spec_usd: float | None = None,
    builders: int | None = None,
) -> BatchForecast:
    """Every spec's forecast under the batch's caps; a spec the batch's own preflight refuses
    is listed with the reason (as the batch would skip or fail it)."""
    from orchestrator.preflight import preflight
    from orchestrator.spec import load_spec

    specs = [load_spec(p.resolve()) for p in spec_paths]  # as the batch: all valid first
    configs = [layers.resolve(s.models, f"{s.path}: models") for s in specs]
    history = History.load(repo.root / ".flow")
    runs, refused = [], []
    for spec, loaded in zip(specs, configs, strict=True):
        try:
            base = preflight(spec, loaded, repo, builders=builders, budget_usd=per_spec_usd)
        except FlowError as err:
            kind = "skipped" if isinstance(err, WorkspaceError) else "failed"
            refused.append(Refusal(spec=str(spec.path), reason=f"{kind}: {err}"))
            continue
        runs.append(
            forecast_run(
                spec,
                loaded,
                repo,
                base,
                builders=builders,
                budget_usd=per_spec_usd,
                budget_from="--per-spec",
                history=history,
            )
        )
    expected = sum(f.expected_usd for f in runs)
    worst = sum(f.worst_usd for f in runs)
    each = all(f.fits is not False for f in runs)
    verdict = _verdict(expected, worst, budget_usd, "the batch's --budget")
    if not each:
        short = [f.spec for f in runs if f.fits is False]
        verdict += f"; {len(short)} spec(s) do not fit their own cap: {', '.join(short)}"
    return BatchForecast(
        runs=runs,
        refused=refused,
        budget_usd=budget_usd,
        per_spec_usd=per_spec_usd,
        expected_usd=expected,
        worst_usd=worst,
        fits=each and worst <= budget_usd,
        expected_fits=all(f.expected_fits is not False for f in runs) and expected <= budget_usd,
        verdict=verdict,
    )


def save(run_dir: Path, forecast: Forecast) -> Path:
    path = run_dir / "forecast.json"
    path.write_text(forecast.model_dump_json(indent=2), encoding="utf-8")
    return path
