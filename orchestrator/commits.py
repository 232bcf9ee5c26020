"""What flow writes into the user's repository: its commit message and candidate refs. Light
on purpose: `flow show` and `flow pick` use it without loading the pipeline."""

from __future__ import annotations

from orchestrator.fmt import usd
from orchestrator.state import Candidate


def commit_message(title: str, winner: Candidate, run_id: str, cost: float) -> str:
    body = winner.summary.strip()
    parts = [title.strip()]
    if body:
        parts.append(body)
    parts.append(f"Flow-Run: {run_id}\nFlow-Model: {winner.model}\nFlow-Cost: {usd(cost)}")
    return "\n\n".join(parts) + "\n"


def candidate_ref(run_id: str, index: int) -> str:
    """Where a run's candidate N is kept in the user's repository (not a branch)."""
    return f"refs/flow/{run_id}/{index}"
