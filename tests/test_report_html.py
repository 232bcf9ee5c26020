"""report.html in a real browser: what the morning reader sees, what it fetches, what it runs.

Debian's chromium renders each page headless (`--dump-dom` and `--screenshot` in one go);
screenshots are kept in tests/artifacts/. A missing chromium fails these tests.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from browser import ARTIFACTS, Rendered, chromium_version, count_colour, parse, png_rgb, render
from markdown_it import MarkdownIt
from pygments.styles import get_style_by_name
from pygments.token import Generic
from test_batch import batch, specs

from orchestrator.demo import prepare_demo
from orchestrator.fmt import usd
from orchestrator.report import render_markdown
from orchestrator.report_html import render_run_html
from orchestrator.state import (
    Candidate,
    CandidateChecks,
    CheckResult,
    Review,
    RunState,
    Selection,
)
from orchestrator.store import Store


@dataclass
class Night:
    repo: Path
    fdir: Path
    batch_id: str
    applied: str
    waiting: str
    specs: list[Path]


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> Night:
    """A two-spec batch on the demo: one applied, one whose checks fail everywhere (needs you)."""
    demo = prepare_demo(tmp_path_factory.mktemp("night"))
    paths = specs(demo, 2)
    paths[1].write_text(
        paths[1].read_text().replace("python3 -m unittest -q", 'python3 -c "raise SystemExit(3)"')
    )
    result = batch(demo, paths)
    assert [i.status for i in result.items] == ["applied", "needs-you"]
    return Night(
        repo=demo.repo,
        fdir=demo.repo / ".flow",
        batch_id=result.batch_id,
        applied=str(result.items[0].run_id),
        waiting=str(result.items[1].run_id),
        specs=paths,
    )


def off_machine(html: str) -> list[str]:
    """Every src/href/url() that names a scheme or a host: the page must have none."""
    targets = re.findall(r"""(?:src|href|action)\s*=\s*["']?([^"'\s>]+)|url\(([^)]*)\)""", html)
    found = [a or b for a, b in targets]
    return [t for t in found if re.match(r"\s*['\"]?([a-z][a-z0-9+.-]*:|//)", t, re.I)]


def shown(r: Rendered, name: str) -> None:
    print(f"screenshot: {r.png} ({r.seconds:.1f}s in {chromium_version()})")
    assert r.png == ARTIFACTS / name and r.png.stat().st_size > 10_000


def test_run_page_in_chromium(night: Night, tmp_path: Path) -> None:
    run_dir = night.fdir / "runs" / night.applied
    page = run_dir / "report.html"
    assert (run_dir / "report.md").is_file() and page.is_file()
    html = page.read_text(encoding="utf-8")
    assert off_machine(html) == [] and "<script" not in html and "<link" not in html
    assert "<details" not in html and "display:none" not in html  # nothing folded away

    r = render(page, ARTIFACTS / "report-run.png", tmp_path, height=3400)
    shown(r, "report-run.png")
    assert r.fetched == []
    dom = parse(r.dom)
    summary = json.loads((run_dir / "run.json").read_text())
    md_text = (run_dir / "report.md").read_text()
    # The winner and why, first thing on the page.
    why = summary["selection"]["why"]
    assert why.startswith("#0 (glm-sim) won") and dom.by_id["why"] == why
    assert r.dom.index('id="why"') < r.dom.index('id="matrix"')
    # The matrix: one row per candidate, the winner's marked, every column of evidence.
    matrix = dom.by_id["matrix"]
    for head in ("check: python3 -m unittest -q", "review: gpt-sim", "review: claude-sim"):
        assert head in matrix
    for word in ("mean review", "turns", "cost"):
        assert word in matrix
    assert re.search(r'<tr class="winner" data-candidate="0">', r.dom)
    for c in summary["candidates"]:
        assert f"#{c['index']} {c['model']}" in matrix
    assert "8.5 approve" in matrix and "FAIL" in matrix
    # Every candidate's diff, whole, as its patch file has it.
    patched = [c for c in summary["candidates"] if c["patch"]]
    assert len(patched) == 2
    wanted = sorted((run_dir / c["patch"]).read_text().strip() for c in patched)
    assert sorted(d.strip() for d in dom.diffs) == wanted
    # Reviews and findings, and spend by stage, model and provider.
    text = "".join(dom.text)
    assert "Consider a docstring example." in text and "Correct, small" in text
    for dimension in ("stage", "model", "provider"):
        assert f'data-dimension="{dimension}"' in r.dom
    assert usd(summary["cost_usd"]) in text
    # The forecast made before the run, against what it spent (the markdown's numbers).
    forecast = dom.by_id["forecast"]
    assert "Forecast vs spent" in forecast and "planner" in forecast and "flash-sim" in forecast
    md_total = re.search(r"\| total \| \| \| \| (\S+) \| (\S+) \| (\S+) \|", md_text)
    assert md_total is not None and "".join(md_total.groups()) in forecast.replace("total", "")
    # The colouring is on screen: the inserted lines' colour in the screenshot.
    inserted = "#" + str(get_style_by_name("default").style_for_token(Generic.Inserted)["color"])
    assert inserted.lower() in html.lower()
    rgb = tuple(int(inserted[i : i + 2], 16) for i in (1, 3, 5))
    width, height, rows = png_rgb(r.png)
    assert (width, height) == (1280, 3400)
    assert count_colour(rows, rgb) > 200  # type: ignore[arg-type]


def test_the_probe_sees_a_page_that_fetches(tmp_path: Path) -> None:
    """The fetch recorder works: the report's empty list above means something."""
    page = tmp_path / "leaky.html"
    page.write_text(
        '<link rel="stylesheet" href="https://cdn.example.test/x.css">'
        '<img src="http://images.example.test/a.png"><p>hi</p>'
    )
    r = render(page, tmp_path / "leaky.png", tmp_path, height=200)
    hosts = {urlsplit(u).hostname for u in r.fetched}
    assert hosts == {"cdn.example.test", "images.example.test"}
    assert off_machine(page.read_text()) == [
        "https://cdn.example.test/x.css",
        "http://images.example.test/a.png",
    ]


def test_batch_page_in_chromium(night: Night, tmp_path: Path) -> None:
    page = night.fdir / "batches" / night.batch_id / "report.html"
    assert page.with_suffix(".md").is_file() and page.is_file()
    html = page.read_text(encoding="utf-8")
    assert off_machine(html) == [] and "<script" not in html

    r = render(page, ARTIFACTS / "report-batch.png", tmp_path, height=900)
    shown(r, "report-batch.png")
    assert r.fetched == []
    dom = parse(r.dom)
    assert dom.by_id["why"].startswith("1 of 2 specs applied; 1 needs you")
    table = dom.by_id["specs"]
    store = Store(night.fdir / "ledger.sqlite")
    try:
        runs = {run.run_id: run for run in store.runs(batch_id=night.batch_id)}
    finally:
        store.close()
    for path in night.specs:
        assert str(path) in table
    assert "applied" in table and "needs-you" in table and "flow/median-0" in table
    assert f"flow pick {night.waiting} N" in table and f"flow show {night.waiting}" in table
    for run in runs.values():
        assert usd(run.cost_usd) in table
    # Each spec links to its run's page, which exists beside the batch's.
    links = re.findall(r'href="([^"]+)"', r.dom)
    assert len(links) == 2
    for link in links:
        assert (page.parent / unquote(link)).resolve().is_file()


def flow(
    repo: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


def test_report_json_and_open(night: Night, tmp_path: Path) -> None:
    one = flow(night.repo, "report", night.waiting, "--json")
    assert one.returncode == 0 and one.stdout.count("\n") == 1
    data = json.loads(one.stdout)
    assert data["type"] == "run" and data["outcome"] == "needs-you"
    assert data["selection"]["winner"] is None and data["selection"]["why"]
    assert set(data["spend"]) == {"stage", "model", "provider"}
    assert Path(data["report"]).is_file()

    whole = json.loads(flow(night.repo, "report", night.batch_id, "--json").stdout)
    assert whole["type"] == "batch" and [s["status"] for s in whole["specs"]] == [
        "applied",
        "needs-you",
    ]
    assert whole["specs"][0]["branch"] == "flow/median-0" and whole["specs"][0]["to_do"] is None
    assert whole["specs"][1]["to_do"] == f"flow show {night.waiting}; flow pick {night.waiting} N"

    # --open hands the page to $BROWSER (a script here, never a real browser in tests).
    opened = tmp_path / "opened.txt"
    opener = tmp_path / "browser.sh"
    opener.write_text(f'#!/bin/sh\nprintf "%s\\n" "$1" >> {opened}\n')
    opener.chmod(0o755)
    res = flow(night.repo, "report", night.applied, "--open", env={"BROWSER": str(opener)})
    page = night.fdir / "runs" / night.applied / "report.html"
    assert res.returncode == 0 and res.stdout.strip() == str(page)
    assert opened.read_text().split() == [page.resolve().as_uri()]

    page.rename(page.with_suffix(".gone"))
    try:
        res = flow(night.repo, "report", night.applied, "--open", env={"BROWSER": str(opener)})
    finally:
        page.with_suffix(".gone").rename(page)
    assert res.returncode == 2 and "no HTML report" in res.stderr
    assert "Traceback" not in res.stderr and opened.read_text().count("\n") == 1


HOSTILE_SCRIPT = (
    "<script>document.body.insertAdjacentHTML('beforeend','<b id=pwned>!</b>')</script>"
)
HOSTILE_IMG = "<img src=x onerror=\"document.title='pwned'\">"
SPECIALS = "Edited __init__.py and *args*; see [docs](http://evil.test) | `x` ~y~ &amp; # h"


def hostile_state() -> RunState:
    return RunState(
        run_id="r-hostile",
        base_sha="0" * 40,
        candidates=[
            Candidate(
                index=0,
                model="glm",
                family="zhipu",
                status="ok",
                patch="candidates/build-0.patch",
                files=["a.py"],
                added=2,
                summary=f"{SPECIALS} {HOSTILE_SCRIPT}",
            )
        ],
        checks=[
            CandidateChecks(
                candidate=0,
                results=[
                    CheckResult(
                        command="pytest",
                        exit_code=1,
                        passed=False,
                        output_tail=f"</pre>{HOSTILE_SCRIPT}",
                    )
                ],
            )
        ],
        reviews=[
            Review(
                candidate=0,
                reviewer="gpt",
                family="openai",
                score=3,
                summary=HOSTILE_IMG,
                findings=[f"</li></ul>{HOSTILE_SCRIPT}", SPECIALS],
            )
        ],
        selection=Selection(winner=None, why=f"Nothing: {HOSTILE_IMG}", explanation=[SPECIALS]),
    )


def test_hostile_text_renders_inert_and_visible(tmp_path: Path) -> None:
    patch = (
        "diff --git a/a.py b/a.py\n--- a/a.py\n+++ b/a.py\n@@ -0,0 +1,2 @@\n"
        f"+x = '</pre></div>{HOSTILE_SCRIPT}'\n+y = '{HOSTILE_IMG}'\n"
    )
    html = render_run_html(
        hostile_state(),
        title=f"Fix __main__ {HOSTILE_SCRIPT}",
        spec_path="s.md",
        branch="b",
        base="0" * 40,
        cost=0.0,
        outcome="needs-you",
        spend={"stage": {HOSTILE_IMG: 0.5}},
        diffs={0: patch},
    )
    page = tmp_path / "report.html"
    page.write_text(html, encoding="utf-8")
    assert off_machine(html) == []
    r = render(page, ARTIFACTS / "report-hostile.png", tmp_path, height=1200)
    dom = parse(r.dom)
    # Inert: no element the model wrote exists, nothing ran, nothing was fetched.
    assert "script" not in dom.tags and "img" not in dom.tags and "pwned" not in dom.ids
    assert "<title>pwned" not in r.dom and r.fetched == []
    # Visible: every hostile string is there as text, the diff whole inside its box.
    text = "".join(dom.text)
    for literal in (HOSTILE_SCRIPT, HOSTILE_IMG, SPECIALS, f"</pre>{HOSTILE_SCRIPT}"):
        assert literal in text
    assert dom.by_id["why"] == f"Nothing: {HOSTILE_IMG}"
    assert [d.strip() for d in dom.diffs] == [patch.strip()]

    # The markdown report: rendered as markdown-it renders it, the same text stays literal.
    md = render_markdown(
        hostile_state(),
        title="Fix __main__",
        spec_path="s.md",
        branch="b",
        base="0" * 40,
        cost=0.0,
        outcome="needs-you",
    )
    rendered = MarkdownIt("commonmark").enable("table").enable("strikethrough").render(md)
    assert "<script" not in rendered and "<img" not in rendered
    assert 'href="http://evil.test"' not in rendered
    words = "".join(parse(rendered).text)  # emphasis or a link would have eaten the marks
    assert SPECIALS in words and HOSTILE_SCRIPT in words and "Fix __main__" in words
