"""Typed progress events: lower layers emit them, the CLI renders them (rich or JSON lines)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class Event(BaseModel):
    kind: str
    run_id: str = ""


class RunStarted(Event):
    kind: Literal["run_started"] = "run_started"
    title: str
    repo: str
    base: str
    branch: str
    builders: list[str]
    reviewers: list[str]
    testers: list[str] = []
    budget_usd: float | None = None
    """The run's cap (None: none set)."""
    spent_usd: float = 0.0
    """Already spent by this run before now (a resumed run)."""


class StageStarted(Event):
    kind: Literal["stage"] = "stage"
    stage: str


class BuilderUpdate(Event):
    kind: Literal["builder"] = "builder"
    index: int
    model: str
    status: Literal["running", "ok", "empty", "failed", "not started"]
    turns: int = 0
    tokens: int = 0
    cost_usd: float = 0.0
    action: str = ""


class TesterUpdate(Event):
    kind: Literal["tester"] = "tester"
    index: int
    model: str
    status: Literal["running", "ok", "failed"]
    turns: int = 0
    tokens: int = 0
    cost_usd: float = 0.0
    action: str = ""


class CheckStarted(Event):
    """One check command starts in a checkout (`where`: check-N, or the base branch's tip)."""

    kind: Literal["check_started"] = "check_started"
    where: str
    candidate: int | None = None
    command: str
    position: int
    total: int


class CheckDone(Event):
    kind: Literal["check"] = "check"
    candidate: int
    passed: bool
    summary: str


class ReviewDone(Event):
    kind: Literal["review"] = "review"
    candidate: int
    reviewer: str
    score: float
    verdict: str
    error: str | None = None


class ReviewStarted(Event):
    kind: Literal["review_started"] = "review_started"
    candidate: int
    reviewer: str


class ModelCall(Event):
    kind: Literal["model_call"] = "model_call"
    stage: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    outcome: str


class Notice(Event):
    kind: Literal["notice"] = "notice"
    level: Literal["info", "warning", "error"] = "info"
    message: str


class Selected(Event):
    kind: Literal["selected"] = "selected"
    winner: int | None
    explanation: list[str]


class RunFinished(Event):
    kind: Literal["run_finished"] = "run_finished"
    outcome: Literal["applied", "needs-you", "nothing", "failed"]
    branch: str | None = None
    commit: str | None = None
    cost_usd: float = 0.0
    report: str = ""
    exit_code: int = 0


class BatchStarted(Event):
    kind: Literal["batch_started"] = "batch_started"
    batch_id: str
    specs: list[str]
    budget_usd: float
    resumed: bool = False


class SpecSkipped(Event):
    kind: Literal["spec_skipped"] = "spec_skipped"
    batch_id: str
    spec: str
    reason: str


class BatchFinished(Event):
    kind: Literal["batch_finished"] = "batch_finished"
    batch_id: str
    applied: int
    nothing: int
    needs_you: int = 0
    failed: int
    skipped: int
    cost_usd: float
    report: str
