"""Rendering events: a rich live view for people, JSON lines for machines."""

from __future__ import annotations

import sys
from typing import Self, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from orchestrator.events import (
    BatchFinished,
    BatchStarted,
    BuilderUpdate,
    CheckDone,
    Event,
    ModelCall,
    Notice,
    ReviewDone,
    RunFinished,
    RunStarted,
    Selected,
    SpecSkipped,
    StageStarted,
)
from orchestrator.fmt import score, tokens, usd
from orchestrator.store import BatchRecord, RunRecord

STATUS_STYLE = {"running": "yellow", "ok": "green", "empty": "dim", "failed": "red"}


class JsonSink:
    """One JSON object per line on stdout, flushed, for scripts and CI."""

    def __init__(self, out: TextIO | None = None):
        self.out = out or sys.stdout

    def emit(self, event: Event) -> None:
        self.out.write(event.model_dump_json() + "\n")
        self.out.flush()


class _LiveTable:
    """A rich Live region redrawn from `_render()`; lines printed above it stay."""

    refresh_per_second = 4

    def __init__(self, console: Console):
        self.console = console
        self.live = Live(
            self._render(),
            console=console,
            refresh_per_second=self.refresh_per_second,
            transient=False,
        )

    def __enter__(self) -> Self:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.update(self._render())
        self.live.__exit__(None, None, None)
        if not self.console.is_terminal:
            self.console.line()

    def _render(self) -> Group:
        raise NotImplementedError


class LiveView(_LiveTable):
    """A live table of builders under a stage line; notable events are printed above it."""

    refresh_per_second = 8

    def __init__(self, console: Console):
        self.stage = "starting"
        self.title = ""
        self.builders: dict[int, BuilderUpdate] = {}
        super().__init__(console)

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
                tokens(b.tokens),
                usd(b.cost_usd),
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
            f"{score(event.score)}/10 {event.verdict}"
        )
    if isinstance(event, Selected):
        return "  selection:\n" + "\n".join(f"    {e}" for e in event.explanation)
    if isinstance(event, Notice):
        style = {"info": "", "warning": "yellow", "error": "red"}[event.level]
        return f"  [{style}]{event.level}[/]: {event.message}" if style else f"  {event.message}"
    if isinstance(event, SpecSkipped):
        return f"  [yellow]skipped[/] {event.spec}: {event.reason}"
    if isinstance(event, BatchFinished):
        return (
            f"[bold]batch {event.batch_id}[/]: {event.applied} applied, {event.needs_you} "
            f"need you, {event.nothing} nothing acceptable, {event.failed} failed, "
            f"{event.skipped} skipped; "
            f"cost {usd(event.cost_usd)}\nreport: {event.report}"
        )
    if isinstance(event, RunFinished):
        if event.outcome == "applied":
            return (
                f"[green bold]applied[/] on branch [bold]{event.branch}[/] "
                f"({(event.commit or '')[:12]}), cost {usd(event.cost_usd)}\n"
                f"report: {event.report}"
            )
        if event.outcome == "needs-you":
            return (
                f"[yellow bold]needs you[/]: the evidence does not support applying a "
                f"candidate, cost {usd(event.cost_usd)}\nreport: {event.report}\n"
                f"see the candidates: flow show {event.run_id}; commit one: "
                f"flow pick {event.run_id} N"
            )
        return (
            f"[red bold]nothing applied[/]: no acceptable candidate, cost "
            f"{usd(event.cost_usd)}\nreport: {event.report}"
        )
    return None


class BatchView(_LiveTable):
    """A live table of a batch's specs: one row per run, with its stage and cost."""

    def __init__(self, console: Console):
        self.rows: dict[str, list[str]] = {}
        self.cost: dict[str, float] = {}
        self.header = "flow batch"
        super().__init__(console)

    def _render(self) -> Group:
        table = Table(box=None, pad_edge=False, expand=True, show_edge=False)
        table.add_column("run", no_wrap=True, width=22)
        table.add_column("spec", no_wrap=True, overflow="ellipsis", ratio=1)
        table.add_column("stage", no_wrap=True, width=10)
        table.add_column("cost", no_wrap=True, justify="right", width=9)
        for run_id, (title, stage) in self.rows.items():
            table.add_row(run_id, title, stage, usd(self.cost.get(run_id, 0.0)))
        return Group(Text(self.header, style="bold"), table)

    def emit(self, event: Event) -> None:
        line: str | None = None
        if isinstance(event, BatchStarted):
            verb = "resuming" if event.resumed else "starting"
            self.header = (
                f"flow batch {event.batch_id}: {verb}, {len(event.specs)} specs, "
                f"budget {usd(event.budget_usd)}"
            )
        elif isinstance(event, RunStarted):
            self.rows[event.run_id] = [event.title, "plan"]
        elif isinstance(event, StageStarted) and event.run_id in self.rows:
            self.rows[event.run_id][1] = event.stage
        elif isinstance(event, BuilderUpdate) and event.run_id in self.rows:
            if self.rows[event.run_id][1] == "plan":
                self.rows[event.run_id][1] = "build"
        elif isinstance(event, ModelCall):
            self.cost[event.run_id] = self.cost.get(event.run_id, 0.0) + event.cost_usd
        elif isinstance(event, RunFinished):
            if event.run_id in self.rows:
                self.rows[event.run_id][1] = event.outcome
            line = describe(event)
        elif isinstance(event, SpecSkipped | BatchFinished | Notice):
            line = describe(event)
        if line:
            self.console.print(line)
        self.live.update(self._render())


def status_tables(
    runs: list[RunRecord], batches: list[BatchRecord], specs_per_batch: dict[str, int]
) -> list[Table]:
    """`flow status`: recent batches, then recent runs."""
    tables = []
    if batches:
        bt = Table(title="batches", title_justify="left", box=None, expand=True)
        bt.add_column("batch", no_wrap=True, width=24)
        bt.add_column("status", no_wrap=True, width=11)
        bt.add_column("specs", no_wrap=True, justify="right", width=5)
        bt.add_column("budget", no_wrap=True, justify="right", width=10)
        bt.add_column("started", no_wrap=True, width=11)
        for b in batches:
            bt.add_row(
                b.batch_id,
                b.live_status,
                str(specs_per_batch.get(b.batch_id, 0)),
                usd(b.options.get("budget_usd", 0)),
                _when(b.started),
            )
        tables.append(bt)
    rt = Table(title="runs", title_justify="left", box=None, expand=True)
    rt.add_column("run", no_wrap=True, width=22)
    rt.add_column("status", no_wrap=True, width=11)
    rt.add_column("spec", no_wrap=True, overflow="ellipsis", ratio=1)
    rt.add_column("cost", no_wrap=True, justify="right", width=8)
    rt.add_column("started", no_wrap=True, width=11)
    for r in runs:
        style = STATUS_STYLE.get(
            {
                "applied": "ok",
                "needs-you": "empty",
                "nothing": "empty",
                "interrupted": "failed",
                "failed": "failed",
            }.get(r.live_status, "running"),
            "",
        )
        title = f"{r.title} → {r.applied_branch}" if r.applied_branch else r.title
        rt.add_row(
            r.run_id,
            Text(r.live_status, style=style),
            title,
            usd(r.cost_usd),
            _when(r.started),
        )
    tables.append(rt)
    return tables


def _when(ts: float) -> str:
    import time

    return time.strftime("%m-%d %H:%M", time.localtime(ts))
