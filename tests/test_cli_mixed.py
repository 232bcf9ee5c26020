"""One spec, built by OpenCode, Claude Code and flow's own loop, reviewed by Codex: every
call through flow's door, the winner picked by the evidence (checks first, then reviews)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import git, untouched

from orchestrator.config import load_config
from orchestrator.demo import prepare_demo
from orchestrator.events import BuilderUpdate, CheckDone, ReviewDone
from orchestrator.ledger import Ledger
from orchestrator.llm.messages import Message, ToolSpec
from orchestrator.llm.scripted import ScriptedModel
from orchestrator.protocols import ListSink
from orchestrator.runner import RunOptions, run_spec
from orchestrator.spec import load_spec
from orchestrator.testing import ChatServer, scripted_handler
from orchestrator.workspace import Repo
from tests.clis import claude_scripts, scripts

KEY = "sk-mixed-run-provider-key-93d1"
MARK = "# median by claude"
GOOD = (
    '"""Small statistics helpers."""\n\n\n'
    "def mean(values: list[float]) -> float:\n"
    '    """Arithmetic mean; raises ValueError for an empty list."""\n'
    "    if not values:\n"
    '        raise ValueError("mean of an empty list")\n'
    "    return sum(values) / len(values)\n\n\n"
    f"{MARK}\n"
    "def median(values: list[float]) -> float:\n"
    "    if not values:\n"
    '        raise ValueError("median of an empty list")\n'
    "    ordered = sorted(values)\n"
    "    mid = len(ordered) // 2\n"
    "    if len(ordered) % 2:\n"
    "        return ordered[mid]\n"
    "    return (ordered[mid - 1] + ordered[mid]) / 2\n"
)


def claude_builds(messages: list[Message], tools: list[ToolSpec], choice: str | None) -> Any:
    if "Write" not in {t.name for t in tools}:
        return {"content": "A title"}
    path = f"{claude_scripts.checkout_of(messages)}/stats.py"
    if claude_scripts.turn(messages) == 0:  # Claude Code writes only files it has read
        return {"tool_calls": [{"name": "Read", "arguments": {"file_path": path}}]}
    if claude_scripts.turn(messages) == 1:
        return {
            "tool_calls": [{"name": "Write", "arguments": {"file_path": path, "content": GOOD}}]
        }
    return {"content": "Done: median added."}


def codex_reviews(messages: list[Message], tools: list[ToolSpec], choice: str | None) -> Any:
    """Scores the candidate by what it reads in the prompt's diff: Claude's higher."""
    prompt = "\n".join(m.content or "" for m in messages)
    score = 9.0 if MARK in prompt else 5.0
    return {"content": json.dumps({"score": score, "verdict": "approve", "summary": "ok"})}


@pytest.fixture(autouse=True)
def key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_TEST_KEY", KEY)


def test_mixed_cli_and_loop_builders_with_a_cli_reviewer(tmp_path: Path) -> None:
    demo = prepare_demo(tmp_path)
    data = yaml.safe_load(demo.config.read_text())
    upstream = {
        "glm-4.7": ScriptedModel("glm-4.7", scripts.opencode_bad_stats),
        "claude-up": ScriptedModel("claude-up", claude_builds),
        "codex-up": ScriptedModel("codex-up", codex_reviews),
    }
    with ChatServer(scripted_handler(upstream)) as server:
        data["providers"] = {
            "local": {
                "api": "openai",
                "base_url": server.base_url,
                "api_key": "LOCAL_TEST_KEY",
                "max_concurrency": 2,
            }
        }
        for name, family in (
            ("glm-4.7", "zhipu-cli"),
            ("claude-up", "anthropic"),
            ("codex-up", "openai"),
        ):
            data["models"][name] = {
                "provider": "local",
                "id": name,
                "family": family,
                "price": {"input": 1.0, "output": 2.0},
            }
        data["stages"]["builders"] = [
            {"agent": "opencode", "model": "glm-4.7"},
            {"agent": "claude", "model": "claude-up"},
            {"model": "glm-sim"},
        ]
        data["stages"]["reviewers"] = [{"agent": "codex", "model": "codex-up"}]
        demo.config.write_text(yaml.safe_dump(data))
        sink = ListSink()
        with untouched(demo.repo):
            result = asyncio.run(
                run_spec(
                    load_spec(demo.spec),
                    load_config(demo.config),
                    Repo.open(demo.repo),
                    sink,
                    RunOptions(),
                )
            )
        max_in_flight = server.max_in_flight
        served = [r.get("model") for r in server.requests]
    # Every upstream model was called, never more than the provider allows at once.
    assert {"glm-4.7", "claude-up", "codex-up"} <= set(served)
    assert max_in_flight <= 2
    assert server.authorizations and all(KEY in a for a in server.authorizations)
    # OpenCode's wrong median failed the checks; Claude's and the loop's passed, and Codex
    # reviewed both (read-only, structured): Claude's scored higher and won.
    last = {e.index: e for e in sink.events if isinstance(e, BuilderUpdate)}
    assert [last[i].status for i in range(3)] == ["ok", "ok", "ok"]
    assert last[0].turns >= 2 and last[1].turns >= 2  # counted by their proxies
    checks = {e.candidate: e.passed for e in sink.events if isinstance(e, CheckDone)}
    assert checks == {0: False, 1: True, 2: True}
    reviews = [e for e in sink.events if isinstance(e, ReviewDone)]
    assert sorted((e.candidate, e.score) for e in reviews) == [(1, 9.0), (2, 5.0)]
    assert all(e.reviewer == "codex-up" and e.error is None for e in reviews)
    assert result.outcome == "applied", result
    stats = git(demo.repo, "show", f"{result.branch}:stats.py")
    assert MARK in stats
    # The ledger has every stage's calls, the CLI reviewer's included, at the door's prices.
    rows = Ledger(demo.repo / ".flow" / "ledger.sqlite").rows(result.run_id)
    stages = {(r.stage, r.model) for r in rows if r.outcome == "ok"}
    assert {("build", "glm-4.7"), ("build", "claude-up"), ("review", "codex-up")} <= stages
