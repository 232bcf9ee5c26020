"""report: write the run's markdown report and machine-readable summary."""

from __future__ import annotations

import json

from langgraph.runtime import Runtime

from orchestrator.context import Context
from orchestrator.forecast_view import compare, versus_markdown
from orchestrator.report import render_markdown
from orchestrator.report_html import render_run_html
from orchestrator.state import RunState


def outcome_of(state: RunState) -> str:
    """`applied`; `needs-you` when candidates with a diff exist but the evidence did not
    support applying one (`flow show`, `flow pick` settle it); else `nothing`."""
    if state.get("applied"):
        return "applied"
    if any(c.status == "ok" for c in state.get("candidates", [])):
        return "needs-you"
    return "nothing"


async def report(state: RunState, runtime: Runtime[Context]) -> dict[str, object]:
    ctx = runtime.context
    cost = ctx.spent()
    fallbacks = [
        f"fallback at {r.stage}: {r.model} {r.error}"
        for r in ctx.ledger.rows(ctx.run_id)
        if r.outcome == "fallback"
    ]
    if fallbacks:
        state = {**state, "notes": [*state.get("notes", []), *fallbacks]}
    spend = {d: ctx.ledger.by(d, ctx.run_id) for d in ("stage", "model", "provider")}
    cache = ctx.ledger.cache_shares(ctx.run_id)
    text = render_markdown(
        state,
        title=ctx.spec.title,
        spec_path=str(ctx.spec.path),
        branch=ctx.spec.branch,
        base=state["base_sha"],
        cost=cost,
        outcome=outcome_of(state),
        dirty_note=ctx.dirty_note,
        spend=spend,
        reasoning={c.index: _reasoning(ctx, c.index) for c in state.get("candidates", [])},
        cache=cache,
    )
    versus = compare(ctx.run_dir, ctx.ledger.rows(ctx.run_id))
    if versus is not None:
        text += "\n" + "\n".join(versus_markdown(versus))
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    (ctx.run_dir / "report.md").write_text(ctx.redact(text), encoding="utf-8")
    page = render_run_html(
        state,
        title=ctx.spec.title,
        spec_path=str(ctx.spec.path),
        branch=ctx.spec.branch,
        base=state["base_sha"],
        cost=cost,
        outcome=outcome_of(state),
        spend=spend,
        cache=cache,
        diffs=_diffs(ctx, state),
        versus=versus,
    )
    (ctx.run_dir / "report.html").write_text(ctx.redact(page), encoding="utf-8")
    applied, selection = state.get("applied"), state.get("selection")
    summary = {
        "run_id": ctx.run_id,
        "title": ctx.spec.title,
        "spec": str(ctx.spec.path),
        "outcome": outcome_of(state),
        "base": state["base_sha"],
        "branch": ctx.spec.branch,
        "cost_usd": round(cost, 6),
        "applied": applied.model_dump() if applied else None,
        "base_branch": state.get("base_branch"),
        "drift": drift.model_dump() if (drift := state.get("drift")) else None,
        "selection": selection.model_dump() if selection else None,
        "candidates": [c.model_dump() for c in state.get("candidates", [])],
        "checks": [c.model_dump() for c in state.get("checks", [])],
        "reviews": [r.model_dump() for r in state.get("reviews", [])],
        "notes": state.get("notes", []),
        "forecast_vs_spent": [{**v.model_dump(), "error": v.error} for v in versus or []],
        "plan": plan.model_dump() if (plan := state.get("plan")) else None,
        "heldout": [h.model_dump() for h in state.get("heldout", [])],
        "heldout_results": [h.model_dump() for h in state.get("heldout_results", [])],
        "spend": spend,
        "prompt_cache": {
            m: {"prompt_tokens": p, "cached_tokens": r, "cache_write_tokens": w}
            for m, (p, r, w) in cache.items()
        },
    }
    (ctx.run_dir / "run.json").write_text(
        ctx.redact(json.dumps(summary, indent=2)), encoding="utf-8"
    )
    return {}


def _reasoning(ctx: Context, index: int) -> list[str]:
    """The reasoning each builder turn returned, from its (already redacted) transcript."""
    path = ctx.run_dir / "transcripts" / f"build-{index}.jsonl"
    if not path.exists():
        return []
    texts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if message.get("role") == "assistant" and message.get("reasoning_content"):
            texts.append(str(message["reasoning_content"]))
    return texts


def _diffs(ctx: Context, state: RunState) -> dict[int, str]:
    """Each candidate's patch as text (undecodable bytes shown as replacement characters)."""
    out = {}
    for c in state.get("candidates", []):
        path = ctx.run_dir / c.patch if c.patch else None
        if path is not None and path.is_file():
            out[c.index] = path.read_bytes().decode("utf-8", errors="replace")
    return out
