"""review: one reviewer of another model family judges one candidate, blind to its builder."""

from __future__ import annotations

from langgraph.runtime import Runtime
from pydantic import BaseModel, Field, ValidationError

from orchestrator import pools
from orchestrator.agents.cli import CliBuilder, cli_for
from orchestrator.agents.prompts import REVIEWER_SYSTEM, SUBMIT_REVIEW, review_request
from orchestrator.config import AgentSettings
from orchestrator.context import Context
from orchestrator.errors import AuthenticationFailed, BudgetExceeded, ProviderError, WorkspaceError
from orchestrator.events import ReviewDone, ReviewStarted
from orchestrator.llm.messages import Message
from orchestrator.state import Review, ReviewTask
from orchestrator.workspace import apply_patch


class _Submitted(BaseModel):
    score: float = Field(ge=0, le=10)
    verdict: str
    summary: str = ""
    findings: list[str] = Field(default_factory=list)


async def review(task: ReviewTask, runtime: Runtime[Context]) -> dict[str, object]:
    """One review; a refused key raises once the sibling reviews are done."""
    ctx = runtime.context
    return await ctx.siblings.run(_review(task, ctx))


async def _review(task: ReviewTask, ctx: Context) -> dict[str, object]:
    cand = task.candidate
    ctx.events.emit(ReviewStarted(run_id=ctx.run_id, candidate=cand.index, reviewer=task.reviewer))
    reviewer = ctx.config.model(task.reviewer)
    record = Review(candidate=cand.index, reviewer=task.reviewer, family=reviewer.family)
    notes: list[str] = []
    assert cand.patch is not None
    diff = (ctx.run_dir / cand.patch).read_text(encoding="utf-8", errors="replace")
    messages = [
        Message.system(REVIEWER_SYSTEM),
        Message.user(
            review_request(
                ctx.spec.body, task.plan, diff, task.checks, cand.protected, task.heldout
            )
        ),
    ]
    try:
        built_by = {ctx.config.model(m).family for m in [cand.model, *cand.models_used]}
        fallbacks = [
            f
            for f in ctx.config.fallback_chains().get(("review", task.reviewer), [])
            if ctx.config.model(f).family not in built_by
        ]
        entry = ctx.config.reviewer_entry(task.reviewer)
        if entry is not None and entry.agent is not None:
            submitted, record.cost_usd = await _cli_review(ctx, task, entry.agent, messages)
        else:
            reply = await ctx.door.complete(
                task.reviewer,
                messages,
                stage="review",
                tools=[SUBMIT_REVIEW],
                tool_choice=SUBMIT_REVIEW.name,
                scope=f"{cand.index}",
                fallbacks=fallbacks,
            )
            record.cost_usd = reply.cost_usd
            if reply.model != task.reviewer:  # a fallback answered
                record.reviewer = reply.model
                record.family = ctx.config.model(reply.model).family
            calls = [c for c in reply.message.tool_calls if c.name == SUBMIT_REVIEW.name]
            if not calls:
                raise ValueError("the reviewer did not call submit_review")
            submitted = calls[0].parsed()
        got = _Submitted.model_validate(submitted)
        if got.verdict not in ("approve", "reject"):
            raise ValueError(f"verdict must be approve or reject, got {got.verdict!r}")
        record = record.model_copy(
            update={
                "score": got.score,
                "verdict": got.verdict,
                "summary": ctx.redact(got.summary),
                "findings": [ctx.redact(f) for f in got.findings],
            }
        )
    except AuthenticationFailed:
        raise
    except (BudgetExceeded, ProviderError, ValueError, ValidationError) as err:
        first = str(err).strip().splitlines()
        record.error = ctx.redact(first[0] if first else type(err).__name__)
        if isinstance(err, BudgetExceeded):
            notes = [f"review of #{cand.index} by {task.reviewer} not made: {record.error}"]
    ctx.events.emit(
        ReviewDone(
            run_id=ctx.run_id,
            candidate=cand.index,
            reviewer=task.reviewer,
            score=record.score,
            verdict=record.verdict,
            error=record.error,
        )
    )
    return {"reviews": [record], "notes": notes}


async def _cli_review(
    ctx: Context, task: ReviewTask, agent: str, messages: list[Message]
) -> tuple[object, float]:
    """An agent CLI reviews, read-only, in a checkout of the candidate; its structured output
    is validated as flow's own submit_review. (review, USD spent through its proxy)"""
    settings = ctx.config.config.agents.get(agent) or AgentSettings()
    cand = task.candidate
    assert cand.patch is not None
    path = ctx.worktrees / f"review-{cand.index}-{task.reviewer}"
    reviewer = CliBuilder(
        ctx.door,
        task.reviewer,
        ctx.config.model(task.reviewer).litellm_model.split("/", 1)[-1],
        cli_for(agent, settings.command, settings.args),
        transcript=ctx.run_dir / "transcripts" / f"review-{cand.index}-{task.reviewer}.jsonl",
        redact=ctx.redact,
        timeout_s=settings.timeout_s,
        scope=f"{cand.index}",
        stage="review",
        scratch=ctx.worktrees,
    )
    prompt = "\n\n".join(m.content or "" for m in messages)
    prompt += (
        "\n\nThe candidate is applied in the current directory; read what you need, change "
        "nothing, and answer with the structured review."
    )
    try:
        try:
            view = not ctx.keep_worktrees  # a kept checkout must outlive flow's process
            await pools.git(ctx.repo.add_worktree, path, task.base_sha, view=view)
            patch = (ctx.run_dir / cand.patch).read_bytes()
            await pools.git(apply_patch, path, patch)
        except (OSError, WorkspaceError) as err:
            raise ValueError(f"no checkout for the {agent} reviewer: {err}") from err
        got = await reviewer.review(prompt, path, dict(SUBMIT_REVIEW.parameters))
    finally:
        if not ctx.keep_worktrees:
            await pools.git(ctx.repo.remove_worktree, path)
    return got, reviewer.outcome.cost_usd
