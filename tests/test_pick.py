"""Abstain, show and pick (issue 9.4): a run the evidence does not settle ends "needs you",
keeps every candidate as a ref, and the user commits one with `flow pick`.

Driven through the real CLI against the local server: the demo's planner and builders answer,
both reviewers are down, so no candidate has a completed review.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml
from conftest import flow_in, git

from orchestrator.demo import prepare_demo
from orchestrator.testing.demo_http import demo_scripts, http_config
from orchestrator.testing.server import ChatServer, ServerReply, scripted_handler

REVIEWERS = ("gpt-sim", "claude-sim")


def needs_you_run(tmp_path: Path) -> tuple[Path, str, dict[str, Any]]:
    demo = prepare_demo(tmp_path)
    inner = scripted_handler(demo_scripts(demo))

    def handler(request: dict[str, Any]) -> dict[str, Any] | ServerReply:
        if request["model"] in REVIEWERS:
            return ServerReply(500, {"error": {"message": "reviewer is down"}})
        return inner(request)

    with ChatServer(handler) as srv:
        path = tmp_path / "http.yaml"
        path.write_text(yaml.safe_dump(http_config(demo, srv.base_url, retries=0)))
        out = flow_in(demo.repo, "run", str(demo.spec), "--config", str(path))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "needs you" in out.stdout and "flow pick" in out.stdout
    summary_path = next((demo.repo / ".flow" / "runs").glob("*/run.json"))
    summary = json.loads(summary_path.read_text())
    assert summary["outcome"] == "needs-you" and summary["applied"] is None
    return demo.repo, summary["run_id"], summary


def test_needs_you_keeps_candidates_as_refs_and_pick_commits_one(tmp_path: Path) -> None:
    repo, run_id, summary = needs_you_run(tmp_path)
    assert "flow/add-median" not in git(repo, "branch")
    ok = [c for c in summary["candidates"] if c["status"] == "ok"]
    assert ok, "the demo's builders left no diff"
    run_dir = repo / ".flow" / "runs" / run_id
    for c in ok:
        ref = f"refs/flow/{run_id}/{c['index']}"
        diff = subprocess.run(
            ["git", "diff", "--binary", "--full-index", "--no-renames", summary["base"], ref],
            cwd=repo,
            capture_output=True,
            check=True,
        ).stdout
        assert diff == (run_dir / c["patch"]).read_bytes()
        assert git(repo, "rev-parse", f"{ref}^") == summary["base"]

    status = flow_in(repo, "status")
    assert "needs-you" in status.stdout and f"flow pick {run_id} N" in status.stdout.replace(
        "\n", " "
    )

    listing = flow_in(repo, "show", "last")
    assert listing.returncode == 0, listing.stderr
    assert all(f"#{c['index']} {c['model']}" in listing.stdout for c in summary["candidates"])

    good = next(c for c in ok if c["model"] == "glm-sim")
    bad = next(c for c in ok if c["model"] == "minimax-sim")
    one = flow_in(repo, "show", run_id[:12], str(good["index"]))
    assert one.returncode == 0 and "def median" in one.stdout and "review by" in one.stdout

    # A candidate whose checks failed is refused without --force; nothing is created.
    refused = flow_in(repo, "pick", run_id, str(bad["index"]))
    assert refused.returncode == 2 and "checks failed" in refused.stderr
    assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) <= 2
    assert "flow/add-median" not in git(repo, "branch")

    picked = flow_in(repo, "pick", run_id[:10], str(good["index"]))
    assert picked.returncode == 0, picked.stderr
    tip = git(repo, "rev-parse", "flow/add-median")
    assert git(repo, "rev-parse", "flow/add-median^") == summary["base"]
    assert git(repo, "rev-parse", f"{tip}^{{tree}}") == git(
        repo, "rev-parse", f"refs/flow/{run_id}/{good['index']}^{{tree}}"
    )
    assert f"Flow-Run: {run_id}" in git(repo, "log", "-1", "--format=%B", tip)
    after = flow_in(repo, "status", "--json")
    rec = next(json.loads(line) for line in after.stdout.splitlines() if run_id in line)
    assert rec["status"] == "applied" and rec["applied_branch"] == "flow/add-median"
    # Picking again never moves the branch.
    again = flow_in(repo, "pick", run_id, str(good["index"]))
    assert again.returncode == 2 and git(repo, "rev-parse", "flow/add-median") == tip


def test_bad_run_ids_are_clear_errors(tmp_path: Path) -> None:
    repo, run_id, _ = needs_you_run(tmp_path)
    for args, words in [
        (("show", "nope"), "no run or batch 'nope'"),
        (("show", run_id, "99"), "no candidate #99"),
        (("pick", "zzz", "0"), "no run or batch 'zzz'"),
    ]:
        out = flow_in(repo, *args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert words in out.stderr and "Traceback" not in out.stderr


def test_reviews_the_budget_cannot_afford_leave_the_run_to_you_and_pick_applies_it(
    tmp_path: Path,
) -> None:
    """Issue 9: every review refused by the budget (a per-call cap below a review's worst
    case) is no review: nothing is applied, and `flow pick` then commits the candidate."""
    demo = prepare_demo(tmp_path)
    with ChatServer(scripted_handler(demo_scripts(demo)), prices=(1e-6, 1e-6)) as srv:
        cfg = http_config(demo, srv.base_url, retries=0)
        for name in REVIEWERS:  # a review may cost up to ~$8 (8,192 tokens at $1,000/M)
            cfg["models"][name]["price"] = {"input": 1.0, "output": 1000.0}
        cfg["budget"] = {"per_call_usd": 1.0}
        path = tmp_path / "http.yaml"
        path.write_text(yaml.safe_dump(cfg))
        out = flow_in(demo.repo, "run", str(demo.spec), "--config", str(path))
        reviewed = [r for r in srv.requests if r["model"] in REVIEWERS]
    assert out.returncode == 1, out.stdout + out.stderr
    assert reviewed == []  # refused before any request: no review was bought
    summary = json.loads(next((demo.repo / ".flow" / "runs").glob("*/run.json")).read_text())
    assert summary["outcome"] == "needs-you" and summary["applied"] is None
    report = next((demo.repo / ".flow" / "runs").glob("*/report.md")).read_text()
    assert "per-call cap" in report
    good = next(c for c in summary["candidates"] if c["model"] == "glm-sim")
    picked = flow_in(demo.repo, "pick", "last", str(good["index"]))
    assert picked.returncode == 0, picked.stdout + picked.stderr
    assert git(demo.repo, "rev-parse", "flow/add-median^") == summary["base"]
