"""build: one builder in its own worktree. It raises only for a refused key, and only once
its siblings are done (orchestrator/siblings.py), so a sibling is never cancelled."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from langgraph.runtime import Runtime

from orchestrator import overlay, pools
from orchestrator.agents.builder import Builder, BuildOutcome
from orchestrator.agents.cli import CliBuilder, cli_for
from orchestrator.agents.prompts import build_request
from orchestrator.agents.tools import Tools
from orchestrator.agents.window import ContextWindow
from orchestrator.config import AgentSettings, LoadedConfig
from orchestrator.context import Context
from orchestrator.errors import AuthenticationFailed, BudgetExceeded
from orchestrator.events import BuilderUpdate
from orchestrator.evidence.protect import protection_for, split_patch
from orchestrator.fmt import clip, usd
from orchestrator.nodes.check import check_candidate
from orchestrator.state import BuildTask, Candidate
from orchestrator.workspace import diff_stats, worktree_diff

Status = Literal["running", "ok", "empty", "failed", "not started"]
SUMMARY_CHARS = 200  # the line a person reads; the whole summary is in the report


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


async def build(task: BuildTask, runtime: Runtime[Context]) -> dict[str, object]:
    """Build one candidate, then check it at once (not after the slowest sibling).

    A refused key raises, but only once every sibling has finished, so theirs are kept."""
    ctx = runtime.context
    return await ctx.siblings.run(_build_and_check(task, ctx))


async def _build_and_check(task: BuildTask, ctx: Context) -> dict[str, object]:
    if not await ctx.attempts.start(task.index):
        return _not_started(ctx, task)
    if ctx.executor is not None and ctx.config.builder_agent(task.index) is None:
        # Built and checked on another node (orchestrator/executors); agent CLIs stay here.
        passed = False
        try:
            built = await ctx.executor.candidate(task, ctx)
            done = built.get("checks")
            passed = isinstance(done, list) and any(c.passed for c in done)
            return built
        finally:
            ctx.attempts.finished(passed)
    passed = False
    # Unless the user keeps the builders' checkouts, the checks run in the builder's own,
    # reset to base + the candidate's patch: one checkout per candidate, not two.
    reuse = None if ctx.keep_worktrees else ctx.worktrees / f"build-{task.index}"
    try:
        result = await _build(task, ctx, keep=reuse is not None)
        candidate = result["candidates"][0]
        if candidate.status != "ok":  # unfinished or empty: nothing to check
            return result
        checks = await check_candidate(ctx, candidate, task.base_sha, reuse)
        passed = checks.passed
        return {**result, "checks": [checks]}
    finally:
        if reuse is not None:
            await pools.git(ctx.repo.remove_worktree, reuse)
        ctx.attempts.finished(passed)


def _not_started(ctx: Context, task: BuildTask) -> dict[str, object]:
    """Enough candidates passed before this builder's turn came: it never starts."""
    model = ctx.config.model(task.model)
    turns = ctx.config.config.builder.max_turns
    per_turn = ctx.config.worst_call(task.model, "build", model.context_window or 0)
    bound = (
        f"it would have cost at most {usd(turns * per_turn)} ({turns} turns at their worst case)"
        if model.context_window or not (model.input_per_token or model.cached_per_token)
        else f"its cost had no bound ({model.name} has no context_window to bound its prompts)"
    )
    ctx.events.emit(
        BuilderUpdate(
            run_id=ctx.run_id,
            index=task.index,
            model=task.model,
            status="not started",
            action=f"{ctx.attempts.passed} candidates already pass",
        )
    )
    candidate = Candidate(
        index=task.index, model=task.model, family=model.family, status="not started"
    )
    note = (
        f"builder #{task.index} ({task.model}) not started: {ctx.attempts.passed} candidates "
        f"already passed their checks (enough: {ctx.attempts.enough}); {bound}"
    )
    return {"candidates": [candidate], "notes": [note]}


async def build_candidate(task: BuildTask, ctx: Context) -> dict[str, Any]:
    """One builder's candidate (its patch and transcript under `ctx.run_dir`), unchecked;
    its checkout is removed after (a Ray node's build, orchestrator/executors/node.py)."""
    return await _build(task, ctx)


