"""Agent CLI entries in agents.yaml: what validate and models say before anything runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_cli import flow, modules_after

from orchestrator.demo import DemoPaths, prepare_demo


@pytest.fixture
def demo(tmp_path: Path) -> DemoPaths:
    return prepare_demo(tmp_path)


def configure(demo: DemoPaths, **changes: Any) -> None:
    data = yaml.safe_load(demo.config.read_text())
    for key, value in changes.items():
        if key == "builders":
            data["stages"]["builders"] = value
        elif key == "reviewers":
            data["stages"]["reviewers"] = value
        else:
            data[key] = value
    demo.config.write_text(yaml.safe_dump(data))


def validate(demo: DemoPaths) -> Any:
    args = ["validate", str(demo.spec), "--config", str(demo.config), "--repo", str(demo.repo)]
    return flow(*args, cwd=demo.repo)


def test_a_cli_that_is_not_installed_fails_validate_naming_the_entry_and_the_fix(
    demo: DemoPaths,
) -> None:
    configure(
        demo,
        builders=[{"model": "glm-sim"}, {"agent": "claude", "model": "glm-sim"}],
        agents={"claude": {"command": str(demo.repo / "no-such-claude")}},
    )
    out = validate(demo)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "stages.builders.1.agent:" in out.stderr
    assert "is not installed; install it: npm install -g @anthropic-ai/claude-code" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) <= 2


def test_a_version_other_than_expected_is_refused(demo: DemoPaths) -> None:
    configure(
        demo,
        builders=[{"agent": "opencode", "model": "glm-sim"}],
        agents={"opencode": {"version": "0.0.1-never"}},
    )
    out = validate(demo)
    assert out.returncode == 2
    assert "agents.opencode.version: expected '0.0.1-never'" in out.stderr
    assert "1.18.33" in out.stderr  # what the installed one says


def test_validate_names_installed_clis_and_warns_of_an_unmetered_login(demo: DemoPaths) -> None:
    configure(
        demo,
        builders=[{"model": "glm-sim"}, {"agent": "opencode", "model": "glm-sim", "login": True}],
    )
    out = validate(demo)
    assert out.returncode == 0, out.stderr
    assert "agent opencode: 1.18.33" in out.stdout
    assert "used by stages.builders.1" in out.stdout
    assert "warning: stages.builders.1: opencode runs on your own login" in out.stdout
    assert "flow cannot meter or cap its calls" in out.stdout


@pytest.mark.parametrize(
    ("builders", "reviewers", "message"),
    [
        (
            [{"model": "glm-sim", "login": True}],
            None,
            "stages.builders.0.login: only an agent CLI runs on a login; add agent:",
        ),
        (
            [{"model": "glm-sim"}],
            [{"model": "claude-sim", "agent": "opencode"}],
            "stages.reviewers.0.agent: opencode cannot review",
        ),
        (
            [{"model": "glm-sim", "agent": "gemini"}],
            None,
            "stages.builders.0.agent: unknown agent CLI 'gemini'; known: opencode, claude, aider",
        ),
    ],
)
def test_agent_entries_that_cannot_work_are_refused(
    demo: DemoPaths, builders: list[Any], reviewers: list[Any] | None, message: str
) -> None:
    configure(demo, builders=builders, **({"reviewers": reviewers} if reviewers else {}))
    out = validate(demo)
    assert out.returncode == 2
    assert message in out.stderr, out.stderr


def test_models_lists_every_cli_with_its_version_and_dialect(demo: DemoPaths) -> None:
    configure(demo, builders=[{"model": "glm-sim"}, {"agent": "codex", "model": "glm-sim"}])
    out = flow("models", "--json", "--config", str(demo.config), "--repo", str(demo.repo))
    assert out.returncode == 0, out.stderr
    agents = {
        row["agent"]: row for row in map(json.loads, out.stdout.splitlines()) if "agent" in row
    }
    assert set(agents) == {"opencode", "claude", "aider", "codex"}
    assert agents["codex"]["version"] == "codex-cli 0.171.0"
    assert agents["codex"]["used_by"] == ["stages.builders.1"]
    assert agents["aider"]["version"] == "aider 0.86.2"
    assert all(row["problem"] is None for row in agents.values())


def test_validate_with_agents_does_not_import_litellm(demo: DemoPaths) -> None:
    configure(demo, builders=[{"agent": "opencode", "model": "glm-sim"}])
    loaded = modules_after(
        "validate", str(demo.spec), "--config", str(demo.config), "--repo", str(demo.repo)
    )
    assert not {m for m in loaded if m.startswith("litellm")}
