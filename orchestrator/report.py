"""The run report: markdown for people, JSON for machines."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from statistics import mean

from orchestrator.fmt import duration, md, score, tokens, usd
from orchestrator.ledger import CacheShare, Ledger
from orchestrator.report_html import render_batch_html
from orchestrator.state import (
    Candidate,
    CandidateChecks,
    CheckResult,
    Plan,
    Review,
    RunState,
    Selection,
)
from orchestrator.store import BatchItem, BatchRecord, RunRecord, Store

REASONING_CHARS = 4000


def _n(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def _reasoning_block(texts: list[str]) -> list[str]:
    """The builder's reasoning, collapsed: it explains choices but is long."""
    body = "\n\n".join(f"turn {i}: {md(t.strip())}" for i, t in enumerate(texts, 1) if t.strip())
    if not body:
        return []
    if len(body) > REASONING_CHARS:
        body = (
            body[:REASONING_CHARS]
            + f"\n[… {len(body) - REASONING_CHARS} chars more in the transcript]"
        )
    return [
        "",
        f"<details><summary>builder's reasoning ({_n(len(texts), 'turn')})</summary>",
        "",
        *body.splitlines(),
        "",
        "</details>",
        "",
    ]


def _check_lines(results: list[CheckResult]) -> list[str]:
    """One line per check; a failed check's output tail folded under it."""
    lines: list[str] = []
    for res in results:
        state = "pass" if res.passed else ("timeout" if res.timed_out else "fail")
        if not res.passed and not res.timed_out:
            state += f" (exit {res.exit_code})"
        lines.append(f"- check `{res.command}`: {state}, {duration(res.duration_s)}")
        if not res.passed and res.output_tail.strip():
            tail = "\n".join(res.output_tail.strip().splitlines()[-30:])
            lines += [
                "",
                "  <details><summary>check output (tail)</summary>",
                "",
                "  ```",
                *[f"  {ln}" for ln in tail.splitlines()],
                "  ```",
                "  </details>",
                "",
            ]
    return lines


def _candidate_section(
    c: Candidate,
    checks: CandidateChecks | None,
    reviews: list[Review],
    winner: int | None,
    reasoning: list[str] | None = None,
) -> list[str]:
    mark = " — **winner**" if c.index == winner else ""
    lines = [f"### Candidate #{c.index}: `{c.model}` (family {c.family}){mark}", ""]
    lines.append(f"- status: {c.status}" + (f" ({md(c.error)})" if c.error else ""))
    # The link's text is its path: a terminal shows link text only.
    lines.append(
        f"- diff: {_n(len(c.files), 'file')}, +{c.added} −{c.removed}"
        + (f" (patch: [{md(c.patch)}]({c.patch}))" if c.patch else "")
    )
    lines.append(
        f"- builder: {_n(c.turns, 'turn')}, {tokens(c.prompt_tokens + c.completion_tokens)} "
        f"tokens, {usd(c.cost_usd)}"
    )
    if c.summary:
        lines.append(f"- builder's summary: {md(c.summary.strip())}")
    if c.protected:
        paths = ", ".join(md(p) for p in c.protected)
        lines.append(f"- **changed protected files** (not checked, not committed): {paths}")
    if checks is not None:
        lines += _check_lines(checks.results)
    if c.status == "ok" and not reviews and checks is not None and not checks.passed:
        lines.append("- not reviewed: its checks failed, so it could not be applied")
    for r in reviews:
        if r.error:
            lines.append(f"- review by `{r.reviewer}`: failed ({md(r.error)})")
            continue
        lines.append(
            f"- review by `{r.reviewer}` ({r.family}): {score(r.score)}/10, {r.verdict}"
            f" — {md(r.summary.strip())}"
        )
        lines += [f"  - {md(f)}" for f in r.findings]
    done = [r.score for r in reviews if r.error is None]
    if done:
        lines.append(f"- mean review score: {score(mean(done))}")
    lines += _reasoning_block(reasoning or [])
    return [*lines, ""]


