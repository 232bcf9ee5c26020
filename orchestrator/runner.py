"""Run one spec end to end: validate, wire the dependencies, drive the graph, clean up."""

from __future__ import annotations

import asyncio
import os
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langchain_core.runnables import RunnableConfig
from pydantic import BaseModel

from orchestrator import overlay, pools
from orchestrator.attempts import Attempts
from orchestrator.config import LoadedConfig, secret_values
from orchestrator.context import Context
from orchestrator.errors import AuthenticationFailed, FlowError, KeyRefused
from orchestrator.events import BuilderUpdate, Event, Notice, RunFinished, RunStarted
from orchestrator.layers import ConfigSource
from orchestrator.nodes.report import outcome_of
from orchestrator.preflight import preflight
from orchestrator.protocols import EventSink
from orchestrator.redact import Redactor, environment_secrets
from orchestrator.spec import Spec
from orchestrator.state import (
    Applied,
    BuildTask,
    Candidate,
    CandidateChecks,
    CandidateHeldOut,
    CheckResult,
    CheckTask,
    Drift,
    HeldOut,
    HeldOutResult,
    HeldOutTask,
    HeldOutTest,
    Plan,
    Review,
    ReviewTask,
    RunState,
    Selection,
    TestTask,
)
from orchestrator.store import RunRecord, Store
from orchestrator.workspace import Repo, flow_dir, remove_run_worktrees, worktree_dir

if TYPE_CHECKING:
    from orchestrator.budget import Cap
    from orchestrator.executors import Executor
    from orchestrator.llm.limits import Limiter

STATE_TYPES = [
    Plan,
    Candidate,
    CandidateChecks,
    CheckResult,
    Review,
    Selection,
    Applied,
    BuildTask,
    CheckTask,
    ReviewTask,
    HeldOut,
    HeldOutTest,
    HeldOutResult,
    CandidateHeldOut,
    TestTask,
    HeldOutTask,
    Drift,
]


class RunOptions(ConfigSource):
    builders: int | None = None
    budget_usd: float | None = None
    keep_worktrees: bool = False
    max_concurrency: int = 16
    onto_tip: bool = False
    """`--onto-tip`: kept with the run for resume."""


class RunResult(BaseModel):
    run_id: str
    outcome: str
    branch: str | None = None
    commit: str | None = None
    winner_model: str | None = None
    cost_usd: float = 0.0
    report: Path
    exit_code: int


@dataclass
class Shared:
    """What concurrent runs in one process share: provider slots, the checkpointer, caps."""

    limiter: Limiter
    saver: Any
    caps: list[Cap] = field(default_factory=list)
    batch_id: str | None = None
    executor: Executor | None = None
    """Where candidates are built and checked; None: here."""


class RedactingSink:
    """Every event leaves the process through this, with secrets masked."""

    def __init__(self, inner: EventSink, redact: Redactor):
        self.inner, self.redact = inner, redact

    def emit(self, event: Event) -> None:
        if self.redact.secrets:
            event = type(event).model_validate_json(self.redact(event.model_dump_json()))
        self.inner.emit(event)


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def sweep_dead_runs(repo: Repo, store: Store) -> None:
    """Remove checkouts left behind by runs whose process died."""
    for rec in store.runs(limit=200):
        if rec.live_status == "interrupted":
            remove_run_worktrees(repo, rec.run_id)


@asynccontextmanager
async def shared_resources(
    repo: Repo, loaded: LoadedConfig, caps: list[Cap] | None = None, batch_id: str | None = None
) -> AsyncIterator[Shared]:
    from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

    from orchestrator.checkpoints import open_saver
    from orchestrator.llm.limits import Limiter

    path = flow_dir(repo) / "checkpoints.sqlite"
    serde = JsonPlusSerializer(allowed_msgpack_modules=STATE_TYPES)
    async with open_saver(path, serde) as saver:
        yield Shared(
            limiter=Limiter(loaded.config.providers),
            saver=saver,
            caps=caps or [],
            batch_id=batch_id,
        )


