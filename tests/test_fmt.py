"""Model text stays literal in the markdown report; numbers read the same everywhere."""

from __future__ import annotations

import io

from rich.console import Console
from rich.markdown import Markdown

from orchestrator.events import BuilderUpdate, RunStarted
from orchestrator.fmt import duration, md, usd
from orchestrator.report import render_markdown
from orchestrator.state import Candidate, RunState
from orchestrator.ui import LiveView


def terminal(text: str) -> str:
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(Markdown(text))
    return out.getvalue()


def test_model_text_renders_literally_and_patch_paths_show() -> None:
    tricky = "Edited __init__.py and *args; <script>alert(1)</script> [x](y) `z`"
    state = RunState(
        run_id="r1",
        base_sha="0" * 40,
        candidates=[
            Candidate(
                index=0,
                model="glm",
                family="zhipu",
                status="ok",
                patch="candidates/build-0.patch",
                summary=tricky,
                cost_usd=0.123456,
            )
        ],
    )
    text = render_markdown(
        state,
        title="Fix __main__",
        spec_path="s.md",
        branch="b",
        base="0" * 40,
        cost=0.123456,
        outcome="nothing",
    )
    shown = terminal(text)
    assert tricky in shown  # the old report showed "init.py" and dropped the tag
    assert "Fix __main__" in shown
    assert "candidates/build-0.patch" in shown  # the link text is its path
    assert "$0.1235" in shown


def test_one_format_for_money_in_report_and_live_view() -> None:
    out = io.StringIO()
    view = LiveView(Console(file=out, width=80, color_system=None))
    with view:
        view.emit(
            RunStarted(
                run_id="r",
                title="t",
                repo=".",
                base="0" * 40,
                branch="b",
                builders=["glm"],
                reviewers=[],
            )
        )
        view.emit(
            BuilderUpdate(index=0, model="glm", status="running", tokens=12345, cost_usd=0.123456)
        )
    assert usd(0.123456) in out.getvalue() and "12,345" in out.getvalue()
    assert duration(1.24) == "1.2s" and duration(65) == "1m05s" and duration(None) == "-"


def test_md_escapes_every_markdown_punctuation() -> None:
    assert terminal(md("# a_b_c **d** | f ~g~ &amp;")).strip() == "# a_b_c **d** | f ~g~ &amp;"
