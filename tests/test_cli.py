"""The command line as a user meets it: exit codes, one-line errors, fast commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import yaml
from conftest import git, untouched

from orchestrator.demo import DemoPaths, prepare_demo


def flow(
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    guard = untouched(cwd) if cwd is not None and (cwd / ".git").exists() else nullcontext()
    with guard:
        return subprocess.run(
            [sys.executable, "-m", "orchestrator", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            env={**os.environ, **(env or {})},
            timeout=120,
        )


@pytest.fixture
def demo(tmp_path: Path) -> DemoPaths:
    return prepare_demo(tmp_path)


def modules_after(*argv: str) -> set[str]:
    code = (
        "import sys\nfrom orchestrator.cli import app\n"
        f"try:\n    app({list(argv)!r})\nexcept SystemExit:\n    pass\n"
        "print('MODULES:' + ' '.join(m for m in sys.modules if m.split('.')[0] in "
        "('litellm', 'langgraph', 'openai')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("MODULES:"))
    return set(line.removeprefix("MODULES:").split())


def test_help_and_validate_do_not_import_litellm(demo: DemoPaths) -> None:
    assert modules_after("--help") == set()
    loaded = modules_after(
        "validate", str(demo.spec), "--config", str(demo.config), "--repo", str(demo.repo)
    )
    assert not {m for m in loaded if m.startswith("litellm")}


def test_validate_ok(demo: DemoPaths) -> None:
    out = flow("validate", str(demo.spec), "--config", str(demo.config), cwd=demo.repo)
    assert out.returncode == 0, out.stderr
    assert "Add a median function to stats" in out.stdout and "flow/add-median" in out.stdout


def test_bad_config_is_one_clear_line(demo: DemoPaths) -> None:
    data = yaml.safe_load(demo.config.read_text())
    data["stages"]["builders"][0]["cuont"] = 2
    demo.config.write_text(yaml.safe_dump(data))
    out = flow("validate", str(demo.spec), "--config", str(demo.config), cwd=demo.repo)
    assert out.returncode == 2
    assert out.stderr.count("\n") <= 2 and "Traceback" not in out.stderr
    assert str(demo.config) in out.stderr and "stages.builders.0.cuont" in out.stderr
    debug = flow("--debug", "validate", str(demo.spec), "--config", str(demo.config), cwd=demo.repo)
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_missing_key_variable_is_named(demo: DemoPaths) -> None:
    data = yaml.safe_load(demo.config.read_text())
    data["providers"] = {
        "plan": {
            "api": "openai",
            "base_url": "http://127.0.0.1:9/v1",
            "api_key": "FLOW_TEST_MISSING_KEY",
        }
    }
    data["models"]["glm-sim"] = {
        "provider": "plan",
        "id": "glm-4.7",
        "family": "zhipu",
        "price": {"input": 0, "output": 0},
    }
    demo.config.write_text(yaml.safe_dump(data))
    out = flow("run", str(demo.spec), "--config", str(demo.config), cwd=demo.repo)
    assert out.returncode == 2
    assert "FLOW_TEST_MISSING_KEY" in out.stderr and "Traceback" not in out.stderr
    assert not (demo.repo / ".flow" / "runs").exists()


def test_existing_branch_is_refused_before_any_work(demo: DemoPaths) -> None:
    git(demo.repo, "branch", "flow/add-median")
    out = flow("run", str(demo.spec), "--config", str(demo.config), cwd=demo.repo)
    assert out.returncode == 2
    assert "flow/add-median" in out.stderr and "already exists" in out.stderr
    assert not (demo.repo / ".flow" / "runs").exists()


def test_run_json_events(demo: DemoPaths) -> None:
    out = flow("run", str(demo.spec), "--config", str(demo.config), "--json", cwd=demo.repo)
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished"
    assert {"builder", "check", "review", "selected", "model_call"} <= set(kinds)
    assert events[-1]["outcome"] == "applied" and events[-1]["branch"] == "flow/add-median"


def test_run_exit_code_1_when_nothing_acceptable(demo: DemoPaths) -> None:
    data = yaml.safe_load(demo.config.read_text())
    data["stages"]["builders"] = [{"model": "kimi-sim"}]
    demo.config.write_text(yaml.safe_dump(data))
    out = flow("run", str(demo.spec), "--config", str(demo.config), cwd=demo.repo)
    assert out.returncode == 1
    assert "nothing applied" in out.stdout


def test_demo_command(tmp_path: Path) -> None:
    out = flow("demo", "--json", "--keep", env={"TMPDIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    last = json.loads(out.stdout.splitlines()[-1])
    assert last["outcome"] == "applied"
    repo = next(tmp_path.glob("flow-demo-*/repo"))
    assert "def median" in git(repo, "show", "flow/add-median:stats.py")


def _commands() -> list[list[str]]:
    import typer.main

    from orchestrator.cli import app

    out: list[list[str]] = []

    def walk(cmd: object, path: list[str]) -> None:
        out.append(path)
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return out


def test_every_help_page_is_plain_and_every_option_explained() -> None:
    import re

    import typer.main
    from typer.testing import CliRunner

    from orchestrator.cli import app

    group = typer.main.get_command(app)
    commands = _commands()
    assert {"validate", "run", "batch", "init"} <= {c[0] for c in commands if c}
    for path in commands:
        for flag in ("--help", "-h"):
            res = CliRunner().invoke(app, [*path, flag], terminal_width=200)
            assert res.exit_code == 0, (path, res.output)
            shown = res.output
            # No Python types: <bool>, <list[Path]>, <str>, nor typer's {required} braces.
            assert not re.search(r"<[a-zA-Z_\[\], |]+>|\{\w+\}", shown), (path, shown)
        cmd: typer.core.TyperGroup | typer.core.TyperCommand = group
        for name in path:
            cmd = cmd.commands[name]  # type: ignore[union-attr]
        ctx = cmd.make_context("flow", [*path, "--help"], resilient_parsing=True)
        for param in cmd.get_params(ctx):
            # Every option and argument says what it is for, and is on the help page.
            assert (getattr(param, "help", "") or "").strip(), f"flow {path} {param.opts}: no help"
            if param.param_type_name == "option":
                assert param.opts[0] in shown


def test_version_and_bare_commands_print_help_once() -> None:
    from importlib.metadata import version

    res = flow("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"flow {version('flow-orchestrator')}"
    for args in ((), ("config",)):
        res = flow(*args)
        assert res.returncode == 0, res.stderr
        assert res.stdout.count("Usage:") == 1, res.stdout
    # typer finds the shell among flow's parent processes (shellingham): run flow from a bash
    # that stays its parent, whatever started pytest.
    res = subprocess.run(
        ["bash", "-c", f"{sys.executable} -m orchestrator --show-completion; true"],
        capture_output=True,
        text=True,
        env={**os.environ, "SHELL": "/bin/bash"},
        timeout=60,
    )
    assert "_flow_completion" in res.stdout, res.stderr


def test_models_and_config_show_work_outside_a_repository(tmp_path: Path) -> None:
    home = tmp_path / "xdg"
    (home / "flow").mkdir(parents=True)
    (home / "flow" / "agents.yaml").write_text(
        "models:\n  m: {id: local-m, provider: deepseek, price: {input: 1, output: 2}}\n"
        "  r: {id: local-r, provider: zhipu, price: {input: 1, output: 2}}\n"
        "stages:\n  planner: {model: m}\n  builders: [{model: m}]\n  reviewers: [{model: r}]\n"
    )
    outside = tmp_path / "plain-dir"
    outside.mkdir()
    env = {"XDG_CONFIG_HOME": str(home)}
    shown = flow("config", "show", cwd=outside, env=env)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert any(ln.startswith("models.m.id = local-m") and "# user " in ln for ln in lines)
    # Defaults are shown too, marked as such; values set by a layer are not marked default.
    assert any(ln.startswith("builder.max_turns = 40") and ln.endswith("# default") for ln in lines)
    assert not any(ln.startswith("models.m.id") and ln.endswith("# default") for ln in lines)
    listed = flow("models", "--json", cwd=outside, env=env)
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(ln) for ln in listed.stdout.splitlines()]
    assert {r["name"] for r in rows if r["kind"] == "model"} == {"m", "r"}


def test_status_report_and_show_import_neither_litellm_nor_langgraph(demo: DemoPaths) -> None:
    done = flow("run", str(demo.spec), "--config", str(demo.config), "--repo", str(demo.repo))
    assert done.returncode == 0, done.stderr
    heavy = ("litellm", "langgraph", "langchain_core", "openai")
    for argv in (
        ("status", "--repo", str(demo.repo)),
        ("report", "last", "--json", "--repo", str(demo.repo)),
        ("show", "last", "0", "--repo", str(demo.repo)),
    ):
        loaded = modules_after(*argv)
        assert not {m for m in loaded if m.split(".")[0] in heavy}, (argv, loaded)
