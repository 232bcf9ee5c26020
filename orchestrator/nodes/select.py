"""select: a deterministic choice from the evidence, explained in words."""

from __future__ import annotations

from collections.abc import Callable
from statistics import mean

from langgraph.runtime import Runtime

from orchestrator.context import Context
from orchestrator.events import Selected, StageStarted
from orchestrator.evidence.heldout import informative
from orchestrator.fmt import score as score_text
from orchestrator.state import (
    Candidate,
    CandidateChecks,
    CandidateHeldOut,
    Review,
    RunState,
    Selection,
)


def choose(
    candidates: list[Candidate],
    checks: list[CandidateChecks],
    reviews: list[Review],
    *,
    has_checks: bool,
    needs_review: bool = False,
    heldout: list[CandidateHeldOut] | None = None,
) -> Selection:
    """Checks first (a gate), then the held-out tests passed (those every candidate fails
    tell nothing and are ignored), then the mean review score, then the smaller diff, then
    builder order.

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

    held = {h.candidate: h.results for h in heldout or []}
    telling = informative(held)

    def held_passed(c: Candidate) -> int:
        return sum(r.passed for r in held.get(c.index, []) if (r.tester, r.name) in telling)

    def key(c: Candidate) -> tuple[int, float, int, int]:
        return (-held_passed(c), -(score(c) or 0.0), c.diff_size, c.index)

    ranking = sorted(acceptable, key=key)
    for rank, c in enumerate(ranking, 1):
        s = score(c)
        checks_word = "checks pass, " if has_checks else ""
        if telling:
            checks_word += f"held-out {held_passed(c)}/{len(telling)}, "
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
    why = _why(ranking, winner, explanation, held_passed, score, len(telling))
    return Selection(
        winner=winner, ranking=[c.index for c in ranking], explanation=explanation, why=why
    )


def _why(
    ranking: list[Candidate],
    winner: int | None,
    explanation: list[str],
    held_passed: Callable[[Candidate], int],
    score: Callable[[Candidate], float | None],
    telling: int,
) -> str:
    """The one sentence the report leads with: the first measure that set the winner apart."""
    if winner is None:
        reasons = [e for e in explanation if e.startswith("not applied")]
        if reasons:
            return f"Nothing was applied: {reasons[0].removeprefix('not applied: ')}."
        return "Nothing was applied: no candidate passed the gates (see below)."
    first = ranking[0]
    label = f"#{first.index} ({first.model})"
    if len(ranking) == 1:
        return f"{label} won as the only candidate that passed every gate."
    second = ranking[1]
    other = f"#{second.index}"
    if held_passed(first) != held_passed(second):
        return (
            f"{label} won by passing {held_passed(first)} of {telling} held-out tests, "
            f"against {held_passed(second)} for the runner-up {other}."
        )
    s1, s2 = score(first) or 0.0, score(second) or 0.0
    if s1 != s2:
        return (
            f"{label} won on the reviews (mean {score_text(s1)} against {score_text(s2)} for "
            f"{other}), the evidence before them being equal."
        )
    if first.diff_size != second.diff_size:
        return (
            f"{label} won as the smaller diff ({first.diff_size} against {second.diff_size} "
            f"changed lines for {other}) with evidence and reviews equal."
        )
    return f"{label} won on builder order: it tied with {other} on every measure."


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
        heldout=state.get("heldout_results", []),
    )
    ctx.events.emit(
        Selected(run_id=ctx.run_id, winner=selection.winner, explanation=selection.explanation)
    )
    return {"selection": selection}
