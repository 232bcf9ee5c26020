"""Routers: pure functions of the state that fan work out with Send."""

from __future__ import annotations

from typing import Literal

from langgraph.types import Send

from orchestrator.state import BuildTask, ReviewTask, RunState


def route_builders(state: RunState) -> list[Send]:
    plan = state["plan"]
    assert plan is not None
    return [
        Send("build", BuildTask(index=i, model=m, base_sha=state["base_sha"], plan=plan))
        for i, m in enumerate(state["builder_models"])
    ]


def route_reviews(state: RunState) -> list[Send] | Literal["select"]:
    """Review only candidates still in the running: failed checks can never win."""
    plan = state["plan"]
    assert plan is not None
    results = {c.candidate: c for c in state.get("checks", [])}
    sends: list[Send] = []
    for cand in sorted(state.get("candidates", []), key=lambda c: c.index):
        checks = results.get(cand.index)
        if cand.status != "ok" or checks is None or not checks.passed:
            continue
        families = state.get("families", {})
        built_by = {families.get(m, m) for m in [cand.model, *cand.models_used]}
        for reviewer in state["reviewers"].get(cand.model, []):
            if families.get(reviewer, reviewer) in built_by:
                continue
            sends.append(
                Send(
                    "review",
                    ReviewTask(candidate=cand, reviewer=reviewer, plan=plan, checks=checks.results),
                )
            )
    return sends or "select"