def _matrix(state: RunState) -> list[str]:
    """Candidate × evidence: each spec check, each held-out test, each review."""
    cands = sorted(
        (c for c in state.get("candidates", []) if c.status == "ok"), key=lambda c: c.index
    )
    if not cands:
        return []
    checks = {c.candidate: c.results for c in state.get("checks", [])}
    held = {
        h.candidate: {(r.tester, r.name): r.passed for r in h.results}
        for h in state.get("heldout_results", [])
    }
    tests = [(t.tester, t.name) for h in state.get("heldout", []) for t in h.kept]
    reviewers = sorted({r.reviewer for r in state.get("reviews", [])})
    n_checks = max((len(v) for v in checks.values()), default=0)
    head = ["candidate"] + [f"check {i + 1}" for i in range(n_checks)]
    head += [f"held-out {i + 1}" for i in range(len(tests))] + reviewers
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cands:
        cells = [f"#{c.index} {md(c.model)}"]
        results = checks.get(c.index, [])
        cells += [
            ("pass" if results[i].passed else "FAIL") if i < len(results) else "–"
            for i in range(n_checks)
        ]
        mine = held.get(c.index, {})
        cells += [("pass" if mine[t] else "FAIL") if t in mine else "–" for t in tests]
        for name in reviewers:
            got = [
                r for r in state.get("reviews", []) if r.candidate == c.index and r.reviewer == name
            ]
            if not got:
                cells.append("–")
            elif got[0].error:
                cells.append("failed")
            else:
                cells.append(f"{score(got[0].score)} {got[0].verdict}")
        rows.append("| " + " | ".join(cells) + " |")
    legend = []
    for i, command in enumerate(state.get("checks", [])[0].results if state.get("checks") else []):
        legend.append(f"check {i + 1}: `{md(command.command)}`")
    for i, (tester, name) in enumerate(tests):
        legend.append(f"held-out {i + 1}: {md(name)} (tester #{tester})")
    return rows + [""] + ([", ".join(legend), ""] if legend else [])


def _cache_lines(cache: Mapping[str, CacheShare]) -> list[str]:
    """The share of each model's prompt tokens its provider read from its prompt cache."""
    items = [
        f"{md(model)} {share.read / share.prompt:.0%} read of {share.prompt:,} prompt tokens"
        + (f" ({share.written:,} written)" if share.written else "")
        for model, share in sorted(cache.items())
        if share.prompt
    ]
    return [f"- prompt cache by model: {', '.join(items)}"] if items else []


def render_markdown(
    state: RunState,
    *,
    title: str,
    spec_path: str,
    branch: str,
    base: str,
    cost: float,
    outcome: str,
    dirty_note: str | None = None,
    spend: dict[str, dict[str, float]] | None = None,
    reasoning: dict[int, list[str]] | None = None,
    cache: Mapping[str, CacheShare] | None = None,
) -> str:
    plan: Plan | None = state.get("plan")
    selection: Selection | None = state.get("selection")
    applied = state.get("applied")
    checks = {c.candidate: c for c in state.get("checks", [])}
    reviews = state.get("reviews", [])
    winner = selection.winner if selection else None
    lines = [f"# flow run {state.get('run_id', '')}: {md(title)}", ""]
    lines.append(f"- spec: `{spec_path}`")
    lines.append(f"- base: `{base}`")
    drift = state.get("drift")
    if applied:
        on_tip = (
            f" (on the tip of `{drift.branch}`, `{drift.tip[:12]}`)"
            if drift is not None and drift.committed_on == "tip"
            else ""
        )
        lines.append(
            f"- **outcome: applied** on branch `{applied.branch}` as `{applied.commit[:12]}`"
            + on_tip
        )
    else:
        lines.append(f"- **outcome: {outcome}** — nothing was applied (intended branch `{branch}`)")
    run_id = state.get("run_id", "")
    if outcome == "needs-you":
        lines.append(
            f"- settle it: `flow show {run_id} N` shows candidate N's diff and evidence, "
            f"`flow pick {run_id} N` commits it to `{branch}`"
        )
    if any(c.status == "ok" for c in state.get("candidates", [])):
        lines.append(f"- every candidate with a diff is kept as `refs/flow/{run_id}/N`")
    lines.append(f"- cost: {usd(cost)}")
    if dirty_note:
        lines.append(f"- note: {dirty_note}")
    if drift is not None:
        lines.append(f"- base drift: {md(drift.note)}")
    lines.append("")
    if drift is not None and drift.checks:
        lines += [f"## Checks on the tip of `{drift.branch}` (`{drift.tip[:12]}`)", ""]
        lines += [*_check_lines(drift.checks), ""]
    if plan:
        lines += ["## Plan", "", md(plan.summary.strip()), ""]
        lines += [f"{i}. {md(s)}" for i, s in enumerate(plan.steps, 1)] + [""]
    lines += ["## Selection", ""]
    if selection and selection.why:
        lines += [f"**Why:** {md(selection.why)}", ""]
    lines += _matrix(state)
    lines += [f"- {md(e)}" for e in (selection.explanation if selection else ["(not reached)"])]
    lines += ["", "## Candidates", ""]
    for c in sorted(state.get("candidates", []), key=lambda c: c.index):
        lines += _candidate_section(
            c,
            checks.get(c.index),
            [r for r in reviews if r.candidate == c.index],
            winner,
            (reasoning or {}).get(c.index),
        )
    if spend:
        lines += ["## Spend", ""]
        for dimension, table in spend.items():
            items = ", ".join(f"{md(k)} {usd(v)}" for k, v in sorted(table.items()))
            lines.append(f"- by {dimension}: {items or '(none)'}")
        lines += [*_cache_lines(cache or {}), ""]
    notes = state.get("notes", [])
    if notes:
        lines += ["## Skipped and why", ""] + [f"- {md(n)}" for n in notes] + [""]
    return "\n".join(lines).rstrip() + "\n"


