"""select: a deterministic choice from the evidence, explained in words."""

from __future__ import annotations

from statistics import mean

from langgraph.runtime import Runtime

from orchestrator.context import Context
from orchestrator.events import Selected, StageStarted
from orchestrator.fmt import score as score_text
from orchestrator.state import Candidate, CandidateChecks, Review, RunState, Selection


def choose(
    candidates: list[Candidate],
    checks: list[CandidateChecks],
    reviews: list[Review],
    *,
    has_checks: bool,
    needs_review: bool = False,
) -> Selection:
    """Checks first, then the mean review score, then the smaller diff, then builder order.

    A candidate is acceptable when it has a diff, its builder finished, its checks pass (if
    the spec has any), at least one review completed (when `needs_review`), and not every
    completed review rejected it.
    """
    passed = {c.candidate: c.passed for c in checks}
    done = [r for r in reviews if r.error is None]
    explanation: list[str] = []
    acceptable: list[Candidate] = []
    for c in sorted(candidates, key=lambda c: c.index):
        label = f"#{c.index} ({c.model})"
        mine = [r for r in done if r.candidate == c.index]
        if c.status != "ok":
            explanation.append(f"{label}: no diff ({c.status}{': ' + c.error if c.error else ''})")
        elif c.error:
            # A builder that crashed or ran out of turns left half-done work: never apply it.
            explanation.append(f"{label}: builder did not finish ({c.error})")
        elif has_checks and not passed.get(c.index, False):
            explanation.append(f"{label}: checks failed")
        elif needs_review and not mine:
            why = (
                "reviews failed or were not made"
                if any(r.candidate == c.index for r in reviews)
                else "no review was made"
            )
            explanation.append(
                f"{label}: no completed review ({why}); set `reviews: optional` to let the "
                "checks alone decide"
            )
        elif mine and all(r.verdict == "reject" for r in mine):
            explanation.append(f"{label}: rejected by every reviewer")
        else:
            acceptable.append(c)

    def score(c: Candidate) -> float | None:
        mine = [r.score for r in done if r.candidate == c.index]
        return mean(mine) if mine else None

    ranking = sorted(acceptable, key=lambda c: (-(score(c) or 0.0), c.diff_size, c.index))
    for rank, c in enumerate(ranking, 1):
        s = score(c)
        checks_word = "checks pass, " if has_checks else ""
        review_word = f"mean review {score_text(s)}" if s is not None else "no reviews"
        touched = (
            f"; changed protected files (dropped): {', '.join(c.protected)}" if c.protected else ""
        )
        explanation.append(
            f"rank {rank}: #{c.index} ({c.model}): {checks_word}{review_word}, "
            f"{c.diff_size} changed lines{touched}"
        )
    winner = ranking[0].index if ranking else None
    if ranking:
        top = [r for r in done if r.candidate == ranking[0].index]
        rejects = sum(r.verdict == "reject" for r in top)
        if rejects * 2 > len(top):
            # The evidence ranks it first, yet most of its reviewers say no: ask the user.
            explanation.append(
                f"not applied: {rejects} of {len(top)} reviewers rejected the top candidate "
                f"#{ranking[0].index}; needs you"
            )
            winner = None
    return Selection(winner=winner, ranking=[c.index for c in ranking], explanation=explanation)


def needs_review(ctx: Context) -> bool:
    """Reviews are required when reviewers are configured, unless the spec or the config
    says `reviews: optional`."""
    setting = ctx.spec.reviews or ctx.config.config.reviews
    return setting == "required" and bool(ctx.config.config.stages.reviewers)


async def select(state: RunState, runtime: Runtime[Context]) -> dict[str, object]:
    ctx = runtime.context
    ctx.events.emit(StageStarted(run_id=ctx.run_id, stage="select"))
    selection = choose(
        state.get("candidates", []),
        state.get("checks", []),
        state.get("reviews", []),
        has_checks=bool(ctx.spec.checks),
        needs_review=needs_review(ctx),
    )
    ctx.events.emit(
        Selected(run_id=ctx.run_id, winner=selection.winner, explanation=selection.explanation)
    )
    return {"selection": selection}