async def _build(task: BuildTask, ctx: Context, keep: bool = False) -> dict[str, Any]:
    model = ctx.config.model(task.model)
    path = ctx.worktrees / f"build-{task.index}"

    def update(o: BuildOutcome, status: Status, action: str = "") -> None:
        ctx.events.emit(
            BuilderUpdate(
                run_id=ctx.run_id,
                index=task.index,
                model=task.model,
                status=status,
                turns=o.turns,
                tokens=o.prompt_tokens + o.completion_tokens,
                cost_usd=o.cost_usd,
                action=action,
            )
        )

    outcome = BuildOutcome()
    notes: list[str] = []
    dropped: list[str] = []
    update(outcome, "running", "starting")
    error: str | None = None
    patch = b""
    agent = ctx.config.builder_agent(task.index)
    try:
        # A kept checkout must outlive flow's process, which a view does not.
        view = not ctx.keep_worktrees
        await pools.git(ctx.repo.add_worktree, path, task.base_sha, view=view)
        settings = ctx.config.config.builder
        tools = Tools(
            path, command_timeout_s=settings.command_timeout_s, output_cap=settings.output_cap_bytes
        )
        builder: Builder | CliBuilder
        if agent is not None:
            builder = _cli_builder(ctx, task, agent, update)
        else:
            builder = Builder(
                ctx.door,
                task.model,
                tools,
                max_turns=settings.max_turns,
                transcript=ctx.run_dir / "transcripts" / f"build-{task.index}.jsonl",
                redact=ctx.redact,
                progress=lambda o, action: update(o, "running", action),
                scope=f"build-{task.index}",
                fallbacks=ctx.config.fallback_chains().get(("build", task.model)),
                window=context_window(ctx.config, task.model, "build"),
            )
        try:
            request = build_request(ctx.spec.body, task.plan, ctx.spec.checks)
            if isinstance(builder, CliBuilder):
                assert agent is not None
                if ctx.resuming:
                    notes.append(
                        f"builder #{task.index} ({agent} CLI) ran again from the base on resume: "
                        "a CLI's conversation cannot be replayed turn by turn, so its calls "
                        "are made again (only a request identical to one already paid is "
                        "served from the ledger)"
                    )
                if builder.login:
                    size = (
                        ctx.config.config.agents.get(agent) or AgentSettings()
                    ).login_concurrency
                    async with ctx.login_gate(agent, size):
                        outcome = await builder.run(request, path)
                else:
                    outcome = await builder.run(request, path)
            else:
                outcome = await builder.run(request)
        except AuthenticationFailed:
            raise  # the key is refused: the run stops once the siblings are done
        except Exception as err:  # the boundary: any failure becomes this candidate's record
            outcome = builder.outcome
            outcome.error = ctx.redact(_short(err))
            if isinstance(err, BudgetExceeded):
                notes.append(
                    f"builder #{task.index} ({task.model}) stopped after "
                    f"{outcome.turns} turns: {outcome.error}"
                )
        error = outcome.error
        patch = await pools.git(worktree_diff, path, task.base_sha)
        patch, dropped = await pools.git(_unprotected, ctx, task.base_sha, path, patch)
    except AuthenticationFailed:
        raise
    except Exception as err:  # worktree or diff failure: record it, never cancel siblings
        error = ctx.redact(_short(err))
    finally:
        if not ctx.keep_worktrees and not keep:
            await pools.git(ctx.repo.remove_worktree, path)
    candidate = _candidate(ctx, task, model.family, outcome, error, patch)
    if agent is not None:
        candidate = candidate.model_copy(update={"agent": agent, "metered": outcome.metered})
        if not outcome.metered:
            notes.append(
                f"builder #{task.index} ({agent} on your own login) was not metered by flow: "
                "its tokens and cost are the CLI's own report and no cap applied to them"
            )
    if dropped:
        candidate = candidate.model_copy(update={"protected": dropped})
        notes.append(
            f"builder #{task.index} ({task.model}) changed protected files; their changes "
            f"are not part of the candidate: {', '.join(dropped)}"
        )
    update(outcome, candidate.status, clip(candidate.error or candidate.summary, SUMMARY_CHARS))
    return {"candidates": [candidate], "notes": notes}


