"""apply: commit the winner on a new branch from the base; the user's checkout is never touched."""

from __future__ import annotations

import asyncio

from langgraph.runtime import Runtime

from orchestrator.context import Context
from orchestrator.events import Notice, StageStarted
from orchestrator.fmt import usd
from orchestrator.state import Applied, Candidate, RunState
from orchestrator.workspace import BranchExists


def commit_message(title: str, winner: Candidate, run_id: str, cost: float) -> str:
    body = winner.summary.strip()
    parts = [title.strip()]
    if body:
        parts.append(body)
    parts.append(f"Flow-Run: {run_id}\nFlow-Model: {winner.model}\nFlow-Cost: {usd(cost)}")
    return "\n\n".join(parts) + "\n"


async def apply(state: RunState, runtime: Runtime[Context]) -> dict[str, object]:
    ctx = runtime.context
    selection = state.get("selection")
    if selection is None or selection.winner is None:
        return {}
    ctx.events.emit(StageStarted(run_id=ctx.run_id, stage="apply"))
    winner = next(c for c in state["candidates"] if c.index == selection.winner)
    assert winner.patch is not None
    patch = (ctx.run_dir / winner.patch).read_bytes()
    message = ctx.redact(commit_message(ctx.spec.title, winner, ctx.run_id, ctx.spent()))
    branch = ctx.spec.branch
    # Resume after a crash between commit and checkpoint: the branch may already be ours.
    existing = (
        ctx.repo.git("for-each-ref", "--format=%(objectname) %(contents)", f"refs/heads/{branch}")
        if ctx.repo.branch_exists(branch)
        else ""
    )
    if existing and f"Flow-Run: {ctx.run_id}" in existing:
        return {"applied": Applied(branch=branch, commit=existing.split()[0])}
    try:
        sha = await asyncio.to_thread(
            ctx.repo.commit_patch, state["base_sha"], patch, branch, message
        )
    except BranchExists:
        # Someone created the branch while we worked: keep the paid-for result under a new name.
        branch = f"{branch}-{ctx.run_id[-6:]}"
        ctx.events.emit(
            Notice(
                run_id=ctx.run_id,
                level="warning",
                message=f"{ctx.spec.branch} appeared during the run; using {branch}",
            )
        )
        sha = await asyncio.to_thread(
            ctx.repo.commit_patch, state["base_sha"], patch, branch, message
        )
    return {"applied": Applied(branch=branch, commit=sha)}
