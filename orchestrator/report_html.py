"""The run and batch reports as one self-contained HTML page each.

The page loads nothing: CSS is inline, there are no scripts, fonts or images, and the only
links are to the candidates' patches and other reports beside it. Every piece of model or
user text goes through `html.escape` (diffs through Pygments, which escapes too).
"""

from __future__ import annotations

from collections.abc import Mapping
from html import escape
from statistics import mean
from typing import TYPE_CHECKING

from orchestrator.fmt import count, duration, pct, score, tokens, usd
from orchestrator.state import Candidate, CheckResult, Review, RunState
from orchestrator.store import BatchItem, BatchRecord, RunRecord

if TYPE_CHECKING:
    from orchestrator.forecast_view import Versus
    from orchestrator.ledger import CacheShare

DIFF_CHARS = 200_000
"""A diff longer than this is cut in the page; the patch file beside it is whole."""

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;
 max-width:1200px;padding:1.2em 2em;color:#1f2328;background:#fff}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.2em;margin:1.6em 0 .5em;
 border-bottom:1px solid #d0d7de}h3{font-size:1.05em;margin:1.2em 0 .4em}
code,pre,.mono{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;
 font-size:13px}
.why{font-size:1.15em;padding:.7em 1em;border-left:5px solid #1a7f37;background:#f0fff4}
.why.none{border-color:#bf8700;background:#fff8e1}
.facts{color:#57606a;margin:.4em 0}.facts span{margin-right:1.4em}
table{border-collapse:collapse;margin:.5em 0}
th,td{border:1px solid #d0d7de;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f6f8fa}tr.winner td{background:#f0fff4;font-weight:600}
.pass{color:#1a7f37}.fail{color:#cf222e;font-weight:600}.muted{color:#8c959f}
.cmd{background:#f6f8fa;padding:.1em .4em;border-radius:4px}
.diff pre{margin:0;padding:.6em;overflow-x:auto;border:1px solid #d0d7de;border-radius:6px}
.tail{background:#f6f8fa;padding:.5em;white-space:pre-wrap;max-height:20em;overflow:auto}
.bars{display:grid;grid-template-columns:max-content 260px max-content;gap:.2em .8em;
 align-items:center;margin-bottom:.8em}
.bar{height:.9em;background:#0969da;border-radius:2px;min-width:1px}
article{border-top:1px dashed #d0d7de;padding-top:.3em}
"""


def _e(text: object) -> str:
    return escape(str(text), quote=True)


def _n(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def _page(title: str, body: list[str]) -> str:
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            # Belt and braces: even a tag that slipped through could fetch nothing.
            '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
            "style-src 'unsafe-inline'; img-src data:\">",
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
            *body,
            "</body></html>",
            "",
        ]
    )


def _cell(ok: bool | None, text: str | None = None) -> str:
    if ok is None:
        return '<td class="muted">–</td>'
    word = text or ("pass" if ok else "FAIL")
    return f'<td class="{"pass" if ok else "fail"}">{_e(word)}</td>'


def _bars(spend: dict[str, dict[str, float]]) -> list[str]:
    """Spend per stage, model and provider as CSS bars, largest first."""
    out = ['<section id="spend"><h2>Spend</h2>']
    for dimension, table in spend.items():
        out.append(f"<h3>by {_e(dimension)}</h3>")
        if not table:
            out.append('<p class="muted">(none)</p>')
            continue
        top = max(table.values()) or 1.0
        out.append(f'<div class="bars" data-dimension="{_e(dimension)}">')
        for key, value in sorted(table.items(), key=lambda kv: (-kv[1], kv[0])):
            width = round(100 * value / top, 1) if value > 0 else 0
            out += [
                f'<span class="mono">{_e(key)}</span>',
                f'<div><div class="bar" style="width:{width}%"></div></div>',
                f"<span>{_e(usd(value))}</span>",
            ]
        out.append("</div>")
    return [*out, "</section>"]


def _cache(cache: Mapping[str, CacheShare]) -> list[str]:
    """Each model's prompt tokens read from its provider's prompt cache, as a share bar."""
    shares = {m: c for m, c in cache.items() if c.prompt}
    if not shares:
        return []
    out = ['<section id="cache"><h3>prompt cache by model</h3><div class="bars">']
    for model, share in sorted(shares.items()):
        read = share.read / share.prompt
        written = f", {share.written:,} written" if share.written else ""
        out += [
            f'<span class="mono">{_e(model)}</span>',
            f'<div><div class="bar" style="width:{round(100 * read, 1)}%"></div></div>',
            f"<span>{read:.0%} read of {share.prompt:,} prompt tokens{_e(written)}</span>",
        ]
    return [*out, "</div></section>"]


def _versus(rows: list[Versus]) -> list[str]:
    """The dry-run forecast against what the ledger says was spent, per stage and model."""
    head = ["stage", "model", "calls (forecast)", "tokens (forecast)", "forecast", "spent"]
    out = ['<section id="forecast"><h2>Forecast vs spent</h2><table><thead><tr>']
    out += [f"<th>{h}</th>" for h in [*head, "error", "basis"]] + ["</tr></thead><tbody>"]
    for v in rows:
        cells = [
            v.stage,
            v.model,
            f"{v.calls} ({count(v.forecast_calls)})",
            f"{tokens(v.tokens)} ({tokens(v.forecast_tokens)})",
            usd(v.forecast_usd),
            usd(v.spent_usd),
            pct(v.error),
            v.basis,
        ]
        out.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    forecast, spent = sum(v.forecast_usd for v in rows), sum(v.spent_usd for v in rows)
    total = pct((spent - forecast) / forecast if forecast > 0 else None)
    out.append(
        f"<tr><th colspan=4>total</th><th>{_e(usd(forecast))}</th><th>{_e(usd(spent))}</th>"
        f"<th>{_e(total)}</th><th></th></tr>"
    )
    return [*out, "</tbody></table></section>"]


def _diff(patch: str) -> str:
    """A patch with syntax colouring, styles inline so the page needs no stylesheet."""
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import DiffLexer

    cut = ""
    if len(patch) > DIFF_CHARS:
        cut = f"<p class=muted>[… {len(patch) - DIFF_CHARS:,} chars more in the patch]</p>"
        patch = patch[:DIFF_CHARS]
    html: str = highlight(patch, DiffLexer(), HtmlFormatter(noclasses=True, style="default"))
    return f'<div class="diff">{html}</div>{cut}'


def _checks(results: list[CheckResult]) -> list[str]:
    out = ["<ul>"]
    for res in results:
        state = "pass" if res.passed else ("timeout" if res.timed_out else "FAIL")
        if not res.passed and not res.timed_out:
            state += f" (exit {res.exit_code})"
        cls = "pass" if res.passed else "fail"
        out.append(
            f"<li>check <code>{_e(res.command)}</code>: <span class={cls}>{_e(state)}</span>, "
            f"{_e(duration(res.duration_s))}"
        )
        if not res.passed and res.output_tail.strip():
            tail = "\n".join(res.output_tail.strip().splitlines()[-30:])
            out.append(f'<pre class="tail">{_e(tail)}</pre>')
        out.append("</li>")
    return [*out, "</ul>"]


def _reviews(reviews: list[Review]) -> list[str]:
    if not reviews:
        return []
    out = ["<h4>Reviews</h4><ul>"]
    for r in reviews:
        who = f"<code>{_e(r.reviewer)}</code> ({_e(r.family)})"
        if r.error:
            out.append(f'<li>{who}: <span class="fail">failed</span> — {_e(r.error)}</li>')
            continue
        cls = "pass" if r.verdict == "approve" else "fail"
        out.append(
            f"<li>{who}: {_e(score(r.score))}/10, <span class={cls}>{_e(r.verdict)}</span>"
            f" — {_e(r.summary.strip())}"
        )
        if r.findings:
            out.append("<ul>" + "".join(f"<li>{_e(f)}</li>" for f in r.findings) + "</ul>")
        out.append("</li>")
    return [*out, "</ul>"]


def _candidate(
    c: Candidate,
    checks: list[CheckResult] | None,
    reviews: list[Review],
    winner: int | None,
    diff: str | None,
) -> list[str]:
    mark = " — winner" if c.index == winner else ""
    agent = f" via {_e(c.agent)}" if c.agent else ""
    out = [
        f'<article id="candidate-{c.index}">',
        f"<h3>Candidate #{c.index}: <code>{_e(c.model)}</code>{agent} "
        f"(family {_e(c.family)}){_e(mark)}</h3>",
        "<ul>",
        f"<li>status: {_e(c.status)}" + (f" — {_e(c.error)}" if c.error else "") + "</li>",
        f"<li>builder: {_n(c.turns, 'turn')}, {_e(tokens(c.prompt_tokens + c.completion_tokens))} "
        f"tokens, {_e(usd(c.cost_usd))}</li>",
    ]
    if c.summary.strip():
        out.append(f"<li>builder's summary: {_e(c.summary.strip())}</li>")
    if c.protected:
        out.append(
            "<li class=fail>changed protected files (not checked, not committed): "
            + ", ".join(f"<code>{_e(p)}</code>" for p in c.protected)
            + "</li>"
        )
    out.append("</ul>")
    if checks:
        out += ["<h4>Checks</h4>", *_checks(checks)]
    out += _reviews(reviews)
    if c.patch:
        out.append(
            f"<h4>Diff: {_n(len(c.files), 'file')}, +{c.added} −{c.removed} "
            f'(<a href="{_e(c.patch)}">{_e(c.patch)}</a>)</h4>'
        )
        out.append(_diff(diff) if diff is not None else '<p class="muted">(patch not found)</p>')
    return [*out, "</article>"]


def _matrix(state: RunState, winner: int | None) -> list[str]:
    """Candidate × evidence: every check, held-out test and review, then size and spend."""
    cands = sorted(state.get("candidates", []), key=lambda c: c.index)
    if not cands:
        return ['<p class="muted">No candidates.</p>']
    checks = {c.candidate: c.results for c in state.get("checks", [])}
    commands = next((r for r in checks.values() if r), [])
    held = {
        h.candidate: {(r.tester, r.name): r.passed for r in h.results}
        for h in state.get("heldout_results", [])
    }
    tests = [(t.tester, t.name) for h in state.get("heldout", []) for t in h.kept]
    reviews = state.get("reviews", [])
    reviewers = sorted({r.reviewer for r in reviews})
    head = ["candidate", "status"]
    head += [f"check: {r.command}" for r in commands]
    head += [f"held-out: {name}" for _, name in tests]
    head += [f"review: {name}" for name in reviewers]
    head += ["mean review", "diff", "turns", "tokens", "cost"]
    out = ['<table id="matrix"><thead><tr>']
    out += [f"<th>{_e(h)}</th>" for h in head] + ["</tr></thead><tbody>"]
    for c in cands:
        cls = ' class="winner"' if c.index == winner else ""
        row = [f"<tr{cls} data-candidate='{c.index}'><td>#{c.index} {_e(c.model)}</td>"]
        row.append(f"<td>{_e(c.status)}</td>")
        mine = checks.get(c.index, [])
        row += [_cell(mine[i].passed if i < len(mine) else None) for i in range(len(commands))]
        passed = held.get(c.index, {})
        row += [_cell(passed.get(t)) for t in tests]
        done = []
        for name in reviewers:
            got = next((r for r in reviews if r.candidate == c.index and r.reviewer == name), None)
            if got is None:
                row.append(_cell(None))
            elif got.error:
                row.append('<td class="fail">failed</td>')
            else:
                done.append(got.score)
                text = f"{score(got.score)} {got.verdict}"
                row.append(_cell(got.verdict == "approve", text))
        row.append(f"<td>{_e(score(mean(done))) if done else '–'}</td>")
        size = f"+{c.added} −{c.removed}" if c.status == "ok" else "–"
        row += [
            f"<td>{_e(size)}</td>",
            f"<td>{c.turns}</td>",
            f"<td>{_e(tokens(c.prompt_tokens + c.completion_tokens))}</td>",
            f"<td>{_e(usd(c.cost_usd))}</td></tr>",
        ]
        out.append("".join(row))
    return [*out, "</tbody></table>"]


def _outcome_line(state: RunState, outcome: str, branch: str) -> str:
    applied, run_id = state.get("applied"), state.get("run_id", "")
    if applied:
        return (
            f"<p><strong>applied</strong> on branch <code>{_e(applied.branch)}</code> as "
            f"<code>{_e(applied.commit[:12])}</code></p>"
        )
    text = f"<p><strong>{_e(outcome)}</strong>: nothing was applied (intended branch "
    text += f"<code>{_e(branch)}</code>)"
    if outcome == "needs-you":
        text += (
            f". Settle it: <code class=cmd>flow show {_e(run_id)} N</code> shows candidate N, "
            f"<code class=cmd>flow pick {_e(run_id)} N</code> commits it"
        )
    return text + "</p>"


def render_run_html(
    state: RunState,
    *,
    title: str,
    spec_path: str,
    branch: str,
    base: str,
    cost: float,
    outcome: str,
    spend: dict[str, dict[str, float]],
    diffs: dict[int, str],
    versus: list[Versus] | None = None,
    cache: Mapping[str, CacheShare] | None = None,
) -> str:
    """The run's page; `diffs` maps a candidate's index to its patch text."""
    selection = state.get("selection")
    winner = selection.winner if selection else None
    why = selection.why if selection and selection.why else f"Outcome: {outcome}."
    run_id = state.get("run_id", "")
    body = [
        f"<h1>flow run {_e(run_id)}: {_e(title)}</h1>",
        f'<p id="why" class="why{"" if winner is not None else " none"}">{_e(why)}</p>',
        _outcome_line(state, outcome, branch),
        f'<p class="facts"><span>spec <code>{_e(spec_path)}</code></span>'
        f"<span>base <code>{_e(base[:12])}</code></span><span>cost {_e(usd(cost))}</span></p>",
        "<h2>Evidence</h2>",
        *_matrix(state, winner),
    ]
    if selection and selection.explanation:
        body += ["<ul>", *(f"<li>{_e(x)}</li>" for x in selection.explanation), "</ul>"]
    body += _bars(spend) + _cache(cache or {})
    checks = {c.candidate: c.results for c in state.get("checks", [])}
    reviews = state.get("reviews", [])
    body += ['<section id="candidates"><h2>Candidates</h2>']
    for c in sorted(state.get("candidates", []), key=lambda c: c.index):
        mine = [r for r in reviews if r.candidate == c.index]
        body += _candidate(c, checks.get(c.index), mine, winner, diffs.get(c.index))
    body.append("</section>")
    if versus:
        body += _versus(versus)
    plan = state.get("plan")
    if plan:
        body += ["<h2>Plan</h2>", f"<p>{_e(plan.summary.strip())}</p>", "<ol>"]
        body += [f"<li>{_e(s)}</li>" for s in plan.steps] + ["</ol>"]
    notes = state.get("notes", [])
    if notes:
        body += ["<h2>Skipped and why</h2><ul>", *(f"<li>{_e(n)}</li>" for n in notes), "</ul>"]
    return _page(f"flow run {run_id}: {title}", body)


def settle_command(item: BatchItem, batch_id: str) -> str | None:
    """What a person types to finish what the batch left for them, if anything."""
    if item.status == "needs-you" and item.run_id:
        return f"flow show {item.run_id}; flow pick {item.run_id} N"
    if item.status in ("interrupted", "pending", "running"):
        return f"flow resume {batch_id}"
    return None


def _headline(items: list[BatchItem], batch_id: str) -> str:
    counts: dict[str, int] = {}
    for item in items:
        counts[item.status] = counts.get(item.status, 0) + 1
    parts = [f"{counts.pop('applied', 0)} of {len(items)} specs applied"]
    waiting = counts.pop("needs-you", 0)
    if waiting:
        parts.append(f"{waiting} need{'s' if waiting == 1 else ''} you (see “to do”)")
    unfinished = sum(counts.pop(s, 0) for s in ("interrupted", "pending", "running"))
    if unfinished:
        parts.append(f"{unfinished} unfinished (flow resume {batch_id})")
    parts += [f"{n} {s}" for s, n in sorted(counts.items())]
    return "; ".join(parts) + "."


def render_batch_html(
    batch: BatchRecord,
    items: list[BatchItem],
    runs: dict[str, RunRecord],
    spend: dict[str, dict[str, float]],
) -> str:
    """The batch's page: every spec, its outcome, branch, cost and what is left to do."""
    total = sum(r.cost_usd for r in runs.values())
    budget = batch.options.get("budget_usd")
    of = f" of {usd(budget)}" if isinstance(budget, int | float) else ""
    body = [
        f"<h1>flow batch {_e(batch.batch_id)}</h1>",
        f'<p id="why" class="why">{_e(_headline(items, batch.batch_id))}</p>',
        f'<p class="facts"><span>status {_e(batch.live_status)}</span>'
        f"<span>{len(items)} specs</span><span>spent {_e(usd(total) + of)}</span></p>",
        '<table id="specs"><thead><tr>',
        *(
            f"<th>{h}</th>"
            for h in ("spec", "outcome", "branch", "winning model", "cost", "time", "to do")
        ),
        "</tr></thead><tbody>",
    ]
    for item in items:
        run = runs.get(item.run_id or "")
        status = run.live_status if run and item.status == "running" else item.status
        cls = "pass" if status == "applied" else ("fail" if status == "failed" else "")
        link = _e(item.spec_path)
        if run:
            link = f'<a href="../../runs/{_e(run.run_id)}/report.html">{link}</a>'
        took = (run.finished - run.started) if run and run.finished else None
        todo = settle_command(item, batch.batch_id)
        # A needs-you reason only repeats the command in "to do".
        noted = item.reason and item.status != "needs-you"
        reason = f"<br><span class=muted>{_e(item.reason)}</span>" if noted else ""
        body.append(
            f"<tr data-spec='{_e(item.spec_path)}'><td class=mono>{link}</td>"
            f'<td class="{cls}">{_e(status)}{reason}</td>'
            f"<td><code>{_e(run.applied_branch if run and run.applied_branch else '-')}</code></td>"
            f"<td>{_e((run.winner_model if run else None) or '-')}</td>"
            f"<td>{_e(usd(run.cost_usd if run else 0.0))}</td><td>{_e(duration(took))}</td>"
            f"<td>{f'<code class=cmd>{_e(todo)}</code>' if todo else '–'}</td></tr>"
        )
    body.append("</tbody></table>")
    body += _bars(spend)
    return _page(f"flow batch {batch.batch_id}", body)
