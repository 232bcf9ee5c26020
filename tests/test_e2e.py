"""End to end on real temporary git repositories: the pipeline as a user runs it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import yaml
from conftest import git, repo_state, untouched

from orchestrator.config import load_config, parse_config
from orchestrator.demo import DemoPaths, prepare_demo
from orchestrator.events import BuilderUpdate, RunFinished
from orchestrator.protocols import ListSink
from orchestrator.runner import RunOptions, RunResult, run_spec
from orchestrator.spec import load_spec
from orchestrator.testing.demo_http import demo_scripts, http_config
from orchestrator.testing.server import ChatServer, scripted_handler
from orchestrator.workspace import Repo, worktree_dir

DEMO_SCRIPTS = Path(__file__).resolve().parent.parent / "orchestrator" / "demo" / "scripts"


def run(demo: DemoPaths, config: Path | None = None, **opts: Any) -> tuple[RunResult, ListSink]:
    sink = ListSink()
    loaded = load_config(config or demo.config)
    with untouched(demo.repo):
        result = asyncio.run(
            run_spec(load_spec(demo.spec), loaded, Repo.open(demo.repo), sink, RunOptions(**opts))
        )
    return result, sink


def edit_config(demo: DemoPaths, change: dict[str, Any]) -> Path:
    data = yaml.safe_load(demo.config.read_text())
    for key, value in change.items():
        section, name = key.split(".", 1)
        data[section][name] = value
    demo.config.write_text(yaml.safe_dump(data))
    return demo.config


def without_branches(state: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in state.items() if k != "branches"}


def test_demo_scenario(tmp_path: Path) -> None:
    demo = prepare_demo(tmp_path)
    before = repo_state(demo.repo)
    result, sink = run(demo)

    assert result.exit_code == 0 and result.outcome == "applied"
    assert result.branch == "flow/add-median"
    # The branch holds exactly the good builder's change, on top of the base commit.
    stats = git(demo.repo, "show", "flow/add-median:stats.py")
    assert "def median(values: list[float]) -> float:" in stats and "sorted(values)" in stats
    assert git(demo.repo, "rev-parse", "flow/add-median^") == before["head_sha"]
    message = git(demo.repo, "log", "-1", "--format=%B", "flow/add-median")
    assert message.startswith("Add a median function to stats")
    assert f"Flow-Run: {result.run_id}" in message and "Flow-Model: glm-sim" in message
    assert "Flow-Cost: $" in message
    # The three builders ended as scripted: a passing diff, a failing diff, no diff.
    finals = {
        e.index: e.status
        for e in sink.events
        if isinstance(e, BuilderUpdate) and e.status != "running"
    }
    assert finals == {0: "ok", 1: "ok", 2: "empty"}
    summary = json.loads((result.report.parent / "run.json").read_text())
    assert summary["selection"]["winner"] == 0
    assert summary["selection"]["ranking"] == [0]
    assert {(r["candidate"], r["reviewer"]) for r in summary["reviews"]} == {
        (0, "gpt-sim"),
        (0, "claude-sim"),
    }
    report = result.report.read_text()
    assert "#1 (minimax-sim): checks failed" in report and "**winner**" in report
    # The user's repository is untouched, except for the new branch.
    after = repo_state(demo.repo)
    assert without_branches(after) == without_branches(before)
    new_branch = f"refs/heads/flow/add-median {git(demo.repo, 'rev-parse', 'flow/add-median')}"
    assert set(str(after["branches"]).splitlines()) == {
        *str(before["branches"]).splitlines(),
        new_branch,
    }
    assert ".flow/" in (demo.repo / ".git" / "info" / "exclude").read_text()
    assert not worktree_dir(Repo.open(demo.repo), result.run_id).exists()
    assert isinstance(sink.events[-1], RunFinished) and sink.events[-1].exit_code == 0


def test_user_changes_are_never_touched(tmp_path: Path) -> None:
    demo = prepare_demo(tmp_path)
    repo = demo.repo
    (repo / "README.md").write_text("work in progress\n")  # unstaged change
    (repo / "notes.txt").write_text("untracked\n")  # untracked file
    (repo / "tests" / "test_stats.py").write_text("# staged\n")
    git(repo, "add", "tests/test_stats.py")  # staged change
    (repo / "scratch.py").write_text("x = 1\n")
    git(repo, "stash", "push", "-u", "-q", "--", "scratch.py")  # a stash entry
    git(repo, "switch", "-q", "-c", "topic")  # a different branch
    before = repo_state(repo)
    assert before["stash"] and before["status"]

    result, _ = run(demo)

    assert result.exit_code == 0
    assert without_branches(repo_state(repo)) == without_branches(before)
    # The committed base was used, not the dirty files.
    assert git(repo, "show", "flow/add-median:README.md").startswith("# stats")
    assert git(repo, "show", "flow/add-median:tests/test_stats.py").startswith("import unittest")
    assert "uncommitted changes; they were not included" in result.report.read_text()


def rendezvous_script(tmp_path: Path, name: str, marker_dir: Path, good: bool) -> Path:
    """A builder whose first command takes a while (builders are sandboxed apart: they cannot
    meet through files, so concurrency is read from the ledger's call times instead)."""
    wait = f"sleep 2 && echo {name} > started-{name}"
    replies: list[dict[str, Any]] = [
        {"tool_calls": [{"name": "run", "arguments": {"command": wait}}]}
    ]
    if good:
        replies += yaml.safe_load((DEMO_SCRIPTS / "builder_good.yaml").read_text())["replies"][1:2]
    replies.append({"tool_calls": [{"name": "finish", "arguments": {"summary": f"{name} done"}}]})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"replies": replies}))
    return path


