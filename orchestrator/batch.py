"""Many specs under one budget, several at once, resumable after a crash."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel

from orchestrator import pools
from orchestrator.config import LoadedConfig
from orchestrator.errors import FlowError, KeyRefused, WorkspaceError
from orchestrator.events import BatchFinished, BatchStarted, Notice, SpecSkipped
from orchestrator.executors import executor_for
from orchestrator.fmt import usd
from orchestrator.layers import ConfigSource
from orchestrator.preflight import branch_free, preflight
from orchestrator.protocols import EventSink
from orchestrator.runner import (
    RunOptions,
    Shared,
    new_run_id,
    run_spec,
    shared_resources,
    sweep_dead_runs,
)
from orchestrator.spec import Spec, load_spec
from orchestrator.store import BatchItem, BatchRecord, Store
from orchestrator.workspace import Repo, flow_dir

if TYPE_CHECKING:
    from orchestrator.budget import Cap
    from orchestrator.layers import Layers

FINISHED = ("applied", "needs-you", "nothing", "failed", "skipped")
PROMPT_ALLOWANCE_TOKENS = 8_000
"""Prompt size assumed when deciding whether a new spec can still afford its planner call."""


class BatchOptions(ConfigSource):
    budget_usd: float
    per_spec_usd: float | None = None
    parallel: int = 2
    until: str | None = None
    builders: int | None = None
    keep_worktrees: bool = False
    new: bool = False
    onto_tip: bool = False
    ray: str | None = None
    """`--ray [ADDRESS]`: builders and checks on a Ray cluster (`local`: one started here)."""


class BatchResult(BaseModel):
    batch_id: str
    items: list[BatchItem]
    cost_usd: float
    report: Path
    resumed: bool = False

    @property
    def exit_code(self) -> int:
        return 0 if all(i.status == "applied" for i in self.items) else 1


def batch_key(spec_paths: list[Path], config_path: Path | None) -> str:
    """Same specs + same config = the same batch, so re-running the command resumes it."""
    names = sorted(str(p.resolve()) for p in spec_paths)
    raw = json.dumps({"specs": names, "config": str(config_path.resolve()) if config_path else ""})
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def parse_until(value: str | None, now: datetime | None = None) -> datetime | None:
    """`HH:MM` local time (today, or tomorrow if it has passed), or an ISO date and time."""
    if value is None:
        return None
    now = now or datetime.now()
    try:
        if "T" in value or "-" in value:
            return datetime.fromisoformat(value)
        hour, minute = (int(x) for x in value.split(":"))
        target = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    except ValueError:
        raise FlowError(
            f"--until {value!r}: expected HH:MM (e.g. 07:30) or a date and time "
            "(e.g. 2026-11-22T07:30)"
        ) from None
    return target if target > now else target + timedelta(days=1)


def check_until(value: str | None, now: datetime | None = None) -> datetime | None:
    """`parse_until`, refusing a date and time already past: every spec would be skipped."""
    deadline = parse_until(value, now)
    now = now or datetime.now(deadline.tzinfo if deadline else None)
    if deadline is not None and deadline <= now:
        raise FlowError(
            f"--until {value!r}: that is in the past ({deadline:%Y-%m-%d %H:%M}), so no spec "
            "would start; give a later time (HH:MM means its next occurrence)"
        )
    return deadline


def spec_budget(loaded: LoadedConfig, per_spec: float | None, batch_usd: float) -> float:
    """What one spec of a batch may spend at most: its own cap (--per-spec, else
    budget.per_run_usd), never more than the whole batch's."""
    own = per_spec if per_spec is not None else loaded.config.budget.per_run_usd
    return batch_usd if own is None else min(own, batch_usd)


def refuse_early(specs: list[Path], layers: Layers, options: BatchOptions) -> None:
    """What would make every spec of the batch fail, refused before anything starts: a
    past --until, a budget that cannot afford one pass of a spec at the worst case."""
    from orchestrator.preflight import affordable

    check_until(options.until)
    for path in specs:
        spec = load_spec(path)
        loaded = layers.resolve(spec.models, f"{path}: models")
        slots = loaded.builder_slots(options.builders or spec.builders)
        limit = spec_budget(loaded, options.per_spec_usd, options.budget_usd)
        try:
            affordable(loaded, slots, limit)
        except FlowError as err:
            raise type(err)(f"{path}: {err}") from None


def _min_call_cost(loaded: LoadedConfig) -> float:
    return loaded.worst_call(loaded.config.stages.planner.model, "plan", PROMPT_ALLOWANCE_TOKENS)


def pass_cost(loaded: LoadedConfig, builders: int | None, spec: Spec) -> float:
    """What a spec must be able to spend to start: one pass at the worst case."""
    from orchestrator.preflight import one_pass

    return sum(one_pass(loaded, loaded.builder_slots(builders or spec.builders)))


