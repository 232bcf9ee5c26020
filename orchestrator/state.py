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

    @property
    def diff_size(self) -> int:
        return self.added + self.removed


class CandidateChecks(BaseModel):
    candidate: int
    results: list[CheckResult] = Field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)


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


class Applied(BaseModel):
    branch: str
    commit: str


class BuildTask(BaseModel):
    index: int
    model: str
    base_sha: str
    plan: Plan


class CheckTask(BaseModel):
    candidate: Candidate
    base_sha: str


class ReviewTask(BaseModel):
    candidate: Candidate
    reviewer: str
    plan: Plan
    checks: list[CheckResult] = Field(default_factory=list)


class RunState(TypedDict, total=False):
    run_id: str
    base_sha: str
    builder_models: list[str]
    """Model name per builder slot."""
    reviewers: dict[str, list[str]]
    """Builder model name -> the reviewers eligible to review its candidates."""
    families: dict[str, str]
    """Model name -> family, for every configured model."""
    plan: Plan | None
    candidates: Annotated[list[Candidate], operator.add]
    checks: Annotated[list[CandidateChecks], operator.add]
    reviews: Annotated[list[Review], operator.add]
    notes: Annotated[list[str], operator.add]
    """What was skipped and why (budget, failures), for the report."""
    selection: Selection | None
    applied: Applied | None
