"""drift: the base branch moved during the run; does the winner still fit on its tip?

By default the winner is committed on the base the run started from (its checks ran there),
and this node only finds out, for the report, how far the branch moved and whether the
winner's diff also applies cleanly on its current tip. With `apply: {onto: tip}` (the spec's
or agents.yaml's) or `--onto-tip`, the tip is the only place it may be committed: when the
diff applies there, changes no file that is protected at the tip, and the spec's checks pass
in a fresh checkout of the tip holding it. Anything else commits it on the base after all,
where its checks passed, and says why it is not on the tip. Nothing of the user's
repository changes here: throwaway indexes and flow's own checkouts only.
"""

from __future__ import annotations

from langgraph.runtime import Runtime

from orchestrator import pools
from orchestrator.context import Context
from orchestrator.events import Notice, StageStarted
from orchestrator.evidence.protect import protection_for
from orchestrator.nodes.check import checks_on
from orchestrator.state import Drift, RunState
from orchestrator.workspace import Repo, diff_stats

TIP_CHECKOUT = "check-tip"


async def drift(state: RunState, runtime: Runtime[Context]) -> dict[str, object]:
    ctx = runtime.context
    selection, branch = state.get("selection"), state.get("base_branch")
    if selection is None or selection.winner is None or not branch:
        return {}
    base = state["base_sha"]
    tip = await pools.git(ctx.repo.branch_tip, branch)
    if tip is None:
        note = f"the base branch {branch} was deleted during the run; committing on the base"
        ctx.events.emit(Notice(run_id=ctx.run_id, level="warning", message=note))
        return {"notes": [note]}
    if tip == base:
        return {}
    ctx.events.emit(StageStarted(run_id=ctx.run_id, stage="drift"))
    winner = next(c for c in state["candidates"] if c.index == selection.winner)
    assert winner.patch is not None
    patch = (ctx.run_dir / winner.patch).read_bytes()
    record = await _judge(ctx, branch, base, tip, patch, winner.index)
    fine = record.committed_on == "tip" if record.onto_tip else record.applies
    level = "info" if fine else "warning"
    ctx.events.emit(Notice(run_id=ctx.run_id, level=level, message=record.note))
    return {"drift": record}


def onto(ctx: Context) -> str:
    """Where a winner goes when the base moved: `--onto-tip`, else the spec's `apply.onto`,
    else agents.yaml's (`base` unless set)."""
    return "tip" if ctx.onto_tip else ctx.spec.onto or ctx.config.config.apply.onto


async def _judge(ctx: Context, branch: str, base: str, tip: str, patch: bytes, index: int) -> Drift:
    repo = ctx.repo
    onto_tip = onto(ctx) == "tip"
    commits = await pools.git(repo.commits_between, base, tip)
    moved = (
        f"{branch} moved by {commits} commit{'' if commits == 1 else 's'} during the run "
        f"({base[:12]} → {tip[:12]})"
    )
    record = Drift(
        branch=branch, base=base, tip=tip, commits=commits, applies=False, onto_tip=onto_tip
    )
    # Where `onto: tip` cannot commit on the tip, the winner goes on the base, saying so.
    refused = f"; committed on the base {base[:12]} instead, where its checks ran"
    why = await pools.git(repo.apply_problem, tip, patch)
    if why is not None:
        note = f"{moved}; the winner does not apply cleanly on its tip ({why})"
        if onto_tip:
            return record.model_copy(update={"why": why, "note": note + refused})
        return record.model_copy(update={"why": why, "note": note + "; committed on the base"})
    record.applies = True
    if not onto_tip:
        note = (
            f"{moved}; committed on the base, where its checks ran; the winner also applies "
            "cleanly on its tip (`apply: {onto: tip}` or --onto-tip commits there after "
            "re-running the checks)"
        )
        return record.model_copy(update={"note": note})
    tree = await pools.git(repo.tree_with, tip, patch)
    if tree == await pools.git(repo.git, "rev-parse", f"{tip}^{{tree}}"):
        note = f"{moved}; its tip already holds the winner's changes" + refused
        return record.model_copy(update={"note": note})
    touched = await pools.git(_protected_at, ctx, repo, tip, tree, patch)
    if touched:
        note = (
            f"{moved}; on its tip the winner would change protected files "
            f"({', '.join(touched)})" + refused
        )
        return record.model_copy(update={"note": note})
    results = await checks_on(ctx, TIP_CHECKOUT, tip, patch)
    record.checks = results
    failed = [r for r in results if not r.passed]
    if failed:
        what = "timed out" if failed[0].timed_out else f"failed (exit {failed[0].exit_code})"
        note = (
            f"{moved}; the winner applies on its tip but check `{failed[0].command}` {what} "
            "there" + refused
        )
        return record.model_copy(update={"note": note})
    count = len(results)
    passed = (
        f"{count} check{'' if count == 1 else 's'} pass there"
        if results
        else "the spec has no checks to re-run"
    )
    note = f"{moved}; the winner applies cleanly on its tip and {passed}; committed on the tip"
    return record.model_copy(update={"note": note, "committed_on": "tip"})


def _protected_at(ctx: Context, repo: Repo, tip: str, tree: str, patch: bytes) -> list[str]:
    """The files the winner's diff changes that are protected at the tip (the rule the
    candidates were held to at the base, judged against the tip's files)."""
    guard = protection_for(ctx.spec.checks, ctx.spec.protect, repo.files_at(tip))
    if not guard.active:
        return []
    files, _, _ = diff_stats(patch)

    def changed(rel: str) -> bool:
        return guard.protects(rel, lambda: repo.blob_at(tip, rel), lambda: repo.blob_at(tree, rel))

    return [rel for rel in files if changed(rel)]
