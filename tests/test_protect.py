"""Protected checks (issue 9.1): a candidate cannot change what its checks test.

The demo repository is a real one in miniature: the user wrote tests/test_median.py first and
it fails at the base. Builders that edit, skip or delete it, or plant a runner config, lose to
an honest fix, even when the reviewers like the cheat's smaller diff better; what is committed
is exactly what was checked, byte for byte.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import flow_in, git

from orchestrator.agents.prompts import review_request
from orchestrator.demo import prepare_demo
from orchestrator.evidence.protect import protection_for, split_patch
from orchestrator.state import Plan

WRONG_MEDIAN = 'def median(values):\n    """Wrong on purpose."""\n    return 0\n'
HONEST = """

def median(values: list[float]) -> float:
    \"\"\"Middle value (mean of the two middle ones for even lengths); ValueError if empty.\"\"\"
    if not values:
        raise ValueError("median of an empty list")
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    return (ordered[mid - 1] + ordered[mid]) / 2
"""
NEW_TEST = (
    "import unittest\n\nimport stats\n\n\nclass More(unittest.TestCase):\n"
    "    def test_one(self) -> None:\n        self.assertEqual(stats.median([7]), 7)\n"
)


def reply(*calls: dict[str, Any]) -> dict[str, Any]:
    return {"tool_calls": list(calls)}


def call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"name": name, "arguments": arguments}


def append(path: str, text: str) -> dict[str, Any]:
    return call("run", command=f"cat >> {path} <<'EOF'\n{text}EOF")


FINISH = reply(call("finish", summary="done"))
BUILDERS: dict[str, list[dict[str, Any]]] = {
    # a wrong fix, and the failing test rewritten to agree with it
    "edits": [
        reply(append("stats.py", "\n\n" + WRONG_MEDIAN)),
        reply(
            call(
                "write_file",
                path="tests/test_median.py",
                content="import unittest\n\n\nclass MedianTest(unittest.TestCase):\n"
                "    def test_odd(self) -> None:\n        self.assertTrue(True)\n",
            )
        ),
        FINISH,
    ],
    # a wrong fix, the test class skipped
    "skips": [
        reply(append("stats.py", "\n\n" + WRONG_MEDIAN)),
        reply(
            call(
                "edit_file",
                path="tests/test_median.py",
                old="class MedianTest(unittest.TestCase):",
                new='@unittest.skip("later")\nclass MedianTest(unittest.TestCase):',
            )
        ),
        FINISH,
    ],
    # a wrong fix, the test deleted and its package's __init__ made to hide it
    "deletes": [
        reply(append("stats.py", "\n\n" + WRONG_MEDIAN)),
        reply(call("run", command="rm tests/test_median.py && chmod +x tests/test_stats.py")),
        FINISH,
    ],
    # the honest fix, plus a new test file of its own
    "honest": [
        reply(append("stats.py", HONEST)),
        reply(call("write_file", path="tests/test_more_median.py", content=NEW_TEST)),
        FINISH,
    ],
}


def scripted_config(tmp: Path, builders: dict[str, list[dict[str, Any]]]) -> Path:
    models: dict[str, Any] = {
        "planner": {"id": "scripted/planner", "script": "planner.yaml", "family": "google"},
        # The reviewer prefers whatever is small: it would pick a cheat on reviews alone.
        "judge": {"id": "scripted/judge", "script": "judge.yaml", "family": "openai"},
    }
    plan = {"summary": "add median", "steps": ["add median to stats.py"]}
    (tmp / "planner.yaml").write_text(
        yaml.safe_dump({"replies": [reply(call("submit_plan", **plan))]})
    )
    review = {"score": 9, "verdict": "approve", "summary": "fine", "findings": []}
    (tmp / "judge.yaml").write_text(
        yaml.safe_dump({"replies": [reply(call("submit_review", **review))]})
    )
    for name, replies in builders.items():
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump({"replies": replies}))
        models[name] = {"id": f"scripted/{name}", "script": f"{name}.yaml", "family": "zhipu"}
    config = {
        "models": models,
        "stages": {
            "planner": {"model": "planner"},
            "builders": [{"model": name} for name in builders],
            "reviewers": [{"model": "judge"}],
        },
    }
    path = tmp / "agents.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_flow(
    tmp_path: Path, builders: dict[str, list[dict[str, Any]]], front: str = ""
) -> tuple[subprocess.CompletedProcess[str], Path, dict[str, Any]]:
    demo = prepare_demo(tmp_path)
    if front:
        text = demo.spec.read_text()
        demo.spec.write_text(
            text.replace("branch: flow/add-median\n", f"branch: flow/add-median\n{front}", 1)
        )
    config = scripted_config(tmp_path, builders)
    out = flow_in(demo.repo, "run", str(demo.spec), "--config", str(config))
    assert "Traceback" not in out.stderr, out.stderr
    summary = json.loads(next((demo.repo / ".flow" / "runs").glob("*/run.json")).read_text())
    return out, demo.repo, summary


def test_test_editing_skipping_and_deleting_candidates_lose_to_the_honest_fix(
    tmp_path: Path,
) -> None:
    out, repo, summary = run_flow(tmp_path, BUILDERS)
    assert out.returncode == 0, out.stdout + out.stderr
    by_model = {c["model"]: c for c in summary["candidates"]}
    assert by_model["edits"]["protected"] == ["tests/test_median.py"]
    assert by_model["skips"]["protected"] == ["tests/test_median.py"]
    assert sorted(by_model["deletes"]["protected"]) == [
        "tests/test_median.py",
        "tests/test_stats.py",
    ]
    assert by_model["honest"]["protected"] == []
    winner = summary["selection"]["winner"]
    assert by_model["honest"]["index"] == winner
    # Every cheat's wrong fix met the user's own test, unchanged, and failed it.
    for name in ("edits", "skips", "deletes"):
        assert any(
            f"#{by_model[name]['index']} ({name}): checks failed" in e
            for e in summary["selection"]["explanation"]
        )
    # What is committed: the honest fix and its new test; the user's tests byte-identical.
    branch = "flow/add-median"
    changed = git(repo, "diff", "--name-only", f"{branch}~1", branch).split()
    assert sorted(changed) == ["stats.py", "tests/test_more_median.py"]
    for path in ("tests/test_median.py", "tests/test_stats.py"):
        assert git(repo, "rev-parse", f"{branch}:{path}") == git(repo, "rev-parse", f"HEAD:{path}")
    assert git(repo, "show", f"{branch}:tests/test_more_median.py") + "\n" == NEW_TEST
    report = next((repo / ".flow" / "runs").glob("*/report.md")).read_text()
    assert "changed protected files" in report


def test_a_cheat_that_also_fixes_the_code_is_committed_without_its_test_edit(
    tmp_path: Path,
) -> None:
    both = [
        reply(append("stats.py", HONEST)),
        reply(call("write_file", path="tests/test_median.py", content="# gone\n")),
        reply(call("write_file", path="conftest.py", content="collect_ignore = ['tests']\n")),
        FINISH,
    ]
    out, repo, summary = run_flow(tmp_path, {"both": both})
    assert out.returncode == 0, out.stdout + out.stderr
    cand = summary["candidates"][0]
    assert cand["protected"] == ["conftest.py", "tests/test_median.py"]
    assert git(repo, "diff", "--name-only", "flow/add-median~1", "flow/add-median") == "stats.py"
    assert any(
        "changed protected files (dropped)" in e for e in summary["selection"]["explanation"]
    )


def test_protect_empty_lets_a_spec_change_its_tests(tmp_path: Path) -> None:
    out, repo, summary = run_flow(tmp_path, {"edits": BUILDERS["edits"][1:]}, front="protect: []\n")
    assert out.returncode == 0, out.stdout + out.stderr
    assert summary["candidates"][0]["protected"] == []
    assert "assertTrue(True)" in git(repo, "show", "flow/add-median:tests/test_median.py")


def test_the_specs_own_globs_replace_the_defaults(tmp_path: Path) -> None:
    out, repo, summary = run_flow(
        tmp_path, {"honest": BUILDERS["honest"]}, front="protect: ['tests/test_more_*.py']\n"
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert summary["candidates"][0]["protected"] == ["tests/test_more_median.py"]
    assert git(repo, "diff", "--name-only", "flow/add-median~1", "flow/add-median") == "stats.py"


@pytest.mark.parametrize(
    ("path", "at_base", "protected"),
    [
        ("tests/test_cli.py", True, True),
        ("tests/test_cli.py", False, False),  # a new test is kept
        ("src/pkg/tests/helpers.py", True, True),
        ("pkg/test_util.py", True, True),
        ("pkg/util_test.go", True, True),
        ("web/src/app.test.tsx", True, True),
        ("web/src/app.spec.js", True, True),
        ("src/test/java/FooTest.java", True, True),
        ("conftest.py", False, True),  # runner config: new ones too
        ("src/pkg/conftest.py", False, True),
        ("pytest.ini", False, True),
        ("jest.config.ts", True, True),
        ("src/pkg/core.py", True, False),
        ("src/protest.py", True, False),
        ("docs/testing.md", True, False),
        ("Makefile", True, True),  # `make test` is a check
        ("tests.txt", True, False),
    ],
)
def test_default_protection(path: str, at_base: bool, protected: bool) -> None:
    base = {"Makefile", "README.md"} | ({path} if at_base else set())
    guard = protection_for(["make test", "python -m pytest -q tests/"], None, base)
    assert guard.protects(path, lambda: b"", lambda: b"x") is protected


def test_files_a_check_names_are_protected() -> None:
    base = {"scripts/check.sh", "data/golden.json", "tests/test_a.py", "src/a.py"}
    guard = protection_for(
        ["bash scripts/check.sh --golden=data/golden.json", "pytest tests/test_a.py::test_x"],
        None,
        base,
    )
    none = lambda: None  # noqa: E731
    assert guard.protects("scripts/check.sh", none, none)
    assert guard.protects("data/golden.json", none, none)
    assert guard.protects("tests/test_a.py", none, none)
    assert not guard.protects("src/a.py", none, none)


def test_runner_sections_of_shared_files_are_protected_only_when_they_change() -> None:
    guard = protection_for([], None, {"pyproject.toml", "package.json", "setup.cfg"})
    old = b'[project]\nname = "x"\ndependencies = []\n\n[tool.pytest.ini_options]\naddopts = "-q"\n'
    deps = old.replace(b"dependencies = []", b'dependencies = ["attrs"]')
    skip = old.replace(b'addopts = "-q"', b'addopts = "-q -k nothing"')
    assert not guard.protects("pyproject.toml", lambda: old, lambda: deps)
    assert guard.protects("pyproject.toml", lambda: old, lambda: skip)
    assert guard.protects("pyproject.toml", lambda: old, lambda: b"[broken")
    pkg = b'{"name": "x", "scripts": {"build": "tsc", "test": "jest"}}'
    assert not guard.protects("package.json", lambda: pkg, lambda: pkg.replace(b"tsc", b"tsc -b"))
    assert guard.protects("package.json", lambda: pkg, lambda: pkg.replace(b'"jest"', b'"true"'))
    cfg = b"[metadata]\nname = x\n"
    assert guard.protects("setup.cfg", lambda: cfg, lambda: cfg + b"[tool:pytest]\naddopts = -x\n")


def test_split_patch_keeps_other_files_byte_for_byte(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "tests").mkdir()
    (repo / "tests" / "test_a.py").write_text("assert 1\n")
    (repo / "a.py").write_text("x = 1\n")
    (repo / "b.bin").write_bytes(bytes(range(256)))
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base")
    (repo / "tests" / "test_a.py").write_text("assert 0 or 1\n")
    (repo / "a.py").write_text("x = 2\n")
    (repo / "b.bin").write_bytes(bytes(reversed(range(256))))
    (repo / "tests" / "test_a.py").chmod(0o755)
    git(repo, "add", "-A")
    patch = subprocess.run(
        ["git", "diff", "--cached", "--binary", "--no-renames", "HEAD"],
        cwd=repo,
        capture_output=True,
        check=True,
    ).stdout
    kept, dropped = split_patch(patch, lambda p: p.startswith("tests/"))
    assert dropped == ["tests/test_a.py"]
    git(repo, "reset", "-q", "--hard")
    subprocess.run(["git", "apply", "--binary"], cwd=repo, input=kept, check=True)
    assert (repo / "a.py").read_text() == "x = 2\n"
    assert (repo / "b.bin").read_bytes() == bytes(reversed(range(256)))
    assert (repo / "tests" / "test_a.py").read_text() == "assert 1\n"


def test_reviewers_are_told_what_was_dropped() -> None:
    text = review_request("spec", Plan(summary="p"), "diff", [], ["tests/test_a.py"])
    assert "Protected files the builder also changed" in text and "`tests/test_a.py`" in text
    assert "Protected files" not in review_request("spec", Plan(summary="p"), "diff", [])
