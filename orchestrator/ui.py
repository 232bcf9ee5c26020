"""Rendering events: a rich live view for people, JSON lines for machines."""

from __future__ import annotations

import sys
from typing import TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from orchestrator.events import (
    BuilderUpdate,
    CheckDone,
    Event,
    Notice,
    ReviewDone,
    RunFinished,
    RunStarted,
    Selected,
    StageStarted,
)

STATUS_STYLE = {"running": "yellow", "ok": "green", "empty": "dim", "failed": "red"}


class JsonSink:
    """One JSON object per line on stdout, flushed, for scripts and CI."""

    def __init__(self, out: TextIO | None = None):
        self.out = out or sys.stdout

    def emit(self, event: Event) -> None:
        self.out.write(event.model_dump_json() + "\n")
        self.out.flush()


class LiveView:
    """A live table of builders under a stage line; notable events are printed above it."""

    def __init__(self, console: Console):
        self.console = console
        self.stage = "starting"
        self.title = ""
        self.builders: dict[int, BuilderUpdate] = {}
        self.live = Live(self._render(), console=console, refresh_per_second=8, transient=False)

    def __enter__(self) -> LiveView:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.update(self._render())
        self.live.__exit__(None, None, None)
        if not self.console.is_terminal:
            self.console.line()

    def _render(self) -> Group:
        table = Table(box=None, pad_edge=False, expand=True, show_edge=False)
        table.add_column("#", no_wrap=True, width=2)
        table.add_column("model", no_wrap=True, overflow="ellipsis", max_width=16)
        table.add_column("status", no_wrap=True, width=7)
        table.add_column("turns", no_wrap=True, justify="right", width=5)
        table.add_column("tokens", no_wrap=True, justify="right", width=8)
        table.add_column("cost", no_wrap=True, justify="right", width=8)
        table.add_column("last action", no_wrap=True, overflow="ellipsis", ratio=1)
        for i in sorted(self.builders):
            b = self.builders[i]
            table.add_row(
                str(i),
                b.model,
                Text(b.status, style=STATUS_STYLE.get(b.status, "")),
                str(b.turns),
                f"{b.tokens:,}",
                f"${b.cost_usd:.4f}",
                b.action,
            )
        head = Text.assemble(
            ("flow ", "bold"), (self.title, ""), ("  stage: ", "dim"), (self.stage, "cyan")
        )
        return Group(head, table)

    def emit(self, event: Event) -> None:
        line = describe(event)
        if isinstance(event, RunStarted):
            self.title = event.title
        elif isinstance(event, StageStarted):
            self.stage = event.stage
        elif isinstance(event, RunFinished):
            self.stage = "done"
        elif isinstance(event, BuilderUpdate):
            self.builders[event.index] = event
            if event.status == "running" and self.stage == "plan":
                self.stage = "build"
        if line:
            self.console.print(line)
        self.live.update(self._render())


def describe(event: Event) -> str | None:
    """A one-line, human description of the events worth a line of their own."""
    if isinstance(event, RunStarted):
        return (
            f"[bold]run {event.run_id}[/]: {event.title}\n  base {event.base[:12]} → "
            f"branch {event.branch}; builders: {', '.join(event.builders)}; "
            f"reviewers: {', '.join(event.reviewers) or 'none'}"
        )
    if isinstance(event, BuilderUpdate) and event.status != "running":
        return f"  builder #{event.index} ({event.model}): {event.status} — {event.action}"
    if isinstance(event, CheckDone):
        verdict = "[green]pass[/]" if event.passed else "[red]fail[/]"
        return f"  checks of #{event.candidate}: {verdict} ({event.summary})"
    if isinstance(event, ReviewDone):
        if event.error:
            return f"  review of #{event.candidate} by {event.reviewer}: failed ({event.error})"
        return (
            f"  review of #{event.candidate} by {event.reviewer}: "
            f"{event.score:.1f}/10 {event.verdict}"
        )
    if isinstance(event, Selected):
        return "  selection:\n" + "\n".join(f"    {e}" for e in event.explanation)
    if isinstance(event, Notice):
        style = {"info": "", "warning": "yellow", "error": "red"}[event.level]
        return f"  [{style}]{event.level}[/]: {event.message}" if style else f"  {event.message}"
    if isinstance(event, RunFinished):
        if event.outcome == "applied":
            return (
                f"[green bold]applied[/] on branch [bold]{event.branch}[/] "
                f"({(event.commit or '')[:12]}), cost ${event.cost_usd:.4f}\n"
                f"report: {event.report}"
            )
        return (
            f"[red bold]nothing applied[/]: no acceptable candidate, cost "
            f"${event.cost_usd:.4f}\nreport: {event.report}"
        )
    return None