def _open(
    store: Store,
    specs: list[Spec],
    key: str,
    loaded: LoadedConfig,
    options: BatchOptions,
    resume_id: str | None,
) -> tuple[BatchRecord, bool]:
    rec = BatchRecord(
        batch_id="b-" + new_run_id(),
        key=key,
        config_path=str(loaded.path) if loaded.path else None,
        options=options.model_dump(),
        status="running",
        started=time.time(),
        pid=os.getpid(),
    )
    items = [
        BatchItem(
            batch_id=rec.batch_id,
            position=i,
            spec_path=str(s.path),
            spec_digest=s.digest,
            status="pending",
        )
        for i, s in enumerate(specs)
    ]
    return store.open_or_claim_batch(rec, items, resume_id=resume_id, new=options.new)


async def run_batch(
    spec_paths: list[Path],
    config: Layers | LoadedConfig,
    repo: Repo,
    events: EventSink,
    options: BatchOptions,
    *,
    resume_id: str | None = None,
) -> BatchResult:
    """Run the specs; with `Layers`, each spec's `models:` front matter applies to its run."""
    from orchestrator.budget import Cap
    from orchestrator.ledger import Ledger

    # Every spec is valid before anything starts; paths are absolute so resume works anywhere.
    specs = [load_spec(p.resolve()) for p in spec_paths]
    if isinstance(config, LoadedConfig):
        loaded, per_spec = config, {str(s.path): config for s in specs}
    else:
        loaded = config.resolve()
        per_spec = {str(s.path): config.resolve(s.models, f"{s.path}: models") for s in specs}
    deadline = parse_until(options.until)
    fdir = flow_dir(repo)
    store = Store(fdir / "ledger.sqlite")
    ledger = Ledger(fdir / "ledger.sqlite")
    try:
        sweep_dead_runs(repo, store)
        key = batch_key(spec_paths, loaded.path)
        before = None if options.new else _earlier(store, key, resume_id)
        rec, resumed = _open(store, specs, key, loaded, options, resume_id)
        items = store.items(rec.batch_id)
        by_path = {str(s.path): s for s in specs}
        spent = sum(ledger.total(i.run_id) for i in items if i.run_id)
        limit = float(rec.options.get("budget_usd", options.budget_usd))  # the lower, if resumed
        cap = Cap("batch", limit, spent_usd=min(spent, limit))
        if resumed and rec.status == "done":
            events.emit(Notice(run_id=rec.batch_id, message=_finished_note(rec)))
        else:
            events.emit(
                BatchStarted(
                    batch_id=rec.batch_id,
                    specs=[i.spec_path for i in items],
                    budget_usd=limit,
                    resumed=resumed,
                )
            )
            if resumed and before is not None:
                note = _budget_note(before, options.budget_usd, limit, spent)
                if note:
                    events.emit(Notice(run_id=rec.batch_id, level="warning", message=note))
        async with (
            shared_resources(repo, loaded, caps=[cap], batch_id=rec.batch_id) as shared,
            executor_for(options.ray, loaded) as shared.executor,
        ):
            preload = asyncio.ensure_future(_preload(loaded))
            gate = asyncio.Semaphore(max(1, options.parallel))
            ahead = asyncio.Semaphore(max(1, options.parallel))
            work = [
                _one(
                    item,
                    by_path.get(item.spec_path),
                    per_spec.get(item.spec_path, loaded),
                    repo,
                    events,
                    options,
                    shared,
                    store,
                    (ahead, gate),
                    deadline,
                    cap,
                )
                for item in items
                if item.status not in FINISHED
            ]
            await asyncio.gather(*work)
            await preload
        final = store.items(rec.batch_id)
        if rec.status != "done":  # a run stopped by a refused key leaves it resumable
            done = all(i.status in FINISHED for i in final)
            store.finish_batch(rec.batch_id, "done" if done else "interrupted")
        cost = sum(ledger.total(i.run_id) for i in final if i.run_id)
        from orchestrator.report import write_batch_report

        report = write_batch_report(fdir, rec.batch_id, store, ledger)
    finally:
        ledger.close()
        store.close()
    counts = {s: sum(1 for i in final if i.status == s) for s in FINISHED}
    events.emit(
        BatchFinished(
            batch_id=rec.batch_id,
            applied=counts["applied"],
            nothing=counts["nothing"],
            needs_you=counts["needs-you"],
            failed=counts["failed"],
            skipped=counts["skipped"],
            cost_usd=cost,
            report=str(report),
        )
    )
    return BatchResult(
        batch_id=rec.batch_id, items=final, cost_usd=cost, report=report, resumed=resumed
    )


def _earlier(store: Store, key: str, resume_id: str | None) -> BatchRecord | None:
    """The batch this command would resume, as it was before it is claimed."""
    return store.batch(resume_id) if resume_id else store.latest_batch(key)


def _finished_note(rec: BatchRecord) -> str:
    when = datetime.fromtimestamp(rec.finished or rec.started)
    return (
        f"batch {rec.batch_id} is finished (since {when:%Y-%m-%d %H:%M}); nothing is run "
        "again. Its summary follows; `--new` starts it over"
    )


