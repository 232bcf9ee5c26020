"""Rendering events: a rich live view for people, JSON lines for machines."""

from __future__ import annotations

import sys
import time
from typing import Self, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from orchestrator.events import (
    BatchFinished,
    BatchStarted,
    BuilderUpdate,
    CheckDone,
    CheckStarted,
    Event,
    ModelCall,
    Notice,
    ReviewDone,
    ReviewStarted,
    RunFinished,
    RunStarted,
    Selected,
    SpecSkipped,
    StageStarted,
    TesterUpdate,
)
from orchestrator.fmt import duration, score, tokens, usd
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
    """A rich Live region redrawn from `_render()`; lines printed above it stay.

    Without a terminal there is no region: event lines are printed unwrapped as they come,
    and the final view once at the end, as wide as it needs (a log is not 80 columns)."""

    refresh_per_second = 4

    def __init__(self, console: Console):
        self.console = console
        self.live: Live | None = None
        if console.is_terminal:
            self.live = Live(
                console=console,
                refresh_per_second=self.refresh_per_second,
                transient=False,
                get_renderable=self._render,
            )

    def __enter__(self) -> Self:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.refresh()
            self.live.__exit__(None, None, None)
            return
        width = self.console.width
        try:
            self.console.width = 100_000  # measured unconstrained, then printed as wide as it is
            final = self._render()
            wide = Measurement.get(self.console, self.console.options, final).maximum
            self.console.width = max(width, wide)
            lines = self.console.render_lines(final, self.console.options, pad=False)
        finally:
            self.console.width = width
        for line in lines:  # a table pads its cells; a log needs no trailing blanks
            text = Text()
            for seg in line:
                text.append(seg.text, seg.style)
            text.rstrip()
            self.console.print(text, soft_wrap=True)

    def say(self, line: str) -> None:
        """A line above the live region (or in the log), never hard-wrapped in a log."""
        self.console.print(line, soft_wrap=not self.console.is_terminal)

    def _render(self) -> Group:
        raise NotImplementedError


class _Check:
    """A check command running now, and since when."""

    def __init__(self, event: CheckStarted):
        self.event, self.since = event, time.monotonic()

    def __str__(self) -> str:
        e = self.event
        return (
            f"check {e.position}/{e.total}: {e.command} · {duration(time.monotonic() - self.since)}"
        )


