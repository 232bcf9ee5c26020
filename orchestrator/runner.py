"""Run one spec end to end: validate, wire the dependencies, drive the graph, clean up."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from langchain_core.runnables import RunnableConfig
from pydantic import BaseModel

from orchestrator.config import LoadedConfig, secret_values
from orchestrator.context import Context
from orchestrator.errors import WorkspaceError
from orchestrator.events import Event, RunFinished, RunStarted
from orchestrator.protocols import EventSink
from orchestrator.redact import Redactor
from orchestrator.spec import Spec
from orchestrator.state import (
    Applied,
    BuildTask,
    Candidate,
    CandidateChecks,
    CheckResult,
    CheckTask,
    Plan,
    Review,
    ReviewTask,
    RunState,
    Selection,
)
from orchestrator.workspace import Repo, remove_run_worktrees, worktree_dir

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
]


class RunOptions(BaseModel):
    builders: int | None = None
    budget_usd: float | None = None
    keep_worktrees: bool = False
    max_concurrency: int = 16


class RunResult(BaseModel):
    run_id: str
    outcome: str
    branch: str | None = None
    commit: str | None = None
    cost_usd: float = 0.0
    report: Path
    exit_code: int


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


def flow_dir(repo: Repo) -> Path:
    """<repo>/.flow, created and excluded from git; a clear error when it cannot be written."""
    path = repo.root / ".flow"
    try:
        path.mkdir(exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise WorkspaceError(
            f"{path}: not writable ({err.strerror}); fix its permissions"
        ) from None
    repo.ensure_excluded(".flow/")
    return path


def preflight(spec: Spec, loaded: LoadedConfig, repo: Repo) -> str:
    """Everything that can be wrong before money is spent; returns the base commit."""
    base_sha = repo.resolve(spec.base or "HEAD")
    if repo.branch_exists(spec.branch):
        raise WorkspaceError(
            f"{spec.path}: branch {spec.branch!r} already exists in {repo.root}; "
            "set `branch:` in the spec's front matter or delete the branch"
        )
    from orchestrator.config import resolve_api_key

    for name in _used_models(loaded, spec):
        resolve_api_key(loaded.model(name))
    return base_sha


def _used_models(loaded: LoadedConfig, spec: Spec) -> list[str]:
    stages = loaded.config.stages
    names = [stages.planner.model, *loaded.builder_slots(spec.builders)]
    return sorted(set(names + [r.model for r in stages.reviewers]))


@asynccontextmanager
async def checkpointer(path: Path) -> AsyncIterator[Any]:
    from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    async with AsyncSqliteSaver.from_conn_string(str(path)) as saver:
        saver.serde = JsonPlusSerializer(allowed_msgpack_modules=STATE_TYPES)
        yield saver


async def run_spec(
    spec: Spec,
    loaded: LoadedConfig,
    repo: Repo,
    events: EventSink,
    options: RunOptions,
    *,
    run_id: str | None = None,
) -> RunResult:
    """Run (or, given the run id of an interrupted run, resume) one spec."""
    from orchestrator.budget import Budget, Cap
    from orchestrator.graph import build_graph
    from orchestrator.ledger import Ledger
    from orchestrator.llm.door import Door
    from orchestrator.llm.limits import Limiter

    resuming = run_id is not None
    base_sha = repo.resolve(spec.base or "HEAD") if resuming else preflight(spec, loaded, repo)
    run_id = run_id or new_run_id()
    fdir = flow_dir(repo)
    run_dir = fdir / "runs" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    redact = Redactor(secret_values(loaded))
    sink = RedactingSink(events, redact)
    ledger = Ledger(fdir / "ledger.sqlite")
    limit = (
        options.budget_usd if options.budget_usd is not None else loaded.config.budget.per_run_usd
    )
    caps = [Cap("run", limit, spent_usd=ledger.total(run_id))] if limit is not None else []
    budget = Budget(caps, per_call_usd=loaded.config.budget.per_call_usd)
    door = Door(
        loaded,
        run_id=run_id,
        spec=str(spec.path),
        ledger=ledger,
        budget=budget,
        events=sink,
        limiter=Limiter(loaded.config.providers),
    )
    slots = loaded.builder_slots(options.builders or spec.builders)
    reviewers = {m: loaded.reviewers_for(m) for m in set(slots)}
    dirty = repo.is_dirty()
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
        builders=len(slots),
        keep_worktrees=options.keep_worktrees,
        dirty_note=(
            "the working tree had uncommitted changes; they were not included "
            f"(the run used the committed base {base_sha[:12]})"
        )
        if dirty
        else None,
    )
    sink.emit(
        RunStarted(
            run_id=run_id,
            title=spec.title,
            repo=str(repo.root),
            base=base_sha,
            branch=spec.branch,
            builders=slots,
            reviewers=[r.model for r in loaded.config.stages.reviewers],
        )
    )
    state_in: RunState | None = (
        None
        if resuming
        else RunState(run_id=run_id, base_sha=base_sha, builder_models=slots, reviewers=reviewers)
    )
    config: RunnableConfig = {
        "configurable": {"thread_id": run_id},
        "max_concurrency": options.max_concurrency,
    }
    try:
        async with checkpointer(fdir / "checkpoints.sqlite") as saver:
            graph = build_graph().compile(checkpointer=saver)
            async for _ in graph.astream(
                state_in, config, context=ctx, durability="sync", stream_mode="updates"
            ):
                pass
            final: RunState = (await graph.aget_state(config)).values  # type: ignore[assignment]
        cost = ledger.total(run_id)
    finally:
        if not options.keep_worktrees:
            remove_run_worktrees(repo, run_id)
        ledger.close()
    applied = final.get("applied")
    result = RunResult(
        run_id=run_id,
        outcome="applied" if applied else "nothing",
        branch=applied.branch if applied else None,
        commit=applied.commit if applied else None,
        cost_usd=cost,
        report=run_dir / "report.md",
        exit_code=0 if applied else 1,
    )
    sink.emit(
        RunFinished(
            run_id=run_id,
            outcome="applied" if applied else "nothing",
            branch=result.branch,
            commit=result.commit,
            cost_usd=cost,
            report=str(result.report),
            exit_code=result.exit_code,
        )
    )
    return result
