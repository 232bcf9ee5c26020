"""build_graph(): wiring only."""

from __future__ import annotations

from typing import Any

from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime

from orchestrator.context import Context
from orchestrator.events import StageStarted
from orchestrator.nodes.apply import apply
from orchestrator.nodes.build import build
from orchestrator.nodes.drift import drift
from orchestrator.nodes.heldout import heldout, test
from orchestrator.nodes.plan import plan
from orchestrator.nodes.report import report
from orchestrator.nodes.review import review
from orchestrator.nodes.select import select
from orchestrator.routing import route_builders, route_heldout, route_reviews
from orchestrator.state import RunState


async def collect_builds(state: RunState, runtime: Runtime[Context]) -> dict[str, object]:
    """Every builder and tester is done; each candidate was checked as its builder finished."""
    if any(h.kept for h in state.get("heldout", [])):
        runtime.context.events.emit(StageStarted(run_id=runtime.context.run_id, stage="heldout"))
    return {}


async def collect_heldout(state: RunState, runtime: Runtime[Context]) -> dict[str, object]:
    runtime.context.events.emit(StageStarted(run_id=runtime.context.run_id, stage="review"))
    return {}


def build_graph() -> StateGraph[Any, Any, Any, Any]:
    g: StateGraph[Any, Any, Any, Any] = StateGraph(RunState, context_schema=Context)
    g.add_node("plan", plan)
    g.add_node("build", build)  # type: ignore[arg-type]  # input is a Send payload; checks too
    g.add_node("test", test)  # type: ignore[arg-type]  # input is a Send payload
    g.add_node("collect_builds", collect_builds)
    g.add_node("heldout", heldout)  # type: ignore[arg-type]  # input is a Send payload
    g.add_node("collect_heldout", collect_heldout)
    g.add_node("review", review)  # type: ignore[arg-type]  # input is a Send payload
    g.add_node("select", select)
    g.add_node("drift", drift)
    g.add_node("apply", apply)
    g.add_node("report", report)

    g.add_edge(START, "plan")
    g.add_conditional_edges("plan", route_builders, ["build", "test"])
    g.add_edge("build", "collect_builds")
    g.add_edge("test", "collect_builds")
    g.add_conditional_edges("collect_builds", route_heldout, ["heldout", "collect_heldout"])
    g.add_edge("heldout", "collect_heldout")
    g.add_conditional_edges("collect_heldout", route_reviews, ["review", "select"])
    g.add_edge("review", "select")
    g.add_edge("select", "drift")
    g.add_edge("drift", "apply")
    g.add_edge("apply", "report")
    g.add_edge("report", END)
    return g