async def run_spec(
    spec: Spec,
    loaded: LoadedConfig,
    repo: Repo,
    events: EventSink,
    options: RunOptions,
    *,
    run_id: str | None = None,
    shared: Shared | None = None,
) -> RunResult:
    """Run (or, given the id of an interrupted run, resume) one spec."""
    # git and SQLite work happens in threads: in a batch, every run shares one event loop.
    base_sha = await pools.git(_base_for, spec, loaded, repo, run_id, options)
    if shared is None:
        async with shared_resources(repo, loaded) as own:
            return await _run(spec, loaded, repo, events, options, run_id, own, base_sha)
    return await _run(spec, loaded, repo, events, options, run_id, shared, base_sha)


def _base_for(
    spec: Spec, loaded: LoadedConfig, repo: Repo, run_id: str | None, options: RunOptions
) -> str:
    if run_id is None:
        return preflight(
            spec, loaded, repo, builders=options.builders, budget_usd=options.budget_usd
        )
    return repo.resolve(spec.base or "HEAD")


async def _run(
    spec: Spec,
    loaded: LoadedConfig,
    repo: Repo,
    events: EventSink,
    options: RunOptions,
    run_id: str | None,
    shared: Shared,
    base_sha: str,
) -> RunResult:
    from orchestrator.budget import Budget
    from orchestrator.graph import build_graph
    from orchestrator.ledger import Ledger
    from orchestrator.llm.door import Door

    run_id = run_id or new_run_id()
    config: RunnableConfig = {
        "configurable": {"thread_id": run_id},
        "max_concurrency": options.max_concurrency,
    }
    saved = await shared.saver.aget_tuple(config)
    resuming = saved is not None
    if resuming:  # the interrupted process may have left its checkouts behind
        await pools.git(remove_run_worktrees, repo, run_id)
    dirty = await pools.git(repo.is_dirty)
    fdir = flow_dir(repo)
    run_dir = fdir / "runs" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    store = await pools.db(Store, fdir / "ledger.sqlite")
    if shared.batch_id is None:  # a batch sweeps once for all its runs
        await pools.git(sweep_dead_runs, repo, store)
    ledger = await pools.db(Ledger, fdir / "ledger.sqlite")
    redact = Redactor(secret_values(loaded) + environment_secrets(os.environ))
    sink = RedactingSink(events, redact)
    limit = (
        options.budget_usd if options.budget_usd is not None else loaded.config.budget.per_run_usd
    )
    caps = await pools.db(_caps, store, ledger, run_id, limit, shared)
    door = Door(
        loaded,
        run_id=run_id,
        spec=str(spec.path),
        ledger=ledger,
        budget=Budget(caps, per_call_usd=loaded.config.budget.per_call_usd),
        events=sink,
        limiter=shared.limiter,
    )
    slots = loaded.builder_slots(options.builders or spec.builders)
    ctx = Context(
        run_id=run_id,
        repo=repo,
        spec=spec,
        config=loaded,
        door=door,
        events=sink,
        run_dir=run_dir,
        worktrees=worktree_dir(repo, run_id),
        ledger=ledger,
        redact=redact,
        keep_worktrees=options.keep_worktrees,
        onto_tip=options.onto_tip,
        resuming=resuming,
        executor=shared.executor,
        attempts=Attempts(_enough(spec, loaded, len(slots)), passed=_passed_before(saved)),
        dirty_note=(
            "the working tree had uncommitted changes; they were not included "
            f"(the run used the committed base {base_sha[:12]})"
        )
        if dirty
        else None,
    )
    await pools.db(
        store.start_run,
        RunRecord(
            run_id=run_id,
            batch_id=shared.batch_id,
            spec_path=str(spec.path.resolve()),
            spec_digest=spec.digest,
            config_path=str(loaded.path) if loaded.path else None,
            title=spec.title,
            branch=spec.branch,
            options=options.model_dump(),
            status="running",
            started=time.time(),
            pid=os.getpid(),
        ),
    )
    spent = await pools.db(ledger.total, run_id)
    sink.emit(
        RunStarted(
            run_id=run_id,
            title=spec.title,
            repo=str(repo.root),
            base=base_sha,
            branch=spec.branch,
            builders=slots,
            reviewers=[r.model for r in loaded.config.stages.reviewers],
            testers=[t.model for t in loaded.config.stages.testers],
            budget_usd=limit,
            spent_usd=spent,
        )
    )
    if not resuming:  # the report compares the spend with what was expected at the start
        trouble = await pools.git(
            _keep_forecast, spec, loaded, repo, base_sha, options, run_dir, shared.batch_id
        )
        if trouble:
            sink.emit(Notice(run_id=run_id, level="warning", message=f"no forecast: {trouble}"))
    for done in _built_before(saved):  # a resumed run shows every builder, not only the new
        sink.emit(_finished_builder(run_id, done))
    from orchestrator import sandbox

    if await pools.work(sandbox.bwrap) is None:  # said plainly, in the run's first lines
        sink.emit(Notice(run_id=run_id, level="warning", message=sandbox.describe()))
    elif await pools.work(overlay.unavailable) is not None:
        sink.emit(Notice(run_id=run_id, level="info", message=overlay.describe()))
    from orchestrator.agent_status import login_warnings

    for warning in login_warnings(loaded):
        sink.emit(Notice(run_id=run_id, level="warning", message=warning))
    state_in: RunState | None = (
        None
        if resuming
        else RunState(
            run_id=run_id,
            base_sha=base_sha,
            builder_models=slots,
            tester_models=[t.model for t in loaded.config.stages.testers],
            reviewers={m: loaded.reviewers_for(m) for m in set(slots)},
            families={name: m.family for name, m in loaded.models.items()},
            base_branch=await pools.git(repo.branch_of, spec.base or "HEAD"),
        )
    )
    try:
        graph = build_graph().compile(checkpointer=shared.saver)
        async for _ in graph.astream(
            state_in, config, context=ctx, durability="sync", stream_mode="updates"
        ):
            pass
        final: RunState = (await graph.aget_state(config)).values  # type: ignore[assignment]
        cost = await pools.db(ledger.total, run_id)
        result = _result(run_id, final, cost, run_dir)
        await pools.db(
            store.finish_run,
            run_id,
            status=result.outcome,
            cost=cost,
            branch=result.branch,
            commit=result.commit,
            winner=result.winner_model,
        )
    except AuthenticationFailed as err:
        # Every other builder and review finished first (orchestrator/siblings.py) and is
        # checkpointed: the run is resumable once the key is fixed.
        store.finish_run(
            run_id, status="interrupted", cost=ledger.total(run_id), error=redact(str(err))[:500]
        )
        raise KeyRefused(
            f"{redact(str(err))}; run {run_id} stopped, finished work kept: fix the key, "
            f"then `flow resume {run_id}`"
        ) from None
    except Exception as err:
        store.finish_run(
            run_id,
            status="failed",
            cost=ledger.total(run_id),
            error=redact(f"{type(err).__name__}: {err}")[:500],
        )
        raise
    finally:
        try:
            if shared.executor is not None:
                await shared.executor.close_run(run_id)
            overlay.close_under(worktree_dir(repo, run_id))
            if not options.keep_worktrees:
                await _remove_checkouts(repo, run_id)
        finally:
            ledger.close()
            store.close()
    sink.emit(
        RunFinished(
            run_id=run_id,
            outcome=result.outcome,
            branch=result.branch,
            commit=result.commit,
            cost_usd=cost,
            report=str(result.report),
            exit_code=result.exit_code,
        )
    )
    return result


