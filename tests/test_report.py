"""Reports are snapshotted: what people read in the morning must not drift unnoticed."""

from __future__ import annotations

from syrupy.assertion import SnapshotAssertion

from orchestrator.report import render_batch, render_markdown
from orchestrator.state import (
    Applied,
    Candidate,
    CandidateChecks,
    CheckResult,
    Plan,
    Review,
    RunState,
    Selection,
)
from orchestrator.store import BatchItem, BatchRecord, RunRecord


def state() -> RunState:
    return RunState(
        run_id="20261121-220000-abcdef",
        base_sha="0" * 40,
        plan=Plan(summary="Add median.", steps=["Read stats.py", "Add median"]),
        candidates=[
            Candidate(
                index=0,
                model="glm",
                family="zhipu",
                status="ok",
                patch="candidates/b0",
                files=["stats.py"],
                added=11,
                turns=4,
                prompt_tokens=2000,
                completion_tokens=200,
                summary="Added median.",
                models_used=["glm"],
            ),
            Candidate(
                index=1,
                model="m2",
                family="minimax",
                status="ok",
                patch="candidates/b1",
                files=["stats.py"],
                added=4,
                turns=2,
            ),
            Candidate(index=2, model="kimi", family="moonshot", status="empty", turns=2),
        ],
        checks=[
            CandidateChecks(
                candidate=0,
                results=[
                    CheckResult(command="pytest -q", exit_code=0, passed=True, duration_s=1.2)
                ],
            ),
            CandidateChecks(
                candidate=1,
                results=[
                    CheckResult(
                        command="pytest -q",
                        exit_code=1,
                        passed=False,
                        duration_s=1.0,
                        output_tail="FAILED test_median.py::test_even",
                    )
                ],
            ),
        ],
        reviews=[
            Review(
                candidate=0,
                reviewer="gpt",
                family="openai",
                score=8.5,
                verdict="approve",
                summary="Correct.",
                findings=["Add an example."],
                cost_usd=0.002,
            )
        ],
        notes=["review of #0 by sonnet not made: budget"],
        selection=Selection(
            winner=0,
            ranking=[0],
            explanation=[
                "#1 (m2): checks failed",
                "#2 (kimi): no diff (empty)",
                "rank 1: #0 (glm): checks pass, mean review 8.5, 11 changed lines",
            ],
        ),
        applied=Applied(branch="flow/add-median", commit="1" * 40),
    )


def test_run_report(snapshot: SnapshotAssertion) -> None:
    text = render_markdown(
        state(),
        title="Add median",
        spec_path="spec.md",
        branch="flow/add-median",
        base="0" * 40,
        cost=0.0036,
        outcome="applied",
        dirty_note=None,
        spend={"stage": {"review": 0.002, "plan": 0.001}},
        reasoning={0: ["Read first, then sort a copy."]},
    )
    assert "**winner**" in text and "<details>" in text
    assert text == snapshot


def test_batch_report(snapshot: SnapshotAssertion) -> None:
    batch = BatchRecord(
        batch_id="b-1",
        key="k",
        config_path=None,
        status="done",
        options={"budget_usd": 5.0},
        started=0.0,
        finished=60.0,
    )
    items = [
        BatchItem(
            batch_id="b-1",
            position=0,
            spec_path="a.md",
            spec_digest="d",
            run_id="r0",
            status="applied",
        ),
        BatchItem(
            batch_id="b-1",
            position=1,
            spec_path="b.md",
            spec_digest="d",
            status="skipped",
            reason="batch budget exhausted ($0.0100 left)",
        ),
    ]
    runs = {
        "r0": RunRecord(
            run_id="r0",
            spec_path="a.md",
            spec_digest="d",
            title="A",
            branch="flow/a",
            status="applied",
            applied_branch="flow/a",
            winner_model="glm",
            cost_usd=1.25,
            started=0.0,
            finished=95.0,
        )
    }
    text = render_batch(batch, items, runs, {"stage": {"build": 1.0, "review": 0.25}})
    assert "| `a.md` | applied | `flow/a` | glm | $1.2500 | 1m35s |" in text
    assert text == snapshot
