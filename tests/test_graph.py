"""The graph's shape and the prompts are snapshotted: they must not drift unnoticed."""

from __future__ import annotations

from syrupy.assertion import SnapshotAssertion

from orchestrator.agents import prompts
from orchestrator.graph import build_graph


def test_graph_shape(snapshot: SnapshotAssertion) -> None:
    assert build_graph().compile().get_graph().draw_mermaid() == snapshot


def test_prompts(snapshot: SnapshotAssertion) -> None:
    texts = {
        name: getattr(prompts, name)
        for name in ("PLANNER_SYSTEM", "BUILDER_SYSTEM", "REVIEWER_SYSTEM")
    }
    texts["SUBMIT_REVIEW"] = prompts.SUBMIT_REVIEW.model_dump()
    texts["SUBMIT_PLAN"] = prompts.SUBMIT_PLAN.model_dump()
    assert texts == snapshot