async def _remove_checkouts(repo: Repo, run_id: str) -> None:
    """Off the loop, yet finished when the run is cancelled meanwhile: a stopped run leaves
    no checkouts behind (the loop waits; the process is stopping anyway)."""
    try:
        await pools.git(remove_run_worktrees, repo, run_id)
    except asyncio.CancelledError:
        # A checkout may still be in the making on another thread: let it end, then remove.
        pools.GIT.wait_idle()
        remove_run_worktrees(repo, run_id)
        raise


def _keep_forecast(
    spec: Spec,
    loaded: LoadedConfig,
    repo: Repo,
    base_sha: str,
    options: RunOptions,
    run_dir: Path,
    batch_id: str | None,
) -> str | None:
    """Write the run's forecast.json; what went wrong, if it could not (the run goes on)."""
    from orchestrator.forecast import forecast_run, save

    try:
        found = forecast_run(
            spec,
            loaded,
            repo,
            base_sha,
            builders=options.builders,
            budget_usd=options.budget_usd,
            budget_from="--per-spec" if batch_id else "--budget",
        )
        save(run_dir, found)
    except (OSError, sqlite3.Error, ValueError, FlowError) as err:
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    return None


def _enough(spec: Spec, loaded: LoadedConfig, slots: int) -> int | None:
    """Adaptive N's `enough`, from the spec or agents.yaml; None: every builder starts."""
    enough = spec.enough or loaded.config.builder.enough
    return None if enough is None or enough >= slots else enough