class LiveView(_LiveTable):
    """Builders, testers and reviews as rows under a stage line, and a footer with the time
    and money so far; notable events are printed above it.

    The footer is short and last on purpose: a ^C the terminal echoes lands on it without
    wrapping, so the region's height stays what rich thinks it is (else the header repeats)."""

    refresh_per_second = 8

    def __init__(self, console: Console):
        self.stage = "starting"
        self.title = ""
        self.started = time.monotonic()
        self.budget: float | None = None
        self.spent = 0.0
        self.builders: dict[int, BuilderUpdate] = {}
        self.testers: dict[int, TesterUpdate] = {}
        self.reviews: dict[tuple[int, str], ReviewStarted | ReviewDone] = {}
        self.review_since: dict[tuple[int, str], float] = {}
        self.checks: dict[str, _Check] = {}
        super().__init__(console)

    def _render(self) -> Group:
        table = Table(box=None, pad_edge=False, expand=self.console.is_terminal, show_edge=False)
        table.add_column("#", no_wrap=True, width=3)
        table.add_column("model", no_wrap=True, overflow="ellipsis", max_width=16)
        table.add_column("status", no_wrap=True, width=9)
        table.add_column("turns", no_wrap=True, justify="right", width=5)
        table.add_column("tokens", no_wrap=True, justify="right", width=8)
        table.add_column("cost", no_wrap=True, justify="right", width=8)
        table.add_column("last action", no_wrap=True, overflow="ellipsis", ratio=1)
        for i in sorted(self.builders):
            b = self.builders[i]
            check = self.checks.get(f"check-{i}")
            self._agent_row(table, str(i), b, str(check) if check else b.action)
        for i in sorted(self.testers):
            self._agent_row(table, f"t{i}", self.testers[i], self.testers[i].action)
        for key in sorted(self.reviews):
            table.add_row(*self._review_row(key))
        stage = Text.assemble(("  stage: ", "dim"), (self.stage, "cyan"))
        tip = [c for where, c in self.checks.items() if not where.startswith("check-")]
        if tip:
            stage.append(f" · {tip[0]}", style="cyan")
        head = Text.assemble(("flow ", "bold"), (self.title, ""), stage)
        return Group(head, table, Text(self.footer(), style="dim"))

    def _agent_row(
        self, table: Table, label: str, b: BuilderUpdate | TesterUpdate, act: str
    ) -> None:
        status = Text(b.status, style=STATUS_STYLE.get(b.status, ""))
        table.add_row(label, b.model, status, str(b.turns), tokens(b.tokens), usd(b.cost_usd), act)

    def _review_row(self, key: tuple[int, str]) -> tuple[str | Text, ...]:
        event = self.reviews[key]
        if isinstance(event, ReviewStarted):
            since = duration(time.monotonic() - self.review_since[key])
            status, action = Text("review", style="yellow"), f"reviewing #{key[0]} · {since}"
        elif event.error:
            status, action = Text("failed", style="red"), f"#{key[0]}: {event.error}"
        else:
            good = event.verdict == "approve"
            status = Text(event.verdict, style="green" if good else "red")
            action = f"#{key[0]}: {score(event.score)}/10"
        return ("r", key[1], status, "", "", "", action)

    def footer(self) -> str:
        left = ""
        if self.budget is not None:
            left = f" of {usd(self.budget)} ({usd(max(0.0, self.budget - self.spent))} left)"
        return (
            f"elapsed {duration(time.monotonic() - self.started)} · spent {usd(self.spent)}{left}"
        )

    def emit(self, event: Event) -> None:
        line = describe(event)
        if isinstance(event, RunStarted):
            self.title, self.budget, self.spent = event.title, event.budget_usd, event.spent_usd
        elif isinstance(event, StageStarted):
            self.stage = event.stage
        elif isinstance(event, RunFinished):
            self.stage, self.spent = "done", event.cost_usd
            self.checks.clear()
        elif isinstance(event, BuilderUpdate):
            self.builders[event.index] = event
            if event.status == "running" and self.stage == "plan":
                self.stage = "build"
        elif isinstance(event, TesterUpdate):
            self.testers[event.index] = event
        elif isinstance(event, ModelCall):
            self.spent += event.cost_usd
        elif isinstance(event, CheckStarted):
            self.checks[event.where] = _Check(event)
        elif isinstance(event, CheckDone):
            self.checks.pop(f"check-{event.candidate}", None)
        elif isinstance(event, ReviewStarted | ReviewDone):
            key = (event.candidate, event.reviewer)
            self.reviews[key] = event
            self.review_since.setdefault(key, time.monotonic())
        if isinstance(event, StageStarted | RunFinished):  # the tip's re-check has no CheckDone
            self.checks = {w: c for w, c in self.checks.items() if w.startswith("check-")}
        if line:
            self.say(line)


def describe(event: Event) -> str | None:
    """A one-line, human description of the events worth a line of their own."""
    if isinstance(event, RunStarted):
        return (
            f"[bold]run {event.run_id}[/]: {event.title}\n  base {event.base[:12]} → "
            f"branch {event.branch}; builders: {', '.join(event.builders)}; "
            f"reviewers: {', '.join(event.reviewers) or 'none'}"
            + (f"; testers: {', '.join(event.testers)}" if event.testers else "")
            + (f"; budget {usd(event.budget_usd)}" if event.budget_usd is not None else "")
            + (f"; {usd(event.spent_usd)} spent before" if event.spent_usd else "")
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
        self.started = time.monotonic()
        self.budget: float | None = None
        self.resumed = False
        super().__init__(console)

    def _render(self) -> Group:
        table = Table(box=None, pad_edge=False, expand=self.console.is_terminal, show_edge=False)
        table.add_column("run", no_wrap=True, width=22)
        table.add_column("spec", no_wrap=True, overflow="ellipsis", ratio=1)
        table.add_column("stage", no_wrap=True, width=10)
        table.add_column("cost", no_wrap=True, justify="right", width=9)
        for run_id, (title, stage) in self.rows.items():
            table.add_row(run_id, title, stage, usd(self.cost.get(run_id, 0.0)))
        return Group(Text(self.header, style="bold"), table, Text(self.footer(), style="dim"))

    def footer(self) -> str:
        spent = sum(self.cost.values())
        took = f"elapsed {duration(time.monotonic() - self.started)} · spent {usd(spent)}"
        if self.resumed:  # what the interrupted process spent is in the report, not here
            return f"{took} since resuming"
        if self.budget is None:
            return took
        return f"{took} of {usd(self.budget)} ({usd(max(0.0, self.budget - spent))} left)"

    def emit(self, event: Event) -> None:
        line: str | None = None
        if isinstance(event, BatchStarted):
            verb = "resuming" if event.resumed else "starting"
            self.budget, self.resumed = event.budget_usd, event.resumed
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
            self.say(line)


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
    return time.strftime("%m-%d %H:%M", time.localtime(ts))
