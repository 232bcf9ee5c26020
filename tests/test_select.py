"""Selection is deterministic: checks, then mean review score, then diff size, then order."""

from __future__ import annotations

from orchestrator.nodes.select import choose
from orchestrator.state import Candidate, CandidateChecks, CheckResult, Review


def cand(i: int, status: str = "ok", added: int = 10) -> Candidate:
    return Candidate(
        index=i,
        model=f"m{i}",
        family=f"f{i}",
        status=status,  # type: ignore[arg-type]
        patch=f"p{i}" if status == "ok" else None,
        added=added,
    )


def checks(i: int, passed: bool) -> CandidateChecks:
    return CandidateChecks(
        candidate=i, results=[CheckResult(command="t", exit_code=0 if passed else 1, passed=passed)]
    )


def review(i: int, score: float, verdict: str = "approve", error: str | None = None) -> Review:
    return Review(
        candidate=i,
        reviewer="r",
        family="x",
        score=score,
        verdict=verdict,  # type: ignore[arg-type]
        error=error,
    )


def test_checks_beat_reviews() -> None:
    sel = choose(
        [cand(0), cand(1)],
        [checks(0, False), checks(1, True)],
        [review(0, 10), review(1, 3)],
        has_checks=True,
    )
    assert sel.winner == 1
    assert sel.ranking == [1]
    assert any("#0" in e and "checks failed" in e for e in sel.explanation)


def test_mean_score_then_diff_size_then_index() -> None:
    cs = [cand(0, added=50), cand(1, added=5), cand(2, added=5)]
    ok = [checks(0, True), checks(1, True), checks(2, True)]
    sel = choose(cs, ok, [review(0, 9), review(1, 7), review(1, 9), review(2, 8)], has_checks=True)
    assert sel.ranking == [0, 1, 2]  # 9.0 > 8.0 (mean of 7, 9) == 8.0, tie broken by index
    sel = choose(cs, ok, [review(0, 8), review(1, 8), review(2, 8)], has_checks=True)
    assert sel.ranking == [1, 2, 0]  # equal scores: smaller diff first, then builder order


def test_failing_candidate_is_never_applied() -> None:
    sel = choose([cand(0)], [checks(0, False)], [review(0, 10)], has_checks=True)
    assert sel.winner is None


def test_unanimous_rejection_is_not_acceptable() -> None:
    sel = choose(
        [cand(0)],
        [checks(0, True)],
        [review(0, 6, "reject"), review(0, 5, "reject")],
        has_checks=True,
    )
    assert sel.winner is None
    assert "rejected by every reviewer" in sel.explanation[0]


def test_failed_reviews_do_not_count() -> None:
    sel = choose(
        [cand(0), cand(1)],
        [checks(0, True), checks(1, True)],
        [review(0, 0, "reject", error="timeout"), review(1, 6)],
        has_checks=True,
    )
    assert sel.ranking == [1, 0]  # #0 has no completed review: score treated as 0, still acceptable


def test_empty_and_failed_builders_are_explained() -> None:
    sel = choose([cand(0, "empty"), cand(1, "failed")], [], [], has_checks=False)
    assert sel.winner is None
    assert [e.split(":")[0] for e in sel.explanation] == ["#0 (m0)", "#1 (m1)"]


def test_without_checks_any_diff_is_acceptable() -> None:
    sel = choose([cand(0, added=3)], [], [], has_checks=False)
    assert sel.winner == 0


def test_unfinished_builder_is_never_applied() -> None:
    """Issue 8.10: a builder that crashed halfway left a diff; it must not be committed."""
    half = cand(0).model_copy(update={"error": "RuntimeError: model fell over"})
    sel = choose([half, cand(1, added=90)], [], [review(0, 10), review(1, 2)], has_checks=False)
    assert sel.winner == 1 and sel.ranking == [1]
    assert any("#0" in e and "did not finish" in e for e in sel.explanation)
    sel = choose([half], [], [], has_checks=False)
    assert sel.winner is None


def test_a_candidate_without_a_completed_review_needs_reviews_optional() -> None:
    """Issue 8.10: every review failed; with reviews required nothing is applied."""
    failed = [review(0, 0, error="HTTP 500"), review(1, 0, error="HTTP 500")]
    sel = choose(
        [cand(0), cand(1)],
        [checks(0, True), checks(1, True)],
        failed,
        has_checks=True,
        needs_review=True,
    )
    assert sel.winner is None
    assert all("no completed review (reviews failed" in e for e in sel.explanation)
    sel = choose([cand(0)], [checks(0, True)], [], has_checks=True, needs_review=True)
    assert sel.winner is None and "no review was made" in sel.explanation[0]
    partly = [review(0, 0, error="HTTP 500"), review(1, 6)]
    sel = choose([cand(0), cand(1)], [], partly, has_checks=False, needs_review=True)
    assert sel.winner == 1 and sel.ranking == [1]
    sel = choose([cand(0)], [checks(0, True)], failed, has_checks=True, needs_review=False)
    assert sel.winner == 0


def test_a_top_candidate_most_reviewers_reject_is_not_applied() -> None:
    """Issue 9.4: the top of the ranking, rejected by a majority of its reviewers → needs you."""
    reviews = [
        review(0, 9, "reject"),
        review(0, 9, "reject"),
        review(0, 9),
        review(1, 4),
        review(1, 4),
        review(1, 4),
    ]
    sel = choose([cand(0), cand(1)], [], reviews, has_checks=False)
    assert sel.ranking[0] == 0 and sel.winner is None
    assert "2 of 3 reviewers rejected the top candidate #0" in sel.explanation[-1]
    split = [review(0, 9, "reject"), review(0, 9), review(1, 4), review(1, 4)]
    assert choose([cand(0), cand(1)], [], split, has_checks=False).winner == 0
