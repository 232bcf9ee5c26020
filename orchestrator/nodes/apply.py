"""apply: commit the winner on a new branch from the base, or from the base branch's tip when
the drift node checked it there (nothing when `onto: tip` could not); create-only, and the
user's checkout is never touched."""

from __future__ import annotations

from langgraph.runtime import Runtime

from orchestrator import pools
from orchestrator.commits import candidate_ref, commit_message
from orchestrator.context import Context
from orchestrator.errors import WorkspaceError
from orchestrator.events import Notice, StageStarted
from orchestrator.state import Applied, RunState
from orchestrator.workspace import BranchExists


async def keep_candidates(ctx: Context, state: RunState) -> list[str]:
    """Every candidate with a diff becomes a commit under refs/flow/RUN/N (create-only), so
    `git diff`, `git log`, `flow show` and `flow pick` work on it; notes for those that failed."""
    notes = []
    for c in state.get("candidates", []):
        if c.status != "ok" or c.patch is None:
            continue
        patch = (ctx.run_dir / c.patch).read_bytes()
        message = ctx.redact(
            f"{ctx.spec.title.strip()} (candidate #{c.index})\n\n"
            f"Flow-Run: {ctx.run_id}\nFlow-Candidate: {c.index}\nFlow-Model: {c.model}\n"
        )
        ref = candidate_ref(ctx.run_id, c.index)
        try:
            await pools.git(ctx.repo.keep_candidate, state["base_sha"], patch, ref, message)
        except WorkspaceError as err:
            notes.append(f"candidate #{c.index} not kept as {ref}: {err}")
    return notes


async def apply(state: RunState, runtime: Runtime[Context]) -> dict[str, object]:
    ctx = runtime.context
    notes = await keep_candidates(ctx, state)
    selection = state.get("selection")
    if selection is None or selection.winner is None:
        return {"notes": notes}
    drift = state.get("drift")
    if drift is not None and drift.committed_on is None:
        return {"notes": notes}  # `onto: tip` could not commit on the tip: the user decides
    ctx.events.emit(StageStarted(run_id=ctx.run_id, stage="apply"))
    winner = next(c for c in state["candidates"] if c.index == selection.winner)
    assert winner.patch is not None
    patch = (ctx.run_dir / winner.patch).read_bytes()
    message = ctx.redact(commit_message(ctx.spec.title, winner, ctx.run_id, ctx.spent()))
    branch = ctx.spec.branch
    # Resume after a crash between commit and checkpoint: the branch may already be ours.
    parent = drift.tip if drift is not None and drift.committed_on == "tip" else state["base_sha"]
    ours = await pools.git(_made_by, ctx, branch)
    if ours is not None:
        sha, made_on = ours
        return {"applied": Applied(branch=branch, commit=sha, parent=made_on), "notes": notes}
    try:
        sha = await pools.git(ctx.repo.commit_patch, parent, patch, branch, message)
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
        sha = await pools.git(ctx.repo.commit_patch, parent, patch, branch, message)
    return {"applied": Applied(branch=branch, commit=sha, parent=parent), "notes": notes}


def _made_by(ctx: Context, branch: str) -> tuple[str, str] | None:
    """The branch's commit and its parent, if this run made it (before a crash)."""
    if not ctx.repo.branch_exists(branch):
        return None
    existing = ctx.repo.git(
        "for-each-ref", "--format=%(objectname) %(contents)", f"refs/heads/{branch}"
    )
    if not existing or f"Flow-Run: {ctx.run_id}" not in existing:
        return None
    sha = existing.split()[0]
    return sha, ctx.repo.git("rev-parse", f"{sha}^")
