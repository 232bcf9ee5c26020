"""Run state carried by the graph: small typed records; big artifacts live on disk."""

from __future__ import annotations

import operator
from typing import Annotated, Literal, TypedDict

from pydantic import BaseModel, Field


class Plan(BaseModel):
    summary: str
    steps: list[str] = Field(default_factory=list)
    files: list[str] = Field(default_factory=list)
    acceptance: list[str] = Field(default_factory=list)


class CheckResult(BaseModel):
    command: str
    exit_code: int | None
    passed: bool
    timed_out: bool = False
    duration_s: float = 0.0
    output_tail: str = ""


class Candidate(BaseModel):
    """One builder's attempt; the diff itself is a patch file in the run directory."""

    index: int
    model: str
    family: str
    status: Literal["ok", "empty", "failed", "not started"]
    error: str | None = None
    patch: str | None = None
    """Patch file name relative to the run directory."""
    files: list[str] = Field(default_factory=list)
    added: int = 0
    removed: int = 0
    turns: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    summary: str = ""
    models_used: list[str] = Field(default_factory=list)
    """Every model that answered this builder (more than one after a fallback)."""
    protected: list[str] = Field(default_factory=list)
    """Protected files the builder changed; their changes are not part of the candidate."""
    agent: str | None = None
    """The agent CLI that built it; None for flow's own loop."""
    metered: bool = True
    """False when the CLI ran on its user's own login: tokens and cost are its own report."""

    @property
    def diff_size(self) -> int:
        return self.added + self.removed


class CandidateChecks(BaseModel):
    candidate: int
    results: list[CheckResult] = Field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)


class HeldOutTest(BaseModel):
    """One acceptance test a tester wrote, and how it ran on the base commit."""

    tester: int
    name: str
    command: str
    on_base: Literal["fails", "passes", "cannot run"]
    """fails: it tests the new behaviour; cannot run: discarded (program missing, nothing
    collected, a usage error or a time-out)."""
    base_exit: int | None = None


class HeldOut(BaseModel):
    """A tester's work: its tests (files in the run directory, never in a builder's view)."""

    index: int
    model: str
    family: str
    files: str | None = None
    """JSON {path: content} of the files it wrote, relative to the run directory."""
    tests: list[HeldOutTest] = Field(default_factory=list)
    cost_usd: float = 0.0
    error: str | None = None

    @property
    def kept(self) -> list[HeldOutTest]:
        return [t for t in self.tests if t.on_base != "cannot run"]


class HeldOutResult(BaseModel):
    tester: int
    name: str
    passed: bool
    exit_code: int | None = None
    output_tail: str = ""


class CandidateHeldOut(BaseModel):
    candidate: int
    results: list[HeldOutResult] = Field(default_factory=list)


class Review(BaseModel):
    candidate: int
    reviewer: str
    family: str
    score: float = 0.0
    verdict: Literal["approve", "reject"] = "reject"
    summary: str = ""
    findings: list[str] = Field(default_factory=list)
    cost_usd: float = 0.0
    error: str | None = None


class Selection(BaseModel):
    winner: int | None
    ranking: list[int] = Field(default_factory=list)
    explanation: list[str] = Field(default_factory=list)
    why: str = ""
    """One sentence: what decided the winner (or why nothing was applied)."""


class Applied(BaseModel):
    branch: str
    commit: str
    parent: str | None = None
    """The commit it was made on: the base, or the base branch's tip (`apply: {onto: tip}`)."""


class Drift(BaseModel):
    """The base branch moved during the run: where the winner stands on its new tip."""

    branch: str
    base: str
    tip: str
    commits: int = 0
    """Commits on the tip that the base does not have."""
    applies: bool
    """Whether the winner's diff applies cleanly on the tip."""
    why: str = ""
    """git's reason when it does not apply."""
    onto_tip: bool = False
    """Whether the config asked to commit on the tip."""
    checks: list[CheckResult] = Field(default_factory=list)
    """The spec's checks on the tip with the winner applied (onto tip only)."""
    committed_on: Literal["base", "tip"] | None = "base"
    """Where the winner was committed (`onto: tip` that cannot commit on the tip: the base)."""
    note: str = ""
    """One sentence for the report, the events and the batch summary."""


class BuildTask(BaseModel):
    index: int
    model: str
    base_sha: str
    plan: Plan


class TestTask(BaseModel):
    index: int
    model: str
    base_sha: str
    plan: Plan


class HeldOutTask(BaseModel):
    candidate: Candidate
    base_sha: str
    heldout: list[HeldOut]


class CheckTask(BaseModel):
    candidate: Candidate
    base_sha: str


class ReviewTask(BaseModel):
    candidate: Candidate
    reviewer: str
    plan: Plan
    base_sha: str = ""
    """Where an agent CLI reviewer's checkout starts (the candidate's patch applied on it)."""
    checks: list[CheckResult] = Field(default_factory=list)
    heldout: list[HeldOutResult] = Field(default_factory=list)


class RunState(TypedDict, total=False):
    run_id: str
    base_sha: str
    builder_models: list[str]
    """Model name per builder slot."""
    tester_models: list[str]
    """Model name per tester (held-out acceptance tests); may be empty."""
    reviewers: dict[str, list[str]]
    """Builder model name -> the reviewers eligible to review its candidates."""
    families: dict[str, str]
    """Model name -> family, for every configured model."""
    plan: Plan | None
    candidates: Annotated[list[Candidate], operator.add]
    checks: Annotated[list[CandidateChecks], operator.add]
    reviews: Annotated[list[Review], operator.add]
    heldout: Annotated[list[HeldOut], operator.add]
    """The testers' held-out tests."""
    heldout_results: Annotated[list[CandidateHeldOut], operator.add]
    notes: Annotated[list[str], operator.add]
    """What was skipped and why (budget, failures), for the report."""
    selection: Selection | None
    base_branch: str | None
    """The branch the base came from (the spec's `base:` or HEAD's branch); None otherwise."""
    drift: Drift | None
    applied: Applied | None
