"""`flow init`: the detected test command per ecosystem, files that validate, never overwriting."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import MakeRepo, git

KEYS = {"DEEPSEEK_API_KEY": "sk-init-1", "ZHIPU_API_KEY": "sk-init-2", "MOONSHOT_API_KEY": "sk-3"}

ECOSYSTEMS: list[tuple[str, dict[str, str], str | None]] = [
    (
        "pytest",
        {"pyproject.toml": "[tool.pytest.ini_options]\ntestpaths = ['tests']\n", "tests/t.py": ""},
        "python -m pytest -q",
    ),
    ("pytest-conftest", {"conftest.py": "", "m.py": "x = 1\n"}, "python -m pytest -q"),
    (
        "unittest",
        {
            "setup.py": "from setuptools import setup\nsetup()\n",
            "tests/test_m.py": "import unittest\n",
        },
        "python -m unittest discover -q -s tests",
    ),
    ("npm", {"package.json": '{"name": "x", "scripts": {"test": "node t.js"}}'}, "npm test"),
    (
        "pnpm",
        {
            "package.json": '{"scripts": {"test": "vitest"}}',
            "pnpm-lock.yaml": "lockfileVersion: 9\n",
        },
        "pnpm test",
    ),
    (
        "yarn",
        {"package.json": '{"scripts": {"test": "jest"}}', "yarn.lock": "# yarn\n"},
        "yarn test",
    ),
    ("node-no-test", {"package.json": '{"scripts": {"build": "tsc"}}'}, None),
    ("go", {"go.mod": "module example.com/x\n\ngo 1.22\n", "x.go": "package x\n"}, "go test ./..."),
    ("cargo", {"Cargo.toml": '[package]\nname = "x"\nversion = "0.1.0"\n'}, "cargo test"),
    ("make", {"Makefile": "build:\n\ttrue\n\ntest: build\n\ttrue\n"}, "make test"),
    ("nothing", {"README.md": "hello\n"}, None),
]


def flow(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


@pytest.mark.parametrize(("name", "files", "expected"), ECOSYSTEMS, ids=[e[0] for e in ECOSYSTEMS])
def test_init_detects_the_test_command_and_validates(
    make_repo: MakeRepo, name: str, files: dict[str, str], expected: str | None
) -> None:
    root = make_repo(files)
    res = flow(root, "init")
    assert res.returncode == 0, res.stderr
    spec = (root / "specs" / "example.md").read_text()
    front = yaml.safe_load(spec.split("---")[1])
    assert front["checks"] == ([expected] if expected else [])
    config = yaml.safe_load((root / "agents.yaml").read_text())
    # Reviewers of other families than the builders, and a budget.
    assert config["budget"]["per_run_usd"] > 0 and config["stages"]["reviewers"]
    assert "DEEPSEEK_API_KEY" in (root / "agents.yaml").read_text()  # the presets' key variables
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "flow init")
    checked = flow(root, "validate", "specs/example.md", env=KEYS)
    program = expected.split()[0] if expected else None
    if program is None or program == "python" or shutil.which(program):
        assert checked.returncode == 0, checked.stderr
        assert checked.stdout.count("ok  ") == 2
        without = flow(root, "validate", "specs/example.md")
        assert without.returncode == 2 and "_API_KEY is not set" in without.stderr
    else:  # the ecosystem's tool is not on this machine: validate says so, nothing else
        assert checked.returncode == 2
        assert f"{program!r} is not installed" in checked.stderr, checked.stderr


def test_init_never_overwrites_and_says_which_exist(make_repo: MakeRepo) -> None:
    root = make_repo({"agents.yaml": "# mine\n", "README.md": "x\n"})
    mine = (root / "agents.yaml").read_bytes()
    res = flow(root, "init")
    assert res.returncode == 0, res.stderr
    assert (root / "agents.yaml").read_bytes() == mine
    assert "kept  agents.yaml" in res.stdout and "wrote specs/example.md" in res.stdout
    spec = (root / "specs" / "example.md").read_bytes()
    again = flow(root, "init")
    assert again.returncode == 2
    assert "agents.yaml and specs/example.md already exist" in again.stderr
    assert (root / "specs" / "example.md").read_bytes() == spec
    assert (root / "agents.yaml").read_bytes() == mine


def test_init_outside_a_repository_is_a_user_error(tmp_path: Path) -> None:
    res = flow(tmp_path, "init")
    assert res.returncode == 2 and "not inside a git repository" in res.stderr
    assert not (tmp_path / "agents.yaml").exists()


def test_init_is_fast(make_repo: MakeRepo) -> None:
    root = make_repo({"pyproject.toml": "[project]\nname='x'\n"})
    started = time.perf_counter()
    res = flow(root, "init")
    assert res.returncode == 0, res.stderr
    assert time.perf_counter() - started < 2.0
