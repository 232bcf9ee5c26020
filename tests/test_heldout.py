"""Held-out acceptance tests (issue 9.2, 9.3): a tester writes tests from the spec's
scenarios; builders never see them; they decide between candidates the checks cannot tell
apart, and the report says why the winner won.

The demo repository through the real CLI with scripted models. The spec's own check covers
only the odd-length scenario, so a builder that handles odd lengths only passes it with a
smaller diff than the honest fix, and the reviewer scores both the same: without held-out
tests the partial fix wins. The tester's even-length test fails on the base, the partial fix
fails it, the honest fix passes it.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml
from browser import parse
from conftest import flow_in, git
from test_protect import BUILDERS, FINISH, append, call, reply

from orchestrator.agents.prompts import review_request
from orchestrator.demo import prepare_demo
from orchestrator.state import HeldOutResult, Plan

MARKER = "HELDOUT-MARKER-7f3a"
PARTIAL = (
    "\n\ndef median(values):\n    ordered = sorted(values)\n    return ordered[len(ordered) // 2]\n"
)
ACCEPT = f"""# {MARKER}
import unittest

import stats


class Even(unittest.TestCase):
    def test_even(self) -> None:
        self.assertEqual(stats.median([4, 1, 3, 2]), 2.5)


class Odd(unittest.TestCase):
    def test_odd(self) -> None:
        self.assertEqual(stats.median([5, 9, 7]), 7)
"""
TESTER = [
    reply(call("list_files", path="tests")),
    reply(call("write_file", path="tests/test_accept_median.py", content=ACCEPT)),
    reply(
        call(
            "submit_tests",
            tests=[
                {
                    "name": "even length",
                    "command": "python3 -m unittest -q tests.test_accept_median.Even",
                },
                {
                    "name": "odd length",
                    "command": "python3 -m unittest -q tests.test_accept_median.Odd",
                },
                {"name": "no runner", "command": "no-such-test-runner --all"},
            ],
        )
    ),
]


def spy(repo: Path) -> list[dict[str, Any]]:
    """Looks where the held-out tests live (sibling checkouts, the user's repository and its
    .flow/, flow's cache, /tmp), then writes the partial fix."""
    places = f"../.. {repo} {repo}/.flow ~/.cache /tmp"
    look = f"(grep -rl {MARKER} {places} 2>&1; ls -laR ../.. 2>&1 | head -400) > found.txt"
    return [reply(call("run", command=look)), reply(append("stats.py", PARTIAL)), FINISH]


def builds(repo: Path) -> dict[str, list[dict[str, Any]]]:
    return {
        "partial": [reply(append("stats.py", PARTIAL)), FINISH],
        "honest": [*BUILDERS["honest"][:1], FINISH],
        "spy": spy(repo),
    }


def configure(tmp: Path, testers: bool, repo: Path) -> Path:
    def script(name: str, replies: list[dict[str, Any]]) -> str:
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump({"replies": replies}))
        return f"{name}.yaml"

    plan = {"summary": "add median", "steps": ["add median to stats.py"]}
    review = {"score": 8, "verdict": "approve", "summary": "looks right", "findings": []}
    models: dict[str, Any] = {
        "planner": {
            "id": "scripted/p",
            "script": script("planner", [reply(call("submit_plan", **plan))]),
            "family": "google",
        },
        "judge": {
            "id": "scripted/j",
            "script": script("judge", [reply(call("submit_review", **review))]),
            "family": "openai",
        },
        "tester": {"id": "scripted/t", "script": script("tester", TESTER), "family": "moonshot"},
    }
    for name, replies in builds(repo).items():
        models[name] = {
            "id": f"scripted/{name}",
            "script": script(name, replies),
            "family": "zhipu",
        }
    stages: dict[str, Any] = {
        "planner": {"model": "planner"},
        "builders": [{"model": name} for name in builds(repo)],
        "reviewers": [{"model": "judge"}],
    }
    if testers:
        stages["testers"] = [{"model": "tester"}]
    path = tmp / "agents.yaml"
    path.write_text(yaml.safe_dump({"models": models, "stages": stages}))
    return path


