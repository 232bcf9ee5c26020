"""Routers: pure functions of the state that fan work out with Send."""

from __future__ import annotations

from typing import Literal

from langgraph.types import Send

from orchestrator.state import BuildTask, HeldOutTask, ReviewTask, RunState, TestTask


def route_builders(state: RunState) -> list[Send]:
    """Builders, and the testers beside them (their tests are held out from the builders)."""
    plan = state["plan"]
    assert plan is not None
    base = state["base_sha"]
    sends = [
        Send("build", BuildTask(index=i, model=m, base_sha=base, plan=plan))
        for i, m in enumerate(state["builder_models"])
    ]
    sends += [
        Send("test", TestTask(index=i, model=m, base_sha=base, plan=plan))
        for i, m in enumerate(state.get("tester_models", []))
    ]
    return sends


def _passing(state: RunState) -> list[int]:
    results = {c.candidate: c for c in state.get("checks", [])}
    return [
        c.index
        for c in sorted(state.get("candidates", []), key=lambda c: c.index)
        if c.status == "ok" and c.index in results and results[c.index].passed
    ]


def route_heldout(state: RunState) -> list[Send] | Literal["collect_heldout"]:
    """Candidates that pass their checks meet the held-out tests; without any, on to review."""
    heldout = [h for h in state.get("heldout", []) if h.kept]
    passing = set(_passing(state))
    if heldout and passing:
        return [
            Send("heldout", HeldOutTask(candidate=c, base_sha=state["base_sha"], heldout=heldout))
            for c in sorted(state.get("candidates", []), key=lambda c: c.index)
            if c.index in passing
        ]
    return "collect_heldout"


def route_reviews(state: RunState) -> list[Send] | Literal["select"]:
    """Review only candidates still in the running: failed checks can never win."""
    plan = state["plan"]
    assert plan is not None
    results = {c.candidate: c for c in state.get("checks", [])}
    heldout = {h.candidate: h.results for h in state.get("heldout_results", [])}
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
                    ReviewTask(
                        candidate=cand,
                        reviewer=reviewer,
                        plan=plan,
                        base_sha=state["base_sha"],
                        checks=checks.results,
                        heldout=heldout.get(cand.index, []),
                    ),
                )
            )
    return sends or "select"