def render_batch(
    batch: BatchRecord,
    items: list[BatchItem],
    runs: dict[str, RunRecord],
    spend: dict[str, dict[str, float]],
    drift: dict[str, str] | None = None,
) -> str:
    """The morning summary of a batch; `drift`: run id → what its base branch's move meant."""
    total = sum(r.cost_usd for r in runs.values())
    budget = batch.options.get("budget_usd")
    lines = [f"# flow batch {batch.batch_id}", ""]
    lines.append(f"- status: {batch.live_status}; {len(items)} specs")
    lines.append(f"- spent: {usd(total)}" + (f" of {usd(budget)}" if budget is not None else ""))
    counts: dict[str, int] = {}
    for item in items:
        counts[item.status] = counts.get(item.status, 0) + 1
    lines.append("- outcomes: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    lines += [
        "",
        "| spec | outcome | branch | winning model | cost | time |",
        "|---|---|---|---|---|---|",
    ]
    for item in items:
        run = runs.get(item.run_id or "")
        status = run.live_status if run and item.status == "running" else item.status
        branch = f"`{run.applied_branch}`" if run and run.applied_branch else "-"
        took = (run.finished - run.started) if run and run.finished else None
        lines.append(
            f"| `{item.spec_path}` | {status} | {branch} | "
            f"{(run.winner_model if run else None) or '-'} | "
            f"{usd(run.cost_usd if run else 0.0)} | {duration(took)} |"
        )
    lines += ["", "## Spend", ""]
    for dimension, table in spend.items():
        parts = ", ".join(
            f"{md(k)} {usd(v)}" for k, v in sorted(table.items(), key=lambda kv: -kv[1])
        )
        lines.append(f"- by {dimension}: {parts or '(none)'}")
    moved = [(i, (drift or {}).get(i.run_id or "")) for i in items]
    if any(note for _, note in moved):
        lines += ["", "## Base moved during the run", ""]
        lines += [f"- `{i.spec_path}`: {md(note)}" for i, note in moved if note]
    not_applied = [i for i in items if i.status != "applied"]
    if not_applied:
        lines += ["", "## Not applied, and why", ""]
        for item in not_applied:
            lines.append(
                f"- `{item.spec_path}`: {item.status}"
                + (f" — {md(item.reason)}" if item.reason else "")
            )
    return "\n".join(lines).rstrip() + "\n"


def write_batch_report(fdir: Path, batch_id: str, store: Store, ledger: Ledger) -> Path:
    batch = store.batch(batch_id)
    assert batch is not None
    items = store.items(batch_id)
    runs = {r.run_id: r for r in store.runs(batch_id=batch_id)}
    spend = _batch_spend(runs, ledger)
    drift = {run_id: note for run_id in runs if (note := drift_note(fdir, run_id))}
    path = fdir / "batches" / batch_id / "report.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_batch(batch, items, runs, spend, drift), encoding="utf-8")
    page = render_batch_html(batch, items, runs, spend)
    path.with_suffix(".html").write_text(page, encoding="utf-8")
    return path


def _batch_spend(runs: dict[str, RunRecord], ledger: Ledger) -> dict[str, dict[str, float]]:
    spend: dict[str, dict[str, float]] = {}
    for dimension in ("stage", "model", "provider"):
        table: dict[str, float] = {}
        for run_id in runs:
            for key, value in ledger.by(dimension, run_id).items():
                table[key] = table.get(key, 0.0) + value
        spend[dimension] = table
    return spend


def batch_json(fdir: Path, batch_id: str, store: Store, ledger: Ledger) -> dict[str, object]:
    """The batch report for machines: its record, every spec's outcome and what is left to do."""
    from orchestrator.report_html import settle_command

    batch = store.batch(batch_id)
    assert batch is not None
    runs = {r.run_id: r for r in store.runs(batch_id=batch_id)}
    specs = []
    for item in store.items(batch_id):
        run = runs.get(item.run_id or "")
        specs.append(
            {
                **item.model_dump(),
                "branch": run.applied_branch if run else None,
                "winner_model": run.winner_model if run else None,
                "cost_usd": round(run.cost_usd, 6) if run else 0.0,
                "to_do": settle_command(item, batch_id),
            }
        )
    spend = {
        d: {k: round(v, 6) for k, v in table.items()}
        for d, table in _batch_spend(runs, ledger).items()
    }
    return {
        "type": "batch",
        **batch.model_dump(),
        "live": batch.live_status,
        "cost_usd": round(sum(r.cost_usd for r in runs.values()), 6),
        "specs": specs,
        "spend": spend,
        "report": str(fdir / "batches" / batch_id / "report.html"),
    }


def drift_note(fdir: Path, run_id: str) -> str | None:
    """The base-drift sentence of a finished run, from its run.json."""
    try:
        summary = json.loads((fdir / "runs" / run_id / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    drift = summary.get("drift") if isinstance(summary, dict) else None
    note = drift.get("note") if isinstance(drift, dict) else None
    return note if isinstance(note, str) and note else None
