"""A candidate no review completed for is not applied unless reviews are optional (issue 8.10).

Driven through the real CLI and litellm against the local server: the demo's builders and
planner answer, both reviewers fail with HTTP 500 on every attempt.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml
from conftest import flow_in

from orchestrator.demo import prepare_demo
from orchestrator.testing.demo_http import demo_scripts, http_config
from orchestrator.testing.server import ChatServer, ServerReply, scripted_handler

REVIEWERS = ("gpt-sim", "claude-sim")


def run_with_failing_reviews(
    tmp_path: Path, *, optional_in: str | None
) -> tuple[int, Path, dict[str, Any]]:
    demo = prepare_demo(tmp_path)
    inner = scripted_handler(demo_scripts(demo))
    if optional_in == "spec":
        text = demo.spec.read_text()
        demo.spec.write_text(
            text.replace("branch: flow/add-median", "branch: flow/add-median\nreviews: optional", 1)
        )

    def handler(request: dict[str, Any]) -> dict[str, Any] | ServerReply:
        if request["model"] in REVIEWERS:
            return ServerReply(500, {"error": {"message": "reviewer is down"}})
        return inner(request)

    with ChatServer(handler) as srv:
        cfg = http_config(demo, srv.base_url, api_key="FAULT_TEST_KEY", retries=0)
        if optional_in == "config":
            cfg["reviews"] = "optional"
        path = tmp_path / "http.yaml"
        path.write_text(yaml.safe_dump(cfg))
        out = flow_in(
            demo.repo,
            "run",
            str(demo.spec),
            "--config",
            str(path),
            env={"FAULT_TEST_KEY": "sk-fault-test-key-0001"},
        )
        reviewed = sum(1 for r in srv.requests if r["model"] in REVIEWERS)
    assert "Traceback" not in out.stderr, out.stderr
    assert reviewed > 0, "the reviewers were never asked"
    summary = json.loads(next((demo.repo / ".flow" / "runs").glob("*/run.json")).read_text())
    return out.returncode, demo.repo, summary


def branches(repo: Path) -> str:
    return subprocess.run(["git", "branch"], cwd=repo, capture_output=True, text=True).stdout


def test_passing_checks_without_a_completed_review_are_not_applied(tmp_path: Path) -> None:
    code, repo, summary = run_with_failing_reviews(tmp_path, optional_in=None)
    assert code == 1
    assert "flow/add-median" not in branches(repo)
    assert summary["applied"] is None
    words = " ".join(summary["selection"]["explanation"])
    assert "no completed review" in words and "reviews: optional" in words


def test_reviews_optional_in_the_spec_lets_the_checks_decide(tmp_path: Path) -> None:
    code, repo, summary = run_with_failing_reviews(tmp_path, optional_in="spec")
    assert code == 0
    assert "flow/add-median" in branches(repo)
    assert summary["applied"]["branch"] == "flow/add-median"


def test_reviews_optional_in_agents_yaml_lets_the_checks_decide(tmp_path: Path) -> None:
    code, repo, _ = run_with_failing_reviews(tmp_path, optional_in="config")
    assert code == 0
    assert "flow/add-median" in branches(repo)
