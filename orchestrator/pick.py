"""`flow show` and `flow pick`: a run's candidates, their evidence, and committing one by hand.

Both read what the run left on disk (`.flow/runs/RUN/run.json` and the candidates' patches)
and its record in the store; `pick` commits through the same create-only path as `apply`.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean
from typing import Any

from orchestrator.commits import candidate_ref, commit_message
from orchestrator.errors import FlowError
from orchestrator.fmt import score, usd
from orchestrator.state import Candidate, CandidateChecks, Review
from orchestrator.store import Store
from orchestrator.workspace import Repo


class RunView:
    """One finished run as `run.json` describes it."""

    def __init__(self, fdir: Path, run_id: str):
        self.run_id = run_id
        self.dir = fdir / "runs" / run_id
        path = self.dir / "run.json"
        if not path.is_file():
            raise FlowError(f"run {run_id} has no summary yet ({path}); it has not finished")
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        self.title: str = data["title"]
        self.base: str | None = data.get("base")
        self.branch: str | None = data.get("branch")
        self.outcome: str = data.get("outcome", "")
        self.applied: dict[str, Any] | None = data.get("applied")
        self.winner: int | None = (data.get("selection") or {}).get("winner")
        self.candidates = [Candidate.model_validate(c) for c in data.get("candidates", [])]
        self.checks = {
            c.candidate: c
            for c in (CandidateChecks.model_validate(x) for x in data.get("checks", []))
        }
        self.reviews = [Review.model_validate(r) for r in data.get("reviews", [])]

    def candidate(self, index: int) -> Candidate:
        for c in self.candidates:
            if c.index == index:
                return c
        known = ", ".join(str(c.index) for c in self.candidates) or "none"
        raise FlowError(f"run {self.run_id} has no candidate #{index}; its candidates: {known}")

    def checks_word(self, index: int) -> str:
        found = self.checks.get(index)
        if found is None or not found.results:
            return "no checks"
        return "pass" if found.passed else "FAIL"

    def review_word(self, index: int) -> str:
        done = [r for r in self.reviews if r.candidate == index and r.error is None]
        if not done:
            return "no review"
        rejects = sum(r.verdict == "reject" for r in done)
        return f"{score(mean(r.score for r in done))}" + (f", {rejects} reject" if rejects else "")


def overview(view: RunView) -> str:
    """Every candidate on one line, the winner marked."""
    lines = [f"run {view.run_id}: {view.title} — {view.outcome}"]
    if view.applied:
        lines.append(f"applied on {view.applied['branch']} ({str(view.applied['commit'])[:12]})")
    for c in view.candidates:
        mark = "  ← winner" if c.index == view.winner and view.applied else ""
        touched = f", changed protected files: {', '.join(c.protected)}" if c.protected else ""
        diff = f"+{c.added} −{c.removed}" if c.status == "ok" else c.status
        lines.append(
            f"  #{c.index} {c.model}: {diff}, checks {view.checks_word(c.index)}, "
            f"review {view.review_word(c.index)}, {usd(c.cost_usd)}{touched}{mark}"
        )
    lines.append(f"details: flow show {view.run_id} N; commit one: flow pick {view.run_id} N")
    return "\n".join(lines)


def detail(view: RunView, index: int) -> str:
    """One candidate's evidence, then its diff."""
    c = view.candidate(index)
    lines = [f"candidate #{c.index} of run {view.run_id}: {c.model} (family {c.family})"]
    lines.append(f"status: {c.status}" + (f" ({c.error})" if c.error else ""))
    if c.status == "ok":
        lines.append(f"kept as {candidate_ref(view.run_id, c.index)}")
    if c.protected:
        lines.append("changed protected files (dropped): " + ", ".join(c.protected))
    for res in view.checks.get(index, CandidateChecks(candidate=index)).results:
        state = (
            "pass" if res.passed else ("timeout" if res.timed_out else f"fail ({res.exit_code})")
        )
        lines.append(f"check `{res.command}`: {state}")
    for r in (r for r in view.reviews if r.candidate == index):
        if r.error:
            lines.append(f"review by {r.reviewer}: failed ({r.error})")
        else:
            lines.append(f"review by {r.reviewer}: {score(r.score)} {r.verdict} — {r.summary}")
    if c.summary:
        lines.append(f"builder's summary: {c.summary}")
    text = "\n".join(lines) + "\n"
    if c.patch:
        text += "\n" + (view.dir / c.patch).read_text(encoding="utf-8", errors="replace")
    return text


def pick(
    repo: Repo, store: Store, view: RunView, index: int, *, branch: str | None, force: bool
) -> tuple[str, str]:
    """Commit candidate `index` to a new branch; (branch, commit). Refuses one whose checks
    failed or whose builder did not finish unless `force`; never moves an existing branch."""
    c = view.candidate(index)
    if c.status != "ok" or not c.patch:
        raise FlowError(f"candidate #{index} of run {view.run_id} has no diff to commit")
    if view.applied and branch is None:
        raise FlowError(
            f"run {view.run_id} is already applied on {view.applied['branch']}; "
            "pass --branch NAME to commit another candidate beside it"
        )
    problems = []
    if view.checks_word(index) == "FAIL":
        problems.append("its checks failed")
    if c.error:
        problems.append(f"its builder did not finish ({c.error})")
    if problems and not force:
        raise FlowError(
            f"candidate #{index} of run {view.run_id}: {' and '.join(problems)}; "
            "pass --force to commit it anyway"
        )
    if view.base is None:
        raise FlowError(f"run {view.run_id} was recorded without its base commit; rerun it")
    target = branch or view.branch
    if not target:
        raise FlowError(f"run {view.run_id} names no branch; pass --branch NAME")
    patch = (view.dir / c.patch).read_bytes()
    record = store.run(view.run_id)
    cost = record.cost_usd if record else 0.0
    sha = repo.commit_patch(
        view.base, patch, target, commit_message(view.title, c, view.run_id, cost)
    )
    store.finish_run(
        view.run_id, status="applied", cost=cost, branch=target, commit=sha, winner=c.model
    )
    return target, sha
