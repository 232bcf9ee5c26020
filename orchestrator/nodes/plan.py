"""plan: the planner model turns the spec and a repository overview into a Plan."""

from __future__ import annotations

from langgraph.runtime import Runtime
from pydantic import ValidationError

from orchestrator import pools
from orchestrator.agents.prompts import PLANNER_SYSTEM, SUBMIT_PLAN, plan_request, repo_overview
from orchestrator.context import Context
from orchestrator.errors import AuthenticationFailed, BudgetExceeded, ProviderError
from orchestrator.events import Notice, StageStarted
from orchestrator.llm.messages import Message
from orchestrator.spec import Spec
from orchestrator.state import Plan, RunState


def overview(ctx: Context, base_sha: str) -> str:
    """A compact view of the repository at the base commit: its file list, capped."""
    return repo_overview(ctx.repo.git("ls-tree", "-r", "--name-only", base_sha).splitlines())


def fallback_plan(spec: Spec, reason: str) -> Plan:
    """A plan derived from the spec alone, when the planner cannot answer."""
    steps = [f"Implement requirement: {r.name}" for r in spec.requirements] or [spec.title]
    return Plan(summary=f"{spec.title} (planner unavailable: {reason})", steps=steps)


async def plan(state: RunState, runtime: Runtime[Context]) -> dict[str, object]:
    ctx = runtime.context
    ctx.events.emit(StageStarted(run_id=ctx.run_id, stage="plan"))
    planner = ctx.config.config.stages.planner.model
    messages = [
        Message.system(PLANNER_SYSTEM),
        Message.user(
            plan_request(ctx.spec.body, await pools.git(overview, ctx, state["base_sha"]))
        ),
    ]
    try:
        reply = await ctx.door.complete(
            planner,
            messages,
            stage="plan",
            tools=[SUBMIT_PLAN],
            tool_choice=SUBMIT_PLAN.name,
            fallbacks=ctx.config.fallback_chains().get(("plan", planner)),
        )
        calls = [c for c in reply.message.tool_calls if c.name == SUBMIT_PLAN.name]
        if not calls:
            raise ValueError("the planner did not call submit_plan")
        result = Plan.model_validate_json(
            ctx.redact(Plan.model_validate(calls[0].parsed()).model_dump_json())
        )
        return {"plan": result}
    except AuthenticationFailed:
        raise
    except (BudgetExceeded, ProviderError, ValueError, ValidationError) as err:
        reason = ctx.redact(str(err).splitlines()[0] if str(err) else type(err).__name__)
        ctx.events.emit(
            Notice(
                run_id=ctx.run_id,
                level="warning",
                message=f"planner failed, using the spec as the plan: {reason}",
            )
        )
        return {"plan": fallback_plan(ctx.spec, reason), "notes": [f"planner: {reason}"]}