def run(
    tmp_path: Path, testers: bool
) -> tuple[subprocess.CompletedProcess[str], Path, dict[str, Any]]:
    demo = prepare_demo(tmp_path)
    text = demo.spec.read_text().replace(
        "  - python3 -m unittest -q\n",
        "  - python3 -m unittest -q tests.test_median.MedianTest.test_odd\n",
        1,
    )
    demo.spec.write_text(text)
    config = configure(tmp_path, testers, demo.repo)
    out = flow_in(demo.repo, "run", str(demo.spec), "--config", str(config))
    assert "Traceback" not in out.stderr, out.stderr
    summary = json.loads(next((demo.repo / ".flow" / "runs").glob("*/run.json")).read_text())
    return out, demo.repo, summary


def model_of(summary: dict[str, Any], index: int | None) -> str | None:
    return next((c["model"] for c in summary["candidates"] if c["index"] == index), None)


def test_without_held_out_tests_the_partial_fix_wins(tmp_path: Path) -> None:
    out, _, summary = run(tmp_path, testers=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert model_of(summary, summary["selection"]["winner"]) == "partial"


def test_held_out_tests_pick_the_fix_that_meets_every_scenario(tmp_path: Path) -> None:
    out, repo, summary = run(tmp_path, testers=True)
    assert out.returncode == 0, out.stdout + out.stderr
    selection = summary["selection"]
    assert model_of(summary, selection["winner"]) == "honest"
    assert "held-out tests" in selection["why"]
    # The tester is a row of the live view, with what it produced.
    assert re.search(
        r"^t0 +tester +ok .* held-out tests \(\d fail on the base\)$", out.stdout, re.M
    )
    report = next((repo / ".flow" / "runs").glob("*/report.md")).read_text()
    assert f"**Why:** {selection['why']}" in report
    assert "| candidate | check 1 | held-out 1 | held-out 2 | judge |" in report
    # The HTML page leads with the same sentence; its matrix has a column per held-out test.
    page = parse(next((repo / ".flow" / "runs").glob("*/report.html")).read_text())
    assert page.by_id["why"] == selection["why"]
    assert page.by_id["matrix"].count("held-out: ") == 2
    # The test that cannot run on the base was discarded, and said so.
    assert "1 could not run on the base and were discarded" in report
    # The held-out tests are evidence, not part of the commit.
    files = git(repo, "diff", "--name-only", "flow/add-median~1", "flow/add-median").split()
    assert files == ["stats.py"]


def test_builders_never_see_the_held_out_tests(tmp_path: Path) -> None:
    out, repo, summary = run(tmp_path, testers=True)
    assert out.returncode == 0, out.stdout + out.stderr
    run_dir = next((repo / ".flow" / "runs").glob("*/"))
    seen = (run_dir / "transcripts" / "test-0.jsonl").read_bytes()
    assert MARKER.encode() in seen  # the tester did write them
    for path in (run_dir / "transcripts").glob("build-*.jsonl"):
        # what each builder was given and what its tools returned (the spy's own grep
        # command names the marker; its output must not)
        for line in path.read_text().splitlines():
            message = json.loads(line)
            if message["role"] != "assistant":
                assert MARKER not in message.get("content", ""), (path, message)
    for path in (run_dir / "candidates").glob("*.patch"):
        assert MARKER.encode() not in path.read_bytes(), path
    spy = next(c for c in summary["candidates"] if c["model"] == "spy")
    patch = (run_dir / spy["patch"]).read_text()
    assert "found.txt" in patch and MARKER not in patch  # it looked, and found nothing
    assert "test_accept_median" not in patch


def test_reviewers_see_the_held_out_results() -> None:
    text = review_request(
        "spec",
        Plan(summary="p"),
        "diff",
        [],
        None,
        [HeldOutResult(tester=0, name="even length", passed=False)],
    )
    assert "Held-out acceptance tests" in text and "FAIL even length" in text


def test_validate_warns_when_a_tester_shares_a_builders_family(tmp_path: Path) -> None:
    demo = prepare_demo(tmp_path)
    path = configure(tmp_path, testers=True, repo=demo.repo)
    data = yaml.safe_load(path.read_text())
    data["models"]["tester"]["family"] = "zhipu"
    path.write_text(yaml.safe_dump(data))
    out = flow_in(demo.repo, "validate", str(demo.spec), "--config", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "stages.testers.0: tester 'tester' is of family 'zhipu', like a builder" in out.stdout