def _budget_note(before: BatchRecord, asked: float, limit: float, spent: float) -> str | None:
    """Which budget holds when a resumed batch is given a different --budget."""
    first = before.options.get("budget_usd")
    if first is None or float(first) == asked:
        return None
    left = f"{usd(max(limit - spent, 0.0))} left after {usd(spent)} spent"
    if asked > float(first):
        return (
            f"--budget {usd(asked)} is ignored: batch {before.batch_id} keeps its budget of "
            f"{usd(limit)} (a resumed batch's budget never rises; {left}); "
            "`--new` starts over with the new budget"
        )
    return (
        f"--budget {usd(asked)} replaces the {usd(float(first))} batch {before.batch_id} "
        f"started with (the lower holds; {left})"
    )


async def _prepare(
    spec: Spec, loaded: LoadedConfig, repo: Repo, options: BatchOptions, cap: Cap
) -> Exception | None:
    """The spec's preflight, run before a slot is free so that none idles between specs;
    what it raised, to be raised where the run starts."""
    budget = spec_budget(loaded, options.per_spec_usd, cap.limit_usd)
    try:
        await pools.git(preflight, spec, loaded, repo, builders=options.builders, budget_usd=budget)
    except Exception as err:  # reported as the run's own failure, like every other
        return err
    return None


async def _recheck(
    spec: Spec,
    loaded: LoadedConfig,
    repo: Repo,
    options: BatchOptions,
    cap: Cap,
    early: Exception | None,
) -> None:
    """At the start, what the runs before it may have changed: a refusal is asked again (an
    earlier spec may have made the branch this one's base names), a pass keeps but for the
    spec's own branch (an earlier spec may have written it)."""
    if early is None:
        await pools.git(branch_free, spec, repo)
    elif (again := await _prepare(spec, loaded, repo, options, cap)) is not None:
        raise again


async def _preload(loaded: LoadedConfig) -> None:
    """litellm's import (seconds) while the first specs start, unless no model needs it.
    A failure is left to the first call, which reports it where it belongs."""
    if any(not m.scripted for m in loaded.models.values()):
        from orchestrator.llm import wire

        with contextlib.suppress(Exception):
            await wire.warm_up()


async def _one(
    item: BatchItem,
    spec: Spec | None,
    loaded: LoadedConfig,
    repo: Repo,
    events: EventSink,
    options: BatchOptions,
    shared: Shared,
    store: Store,
    gates: tuple[asyncio.Semaphore, asyncio.Semaphore],
    deadline: datetime | None,
    cap: Cap,
) -> None:
    async def update(status: str, reason: str | None = None, run_id: str | None = None) -> None:
        await pools.db(
            store.update_item,
            item.batch_id,
            item.position,
            status=status,
            reason=reason,
            run_id=run_id,
        )

    async def skip(reason: str) -> None:
        await update(status="skipped", reason=reason)
        events.emit(SpecSkipped(batch_id=item.batch_id, spec=item.spec_path, reason=reason))

    if spec is None:
        return await skip("the spec is no longer part of this batch's command")
    if item.run_id is not None and spec.digest != item.spec_digest:
        return await update(
            status="failed", reason="the spec changed since its run started; use --new"
        )
    run_opts = RunOptions(
        builders=options.builders,
        budget_usd=options.per_spec_usd,
        keep_worktrees=options.keep_worktrees,
        onto_tip=options.onto_tip,
        **options.source(),
    )
    ahead, gate = gates
    async with ahead:  # the next specs are checked while the running ones finish
        problem = None if item.run_id else await _prepare(spec, loaded, repo, options, cap)
        await gate.acquire()
    try:
        if item.run_id is None:
            if deadline is not None and datetime.now() >= deadline:
                return await skip(f"deadline {deadline:%H:%M} reached before it started")
            need = pass_cost(loaded, options.builders, spec)
            if cap.remaining() < need:
                return await skip(
                    f"batch budget exhausted ({usd(cap.remaining())} left; one pass of this "
                    f"spec may cost {usd(need)})"
                )
        run_id = item.run_id or new_run_id()
        await update(status="running", run_id=run_id)
        try:
            if item.run_id is None:  # a resumed run's branch may be its own
                await _recheck(spec, loaded, repo, options, cap, problem)
            result = await run_spec(
                spec, loaded, repo, events, run_opts, run_id=run_id, shared=shared
            )
        except KeyRefused as err:  # resumable: running the batch again finishes it
            await update(status="interrupted", reason=str(err)[:300])
            return None
        except FlowError as err:
            status = "skipped" if isinstance(err, WorkspaceError) else "failed"
            await update(status=status, reason=str(err).splitlines()[0])
            return None
        except Exception as err:  # one spec's crash must not stop the batch
            await update(status="failed", reason=f"{type(err).__name__}: {err}"[:300])
            return None
        reason = {
            "applied": None,
            "needs-you": f"needs you: see `flow show {run_id}`, settle with `flow pick {run_id} N`",
        }.get(result.outcome, "no acceptable candidate")
        await update(status=result.outcome, reason=reason)
        return None
    finally:
        gate.release()