def _caps(store: Store, ledger: Any, run_id: str, limit: float | None, shared: Shared) -> list[Cap]:
    """Every cap that applied when the run first started, whatever resumes it: the stored
    run cap (the lower of it and today's), and the batch's cap when the run belongs to a
    batch that is not the one resuming it (`flow resume RUN` of a batch's run)."""
    from orchestrator.budget import Cap

    batch = next((c for c in shared.caps if c.name == "batch"), None)
    first = {
        "run": limit,
        "batch": batch.limit_usd if batch is not None else None,
        "batch_id": shared.batch_id,
    }
    stored = store.keep_caps(run_id, first)
    caps = list(shared.caps)
    runs = [x for x in (stored.get("run"), limit) if x is not None]
    if runs:
        caps.append(Cap("run", min(runs), spent_usd=ledger.total(run_id)))
    if batch is None and stored.get("batch") is not None and stored.get("batch_id"):
        members = store.runs(limit=10_000, batch_id=stored["batch_id"])
        spent = sum(ledger.total(r.run_id) for r in members)
        cap = float(stored["batch"])
        caps.append(Cap("batch", cap, spent_usd=min(spent, cap)))
    return caps


def _built_before(saved: Any) -> list[Candidate]:
    """Candidates finished before an interruption: in the saved state, or written by the
    builders of the step that was cut short."""
    if saved is None:
        return []
    values = getattr(saved, "checkpoint", {}).get("channel_values", {})
    found = {c.index: c for c in values.get("candidates", []) if isinstance(c, Candidate)}
    for _task, channel, value in getattr(saved, "pending_writes", None) or []:
        if channel == "candidates":
            found.update((c.index, c) for c in value if isinstance(c, Candidate))
    return [found[i] for i in sorted(found)]


def _finished_builder(run_id: str, cand: Candidate) -> BuilderUpdate:
    return BuilderUpdate(
        run_id=run_id,
        index=cand.index,
        model=cand.model,
        status=cand.status,
        turns=cand.turns,
        tokens=cand.prompt_tokens + cand.completion_tokens,
        cost_usd=cand.cost_usd,
        action="before the interruption: " + (cand.error or cand.summary or cand.status),
    )


def _passed_before(saved: Any) -> int:
    """Candidates that passed their checks before an interruption (adaptive N's count)."""
    writes = getattr(saved, "pending_writes", None) or []
    return sum(
        1
        for _task, channel, value in writes
        if channel == "checks"
        for checks in value
        if checks.passed
    )


def _result(run_id: str, final: RunState, cost: float, run_dir: Path) -> RunResult:
    applied = final.get("applied")
    selection = final.get("selection")
    winner = None
    if applied and selection and selection.winner is not None:
        winner = next(
            (c.model for c in final.get("candidates", []) if c.index == selection.winner), None
        )
    return RunResult(
        run_id=run_id,
        outcome=outcome_of(final),
        branch=applied.branch if applied else None,
        commit=applied.commit if applied else None,
        winner_model=winner,
        cost_usd=cost,
        report=run_dir / "report.md",
        exit_code=0 if applied else 1,
    )
