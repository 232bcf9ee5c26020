"""Bad input: one or two lines naming the file, the field and the fix; exit 2; no traceback;
nothing left behind. Unusual but valid states simply work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import git, repo_state, untouched

from orchestrator.demo import DemoPaths, prepare_demo

Case = Callable[[DemoPaths, Path], tuple[list[str], Path, list[str]]]
"""Mutates a fresh demo; returns (flow arguments, working directory, expected substrings)."""


def spec_text(demo: DemoPaths, old: str, new: str) -> None:
    demo.spec.write_text(demo.spec.read_text().replace(old, new, 1))


def config_edit(demo: DemoPaths, change: Callable[[dict], None]) -> None:  # type: ignore[type-arg]
    data = yaml.safe_load(demo.config.read_text())
    change(data)
    demo.config.write_text(yaml.safe_dump(data))


def run_args(demo: DemoPaths, *extra: str) -> list[str]:
    return ["run", str(demo.spec), "--config", str(demo.config), *extra]


def spec_case(old: str, new: str, *expect: str) -> Case:
    def case(demo: DemoPaths, tmp: Path) -> tuple[list[str], Path, list[str]]:
        spec_text(demo, old, new)
        return run_args(demo), demo.repo, ["spec.md", *expect]

    return case


def config_case(change: Callable[[dict], None], *expect: str) -> Case:  # type: ignore[type-arg]
    def case(demo: DemoPaths, tmp: Path) -> tuple[list[str], Path, list[str]]:
        config_edit(demo, change)
        return run_args(demo), demo.repo, ["agents.yaml", *expect]

    return case


def _set(path: str, value: object) -> Callable[[dict], None]:  # type: ignore[type-arg]
    def change(data: dict) -> None:  # type: ignore[type-arg]
        node = data
        parts = path.split(".")
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        node[parts[-1]] = value

    return change


def empty_spec(demo: DemoPaths, tmp: Path) -> tuple[list[str], Path, list[str]]:
    demo.spec.write_text("")
    return run_args(demo), demo.repo, ["spec.md", "empty", "Title"]


def missing_spec(demo: DemoPaths, tmp: Path) -> tuple[list[str], Path, list[str]]:
    demo.spec.unlink()
    return run_args(demo), demo.repo, ["spec.md"]


def binary_spec(demo: DemoPaths, tmp: Path) -> tuple[list[str], Path, list[str]]:
    demo.spec.write_bytes(b"\xff\xfe\x00garbage")
    return run_args(demo), demo.repo, ["spec.md", "UTF-8"]


def config_yaml_error(demo: DemoPaths, tmp: Path) -> tuple[list[str], Path, list[str]]:
    demo.config.write_text("stages:\n  planner: {model: x\n")
    return run_args(demo), demo.repo, ["agents.yaml", "YAML"]


def config_missing(demo: DemoPaths, tmp: Path) -> tuple[list[str], Path, list[str]]:
    return (
        ["run", str(demo.spec), "--config", str(tmp / "nope.yaml")],
        demo.repo,
        ["nope.yaml", "--config"],
    )


def missing_key(demo: DemoPaths, tmp: Path) -> tuple[list[str], Path, list[str]]:
    def change(data: dict) -> None:  # type: ignore[type-arg]
        data["providers"] = {
            "p": {
                "api": "openai",
                "base_url": "http://127.0.0.1:9/v1",
                "api_key": "FLOW_BAD_INPUT_KEY",
            }
        }
        data["models"]["glm-sim"] = {
            "provider": "p",
            "id": "glm",
            "family": "zhipu",
            "price": {"input": 0, "output": 0},
        }

    config_edit(demo, change)
    return run_args(demo), demo.repo, ["FLOW_BAD_INPUT_KEY", "export"]


def missing_script(demo: DemoPaths, tmp: Path) -> tuple[list[str], Path, list[str]]:
    (demo.root / "scripts" / "planner.yaml").unlink()
    return run_args(demo), demo.repo, ["planner.yaml"]


def not_a_repo(demo: DemoPaths, tmp: Path) -> tuple[list[str], Path, list[str]]:
    plain = tmp / "plain"
    plain.mkdir()
    return run_args(demo, "--repo", str(plain)), plain, ["plain", "not", "git"]


def no_commits(demo: DemoPaths, tmp: Path) -> tuple[list[str], Path, list[str]]:
    fresh = tmp / "fresh"
    fresh.mkdir()
    git(fresh, "init", "-q")
    return run_args(demo, "--repo", str(fresh)), fresh, ["no commits yet"]


def bare_repo(demo: DemoPaths, tmp: Path) -> tuple[list[str], Path, list[str]]:
    bare = tmp / "bare.git"
    git(tmp, "clone", "-q", "--bare", str(demo.repo), str(bare))
    return run_args(demo, "--repo", str(bare)), bare, ["bare"]


def branch_exists(demo: DemoPaths, tmp: Path) -> tuple[list[str], Path, list[str]]:
    git(demo.repo, "branch", "flow/add-median")
    return run_args(demo), demo.repo, ["spec.md", "flow/add-median", "already exists"]


def flow_dir_blocked(demo: DemoPaths, tmp: Path) -> tuple[list[str], Path, list[str]]:
    (demo.repo / ".flow").write_text("not a directory\n")
    return run_args(demo), demo.repo, [".flow", "not writable"]


def unknown_profile(demo: DemoPaths, tmp: Path) -> tuple[list[str], Path, list[str]]:
    return run_args(demo, "--profile", "turbo"), demo.repo, ["--profile", "turbo"]


def bad_set(demo: DemoPaths, tmp: Path) -> tuple[list[str], Path, list[str]]:
    return run_args(demo, "--set", "budget.per_run_usd"), demo.repo, ["--set", "key.path=value"]


def bad_set_value(demo: DemoPaths, tmp: Path) -> tuple[list[str], Path, list[str]]:
    return run_args(demo, "--set", "budget.per_run_usd=lots"), demo.repo, ["budget.per_run_usd"]


def cli_case(*args: str, expect: list[str]) -> Case:
    def case(demo: DemoPaths, tmp: Path) -> tuple[list[str], Path, list[str]]:
        return [a.replace("SPEC", str(demo.spec)) for a in args], demo.repo, expect

    return case


def bad_until(demo: DemoPaths, tmp: Path) -> tuple[list[str], Path, list[str]]:
    return (
        ["batch", str(demo.spec), "--budget", "1", "--config", str(demo.config), "--until", "7h30"],
        demo.repo,
        ["--until", "HH:MM"],
    )


CASES: dict[str, Case] = {
    # the spec
    "front matter not closed": spec_case(
        "branch: flow/add-median\n---\n", "branch: flow/add-median\n", "front matter"
    ),
    "front matter YAML error": spec_case("checks:\n", "checks: [\n", "spec.md:"),
    "front matter not a mapping": spec_case(
        "title: Add a median function to stats\nchecks:\n  - python3 -m unittest -q\n"
        "branch: flow/add-median\n",
        "- just\n- a list\n",
        "key: value",
        "not a list",
    ),
    "unknown front matter key": spec_case("checks:", "chekcs:", "chekcs", "checks"),
    "builders wrong type": spec_case(
        "branch: flow/add-median", "branch: flow/add-median\nbuilders: many", "builders"
    ),
    "builders out of range": spec_case(
        "branch: flow/add-median", "branch: flow/add-median\nbuilders: 99", "builders"
    ),
    "invalid branch name": spec_case("branch: flow/add-median", "branch: flow/a b..c", "branch"),
    "empty check command": spec_case("  - python3 -m unittest -q", "  - ''", "checks"),
    "scenario without THEN": spec_case("- THEN it returns `2`\n", "", "THEN"),
    "empty spec": empty_spec,
    "missing spec file": missing_spec,
    "spec not UTF-8": binary_spec,
    "base does not exist": spec_case(
        "branch: flow/add-median", "branch: flow/add-median\nbase: no-such-branch", "base"
    ),
    "check program not installed": spec_case(
        "python3 -m unittest -q",
        "definitely-not-installed-tool --run",
        "checks",
        "definitely-not-installed-tool",
    ),
    # the config
    "unknown config key": config_case(
        _set("stages.planner.modle", "x"), "stages.planner.modle", "unknown key"
    ),
    "unknown top-level key": config_case(_set("budgets", {"per_run_usd": 1}), "budgets"),
    "wrong type": config_case(_set("budget.per_run_usd", "lots"), "budget.per_run_usd"),
    "negative budget": config_case(_set("budget.per_run_usd", -1), "budget.per_run_usd"),
    "unknown model in a stage": config_case(_set("stages.planner.model", "ghost"), "ghost"),
    "unknown provider": config_case(_set("models.glm-sim.provider", "nowhere"), "nowhere"),
    "unpriced model": config_case(
        lambda d: d.update(
            providers={"p": {"api": "openai", "base_url": "http://127.0.0.1:9/v1"}},
            models={**d["models"], "glm-sim": {"provider": "p", "id": "glm", "family": "zhipu"}},
        ),
        "models.glm-sim.price",
    ),
    "no reviewer of another family": config_case(
        _set("stages.reviewers", [{"model": "glm-sim"}]), "no reviewer of another family"
    ),
    "stages missing": config_case(lambda d: d.pop("stages"), "stages"),
    "config YAML error": config_yaml_error,
    "config file missing": config_missing,
    "key variable not set": missing_key,
    "scripted model's script missing": missing_script,
    # the repository
    "not a git repository": not_a_repo,
    "no commits yet": no_commits,
    "bare repository": bare_repo,
    "branch already exists": branch_exists,
    ".flow cannot be written": flow_dir_blocked,
    # the command line
    "builders 0": cli_case("run", "SPEC", "--builders", "0", expect=["--builders"]),
    "negative --budget": cli_case("run", "SPEC", "--budget", "-1", expect=["--budget"]),
    "unknown option": cli_case("run", "SPEC", "--bogus", expect=["--bogus"]),
    "unknown command": cli_case("rn", "SPEC", expect=["rn"]),
    "missing argument": cli_case("run", expect=["spec"]),
    "unknown profile": unknown_profile,
    "--set without =": bad_set,
    "--set bad value": bad_set_value,
    "--until not a time": bad_until,
    "resume unknown run": cli_case("resume", "20990101-000000-abcdef", expect=["no run"]),
}


def test_there_are_at_least_30_cases() -> None:
    assert len(CASES) >= 30


def flow(args: list[str], cwd: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLOW_CACHE_DIR": str(tmp / "cache"), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(tmp_path: Path, name: str) -> None:
    demo = prepare_demo(tmp_path)
    args, cwd, expect = CASES[name](demo, tmp_path)
    before = repo_state(demo.repo)
    out = flow(args, cwd, tmp_path)
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 2, out.stderr
    assert "Traceback" not in out.stderr
    for text in expect:
        assert text in out.stderr, (text, out.stderr)
    # Nothing left behind: the user's repository, no runs, no checkouts.
    assert repo_state(demo.repo) == before
    runs = demo.repo / ".flow" / "runs"
    assert not runs.is_dir() or not any(runs.iterdir())
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))
    debug = flow(["--debug", *args], cwd, tmp_path)
    if name not in (
        "builders 0",
        "negative --budget",
        "unknown option",
        "unknown command",
        "missing argument",
    ):
        assert "Traceback" in debug.stderr  # --debug shows where it came from


# ---- unusual but valid ---------------------------------------------------------------------


def ok_run(args: list[str], cwd: Path, tmp: Path) -> dict[str, object]:
    with untouched(cwd):
        out = flow([*args, "--json"], cwd, tmp)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def test_detached_head(tmp_path: Path) -> None:
    demo = prepare_demo(tmp_path)
    git(demo.repo, "checkout", "-q", "--detach", "HEAD")
    before = repo_state(demo.repo)
    assert ok_run(run_args(demo), demo.repo, tmp_path)["outcome"] == "applied"
    after = repo_state(demo.repo)
    assert after["head"] == before["head"] and after["status"] == before["status"]


def test_untracked_spec_inside_the_repository(tmp_path: Path) -> None:
    demo = prepare_demo(tmp_path)
    inside = demo.repo / "specs" / "median.md"
    inside.parent.mkdir()
    shutil.copy(demo.spec, inside)
    before = repo_state(demo.repo)
    ok_run(["run", str(inside), "--config", str(demo.config)], demo.repo, tmp_path)
    assert (
        git(demo.repo, "show", "--stat", "--format=", "flow/add-median").split()[0] == "stats.py"
    )  # the untracked spec did not leak into the commit
    assert {k: v for k, v in repo_state(demo.repo).items() if k != "branches"} == {
        k: v for k, v in before.items() if k != "branches"
    }


def test_repository_path_with_spaces(tmp_path: Path) -> None:
    spaced = tmp_path / "my projects" / "with spaces"
    spaced.mkdir(parents=True)
    demo = prepare_demo(spaced)
    assert " " in str(demo.repo)
    assert ok_run(run_args(demo), demo.repo, tmp_path)["branch"] == "flow/add-median"


def test_a_partial_clone_is_refused_with_the_command_that_completes_it(tmp_path: Path) -> None:
    """`clone --filter=blob:none` leaves the base's files undownloaded: builders would get a
    tree with files missing (or git would fetch them behind flow's back). flow refuses before
    any model call and names the command; after it, the same run validates."""
    (tmp_path / "src").mkdir()
    demo = prepare_demo(tmp_path / "src")
    git(demo.repo, "config", "uploadpack.allowFilter", "true")
    clone = tmp_path / "partial"
    subprocess.run(
        ["git", "clone", "-q", "--filter=blob:none", f"file://{demo.repo}", str(clone)],
        check=True,
    )
    # the checkout downloaded HEAD's blobs; a fresh base commit with a file never seen here
    git(demo.repo, "commit", "-q", "--allow-empty", "-m", "noop")
    (demo.repo / "big.txt").write_text("data\n")
    git(demo.repo, "add", "big.txt")
    git(demo.repo, "commit", "-q", "-m", "big")
    git(clone, "fetch", "-q", "origin")
    git(clone, "reset", "-q", "--soft", "origin/HEAD")  # HEAD moves, big.txt stays unfetched
    spec = tmp_path / "spec.md"
    spec.write_text(demo.spec.read_text())
    args = ("validate", str(spec), "--config", str(demo.config))
    with untouched(clone):
        out = subprocess.run(
            [sys.executable, "-m", "orchestrator", *args], cwd=clone, capture_output=True, text=True
        )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "is a partial clone: 1 objects of the base" in out.stderr
    assert "Traceback" not in out.stderr
    command = out.stderr.strip().splitlines()[-1].strip()
    assert command.startswith("git -c remote.origin.partialclonefilter=")
    subprocess.run(command.split(), cwd=clone, check=True, capture_output=True)
    again = subprocess.run(
        [sys.executable, "-m", "orchestrator", *args], cwd=clone, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stdout + again.stderr