def test_builders_run_concurrently(tmp_path: Path) -> None:
    demo = prepare_demo(tmp_path)
    markers = tmp_path / "markers"
    models = yaml.safe_load(demo.config.read_text())["models"]
    for name, good in (("glm-sim", True), ("minimax-sim", False), ("kimi-sim", False)):
        models[name]["script"] = str(rendezvous_script(tmp_path, name, markers, good))
    config = edit_config(demo, {"models." + k: v for k, v in models.items()})
    result, _ = run(demo, config)
    assert result.exit_code == 0
    from orchestrator.ledger import Ledger

    with Ledger(demo.repo / ".flow" / "ledger.sqlite") as ledger:
        rows = [r for r in ledger.rows(result.run_id) if r.stage == "build"]
    calls: dict[str, list[float]] = {}
    for r in rows:
        calls.setdefault(r.model, []).append(r.ts)
    assert sorted(calls) == ["glm-sim", "kimi-sim", "minimax-sim"]
    # Each builder's 2-second command lies between its first and second call: run one after
    # another, some builder's second call would come before another's first.
    assert max(ts[0] for ts in calls.values()) < min(ts[1] for ts in calls.values())
    for i in range(3):
        transcript = (result.report.parent / "transcripts" / f"build-{i}.jsonl").read_text()
        assert "[exit code 0]" in transcript


def test_failing_builder_does_not_lose_the_others(tmp_path: Path) -> None:
    demo = prepare_demo(tmp_path)
    broken = tmp_path / "broken.py"
    broken.write_text(
        "def crash(messages, tools, tool_choice):\n"
        "    raise RuntimeError('builder model fell over')\n"
    )
    config = edit_config(
        demo,
        {
            "models.minimax-sim": {
                "id": "scripted/minimax-sim",
                "script": f"{broken}:crash",
                "family": "minimax",
                "price": {"input": 0, "output": 0},
            }
        },
    )
    result, _sink = run(demo, config)
    assert result.exit_code == 0 and result.branch == "flow/add-median"
    summary = json.loads((result.report.parent / "run.json").read_text())
    failed = next(c for c in summary["candidates"] if c["index"] == 1)
    assert failed["status"] == "failed" and "fell over" in failed["error"]
    assert {c["index"]: c["status"] for c in summary["candidates"]} == {
        0: "ok",
        1: "failed",
        2: "empty",
    }


def test_nothing_acceptable_applies_nothing(tmp_path: Path) -> None:
    demo = prepare_demo(tmp_path)
    config = edit_config(
        demo, {"stages.builders": [{"model": "minimax-sim"}, {"model": "kimi-sim"}]}
    )
    before = repo_state(demo.repo)
    result, _ = run(demo, config)
    assert result.exit_code == 1 and result.outcome == "needs-you" and result.branch is None
    assert repo_state(demo.repo) == before
    assert "nothing was applied" in result.report.read_text()


def test_keep_worktrees(tmp_path: Path) -> None:
    demo = prepare_demo(tmp_path)
    result, _ = run(demo, keep_worktrees=True)
    kept = worktree_dir(Repo.open(demo.repo), result.run_id)
    assert (kept / "build-0" / "stats.py").read_text().count("def median") == 1


def test_real_http_path(tmp_path: Path, monkeypatch: Any) -> None:
    """Planner, builders and reviewers all served over HTTP through litellm, as in production."""
    demo = prepare_demo(tmp_path)
    monkeypatch.setenv("LOCAL_LLM_KEY", "sk-local-test-key-123456")
    with ChatServer(scripted_handler(demo_scripts(demo)), latency_s=0.3) as srv:
        data = http_config(demo, srv.base_url, api_key="LOCAL_LLM_KEY", max_concurrency=4)
        path = tmp_path / "http.yaml"
        path.write_text(yaml.safe_dump(data))
        assert parse_config(data).models["glm-sim"].api == "openai"
        result, _sink = run(demo, path)
        requests = list(srv.requests)
        peak = srv.max_in_flight
    assert result.exit_code == 0 and result.branch == "flow/add-median"
    assert "sorted(values)" in git(demo.repo, "show", "flow/add-median:stats.py")
    served = {r["model"] for r in requests}
    assert served == {"flash-sim", "glm-sim", "minimax-sim", "kimi-sim", "gpt-sim", "claude-sim"}
    assert 2 <= peak <= 4  # builders overlapped, within the provider's limit
    assert all(
        r.get("tool_choice", {}).get("function", {}).get("name") == "submit_review"
        for r in requests
        if r["model"] in ("gpt-sim", "claude-sim")
    )
    assert result.cost_usd > 0
    for path_ in result.report.parent.rglob("*"):
        if path_.is_file():
            assert "sk-local-test-key-123456" not in path_.read_text(errors="replace")
