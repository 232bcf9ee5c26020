"""The forecast for people: a terminal table before the run, "Forecast vs spent" after it."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel

from orchestrator.fmt import count, md, pct, tokens, usd
from orchestrator.forecast import LEDGER_STAGE, STAGES, BatchForecast, Forecast, Row

if TYPE_CHECKING:
    from orchestrator.ledger import CallRow


def _basis(r: Row) -> str:
    if r.basis == "history":
        return f"history ({r.history_runs} run{'s' if r.history_runs != 1 else ''})"
    return r.basis


def _table(head: list[str], body: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        parts = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return [line(head), *(line(r) for r in body)]


def render(forecast: Forecast) -> str:
    """The forecast as a terminal table and its verdict."""
    head = ["stage", "model", "calls", "prompt tok", "output tok", "expected", "basis", "worst"]
    body = [
        [
            r.stage,
            r.model + (f" ×{r.instances}" if r.instances > 1 else ""),
            count(r.calls),
            tokens(r.prompt_tokens),
            tokens(r.output_tokens),
            usd(r.expected_usd),
            _basis(r),
            usd(r.worst_usd),
        ]
        for r in forecast.rows
    ]
    body.append(["total", "", "", "", "", usd(forecast.expected_usd), "", usd(forecast.worst_usd)])
    lines = [f"forecast: {forecast.spec}: {forecast.title!r} (no model was called)", ""]
    lines += _table(head, body, {2, 3, 4, 5, 7})
    lines.append("")
    lines += [f"note: {r.stage} {r.model}: {n}" for r in forecast.rows for n in r.notes]
    lines += [f"note: {n}" for n in forecast.notes]
    lines.append(forecast.verdict)
    return "\n".join(lines) + "\n"


def render_batch(batch: BatchForecast) -> str:
    parts = [render(f) for f in batch.runs]
    lines = [f"refused: {r.spec}: {r.reason}" for r in batch.refused]
    lines.append(
        f"batch: {len(batch.runs)} specs, expected {usd(batch.expected_usd)}, worst case "
        f"{usd(batch.worst_usd)}; {batch.verdict}"
    )
    return "\n".join([*parts, *lines]) + "\n"


# --- after the run -------------------------------------------------------------------------


class Versus(BaseModel):
    """One stage and model: forecast against what the ledger says was spent."""

    stage: str
    model: str
    forecast_calls: float
    calls: int
    forecast_tokens: int
    tokens: int
    forecast_usd: float
    spent_usd: float
    basis: str

    @property
    def error(self) -> float | None:
        """(spent − forecast) ÷ forecast; None when nothing was forecast."""
        if self.forecast_usd <= 0:
            return None
        return (self.spent_usd - self.forecast_usd) / self.forecast_usd


def compare(run_dir: Path, calls: list[CallRow]) -> list[Versus] | None:
    """The run's forecast.json against its ledger rows; None when it has no forecast."""
    try:
        forecast = Forecast.model_validate_json(
            (run_dir / "forecast.json").read_text(encoding="utf-8")
        )
    except (OSError, ValueError):
        return None
    names = {v: k for k, v in LEDGER_STAGE.items()}
    spent: dict[tuple[str, str], list[CallRow]] = defaultdict(list)
    for c in calls:
        spent[(names.get(c.stage, c.stage), c.model)].append(c)
    out = []
    for r in forecast.rows:
        got = spent.pop((r.stage, r.model), [])
        out.append(_versus(r.stage, r.model, r, got))
    out += [_versus(stage, model, None, got) for (stage, model), got in spent.items()]
    order: dict[str, int] = {s: i for i, s in enumerate(STAGES)}
    return sorted(out, key=lambda v: order.get(v.stage, len(order)))


def _versus(stage: str, model: str, row: Row | None, got: list[CallRow]) -> Versus:
    return Versus(
        stage=stage,
        model=model,
        forecast_calls=row.calls if row else 0.0,
        calls=sum(1 for c in got if c.outcome not in ("replayed", "fallback")),
        forecast_tokens=(row.prompt_tokens + row.output_tokens) if row else 0,
        tokens=sum(c.prompt_tokens + c.completion_tokens for c in got),
        forecast_usd=row.expected_usd if row else 0.0,
        spent_usd=sum(c.cost_usd for c in got),
        basis=_basis(row) if row else "not forecast",
    )


def versus_markdown(rows: list[Versus]) -> list[str]:
    """The report's "Forecast vs spent" section."""

    lines = [
        "## Forecast vs spent",
        "",
        "| stage | model | calls (forecast) | tokens (forecast) | forecast | spent | error "
        "| basis |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in rows:
        lines.append(
            f"| {v.stage} | {md(v.model)} | {v.calls} ({count(v.forecast_calls)}) | "
            f"{tokens(v.tokens)} ({tokens(v.forecast_tokens)}) | {usd(v.forecast_usd)} | "
            f"{usd(v.spent_usd)} | {pct(v.error)} | {v.basis} |"
        )
    forecast = sum(v.forecast_usd for v in rows)
    spent = sum(v.spent_usd for v in rows)
    total = (spent - forecast) / forecast if forecast > 0 else None
    lines.append(f"| total | | | | {usd(forecast)} | {usd(spent)} | {pct(total)} | |")
    return [*lines, ""]