def _unprotected(
    ctx: Context, base_sha: str, checkout: Path, patch: bytes
) -> tuple[bytes, list[str]]:
    """The candidate's patch without its changes to protected files (evidence/protect.py)."""
    if not patch:
        return patch, []
    guard = protection_for(ctx.spec.checks, ctx.spec.protect, ctx.repo.files_at(base_sha))
    if not guard.active:
        return patch, []

    files = overlay.host(checkout)

    def drop(rel: str) -> bool:
        return guard.protects(
            rel, lambda: ctx.repo.blob_at(base_sha, rel), lambda: _read_plain(files / rel)
        )

    return split_patch(patch, drop)


def _read_plain(path: Path) -> bytes | None:
    """A checkout file's bytes, never through a link the builder planted."""
    if path.is_symlink():
        return b"symlink -> " + os.fsencode(os.readlink(path))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read(4 << 20) if stat.S_ISREG(os.fstat(fd).st_mode) else None


def _cli_builder(
    ctx: Context, task: BuildTask, agent: str, update: Callable[..., None]
) -> CliBuilder:
    """An agent CLI in this builder's checkout, its model calls through a proxy to the door."""
    settings = ctx.config.config.agents.get(agent) or AgentSettings()
    login = ctx.config.builder_entry(task.index).login
    if login:  # the model as the CLI itself names it on the user's login
        defined = ctx.config.config.models.get(task.model)
        model_id = defined.id if defined is not None else task.model
    else:  # the proxy serves one model under its provider's id
        model_id = ctx.config.model(task.model).litellm_model.split("/", 1)[-1]
    return CliBuilder(
        ctx.door,
        task.model,
        model_id,
        cli_for(agent, settings.command, settings.args),
        transcript=ctx.run_dir / "transcripts" / f"build-{task.index}.jsonl",
        redact=ctx.redact,
        timeout_s=settings.timeout_s,
        scope=f"build-{task.index}",
        fallbacks=ctx.config.fallback_chains().get(("build", task.model)),
        progress=lambda o, action: update(o, "running", action),
        login=login,
        scratch=ctx.worktrees,
    )


def _candidate(
    ctx: Context,
    task: BuildTask,
    family: str,
    outcome: BuildOutcome,
    error: str | None,
    patch: bytes,
) -> Candidate:
    record = Candidate(
        index=task.index,
        model=task.model,
        family=family,
        status="empty",
        error=error,
        turns=outcome.turns,
        prompt_tokens=outcome.prompt_tokens,
        completion_tokens=outcome.completion_tokens,
        cost_usd=outcome.cost_usd,
        summary=ctx.redact(outcome.summary),
        models_used=outcome.models_used,
    )
    if patch and ctx.redact.found_in(patch):
        # Never commit a key, and keep no copy of it in the run directory.
        return record.model_copy(
            update={
                "status": "failed",
                "error": "the diff contains an API key or other secret; discarded",
            }
        )
    if not patch:
        return record.model_copy(update={"status": "failed" if error else "empty"})
    name = f"candidates/build-{task.index}.patch"
    target = ctx.run_dir / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(patch)
    files, added, removed = diff_stats(patch)
    return record.model_copy(
        update={"status": "ok", "patch": name, "files": files, "added": added, "removed": removed}
    )


def context_window(loaded: LoadedConfig, model: str, stage: str) -> ContextWindow | None:
    """The context policy of flow's own loop for `model` and its fallbacks (the smallest
    window of the chain); None when no window is known."""
    chain = [model, *loaded.fallback_chains().get((stage, model), [])]
    resolved = [loaded.models[m] for m in chain if m in loaded.models]
    windows = [rm.context_window for rm in resolved if rm.context_window]
    if not windows or not resolved:
        return None
    rm = resolved[0]
    return ContextWindow.for_model(
        rm.litellm_model,
        min(windows),
        loaded.config.builder.context_share,
        tokenizer=not rm.scripted,
        quirks=rm.quirks,
    )
