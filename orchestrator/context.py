"""What every node receives through LangGraph's Runtime: injected, never global."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.attempts import Attempts
from orchestrator.config import LoadedConfig
from orchestrator.ledger import Ledger
from orchestrator.protocols import EventSink, ModelDoor
from orchestrator.redact import Redactor
from orchestrator.siblings import Siblings
from orchestrator.spec import Spec
from orchestrator.workspace import Repo

if TYPE_CHECKING:
    from orchestrator.executors import Executor


@dataclass
class Context:
    run_id: str
    repo: Repo
    spec: Spec
    config: LoadedConfig
    door: ModelDoor
    events: EventSink
    run_dir: Path
    worktrees: Path
    ledger: Ledger
    redact: Redactor = field(default_factory=Redactor)
    keep_worktrees: bool = False
    attempts: Attempts = field(default_factory=lambda: Attempts(None))
    """Adaptive N's gate: which builders start (orchestrator/attempts.py)."""
    onto_tip: bool = False
    """`--onto-tip`: commit on the base branch's tip when it moved, whatever the spec says."""
    siblings: Siblings = field(default_factory=Siblings)
    """Builders and reviewers still working; a refused key waits for them before it stops
    the run (orchestrator/siblings.py)."""
    dirty_note: str | None = None
    """Set when the user's working tree had uncommitted changes, which are not included."""
    resuming: bool = False
    """This process continues an interrupted run."""
    login_gates: dict[str, asyncio.Semaphore] = field(default_factory=dict)
    """Per agent CLI: how many runs on the user's own login may run at once."""
    executor: Executor | None = None
    """Where candidates are built and checked when not here (`flow batch --ray`)."""

    def login_gate(self, agent: str, size: int) -> asyncio.Semaphore:
        return self.login_gates.setdefault(agent, asyncio.Semaphore(size))

    def spent(self) -> float:
        """Money this run has spent so far, from the ledger."""
        return self.ledger.total(self.run_id)
