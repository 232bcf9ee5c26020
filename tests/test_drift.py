"""Base drift (issue 9.6): the user commits to the base branch while a run builds.

Every test runs the real `flow` CLI on the demo repository. The demo's good builder is replaced
by tests/drift_user.py, which plays the user inside the flow process: before the builder's
first reply, it makes a real `git commit` on main in the user's checkout. flow must then

- by default, commit on the old base (where the checks ran) and say that main moved, by how
  many commits, and whether the winner also applies on main's tip;
- with `apply: {onto: tip}` or `--onto-tip`, commit on the tip only when the winner applies
  there and the spec's checks pass there, in a fresh checkout; else commit on the base, where
  the checks passed, and say why not on the tip;

and touch nothing of the user's repository before or after the user's commit but its branch.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import assert_untouched, git, repo_state

from orchestrator.demo import DemoPaths, prepare_demo
from orchestrator.workspace import Repo

ONTO_BASE_FRONT = "branch: flow/add-median\napply: {onto: base}\n"
ONTO_TIP_FRONT = "branch: flow/add-median\napply: {onto: tip}\n"
HOOK = Path(__file__).resolve().parent / "drift_user.py"
BRANCH = "flow/add-median"
WINNER = 0  # the demo's good builder, the one that waits for the user's commit
# The user's commits. None of them is in the base the builders saw.
NOTES = {"NOTES.md": "Released 1.1 overnight.\n"}
# A new test of the user's that only the winner's median passes: the tip runs one test more.
PASSING_TEST = {
    "tests/test_tip.py": "import unittest\n\nimport stats\n\n\n"
    "class TipTest(unittest.TestCase):\n"
    "    def test_even_pair(self) -> None:\n"
    "        self.assertEqual(stats.median([9, 1, 4, 2]), 3)\n",
}
# The user decided overnight that median means the low median: the winner fails it.
BREAKING_TEST = {
    "tests/test_low_median.py": "import unittest\n\nimport stats\n\n\n"
    "class LowMedianTest(unittest.TestCase):\n"
    "    def test_low(self) -> None:\n"
    "        self.assertEqual(stats.median([1, 2]), 1)\n",
}
# The line the winner's diff uses as context, changed: its diff cannot apply on the tip.
CONFLICT = {
    "stats.py": '"""Small statistics helpers."""\n\n\n'
    "def mean(values: list[float]) -> float:\n"
    '    """Arithmetic mean; raises ValueError for an empty list."""\n'
    "    if not values:\n"
    '        raise ValueError("mean of an empty list")\n'
    "    return float(sum(values)) / len(values)\n",
}


class Drifted:
    """What one drifting run left: the CLI's output, the repository, the run's summary."""

    def __init__(self, demo: DemoPaths, out: subprocess.CompletedProcess[str], base: str):
        self.demo, self.out, self.base = demo, out, base
        self.repo = demo.repo
        self.tip = git(self.repo, "rev-parse", "main")
        runs = sorted((self.repo / ".flow" / "runs").glob("*/run.json"))
        self.summaries = [json.loads(p.read_text()) for p in runs]
        self.reports = [p.with_name("report.md").read_text() for p in runs]

    @property
    def summary(self) -> dict[str, Any]:
        return self.summaries[0]

    @property
    def report(self) -> str:
        return self.reports[0]

    @property
    def output(self) -> str:
        return self.out.stdout + self.out.stderr

    def parent(self, branch: str = BRANCH) -> str:
        return git(self.repo, "rev-parse", f"{branch}^")

    def branches(self) -> list[str]:
        return git(self.repo, "for-each-ref", "--format=%(refname)", "refs/heads").split()

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.stdout.splitlines() if line.startswith("{")]

    def warnings(self) -> list[str]:
        return [
            e["message"]
            for e in self.events()
            if e["kind"] == "notice" and e.get("level") == "warning"
        ]


def demo_with_hook(tmp_path: Path, onto: str | None = None) -> DemoPaths:
    demo = prepare_demo(tmp_path)
    config = yaml.safe_load(demo.config.read_text())
    config["models"]["glm-sim"]["script"] = f"{HOOK}:builder"
    if onto is not None:
        config["apply"] = {"onto": onto}
    demo.config.write_text(yaml.safe_dump(config))
    return demo


def drifting(tmp_path: Path, demo: DemoPaths, user_files: dict[str, str], *args: str) -> Drifted:
    """Run `flow ARGS` while the user commits `user_files` to main; hold flow to untouched."""
    work = tmp_path / "user"
    work.mkdir(parents=True)
    job = {
        "repo": str(demo.repo),
        "files": user_files,
        "message": "user: overnight work",
        "before": str(work / "before.pickle"),
        "after": str(work / "after.pickle"),
        "done": str(work / "done"),
        "builder_script": str(demo.root / "scripts" / "builder_good.yaml"),
    }
    (work / "job.json").write_text(json.dumps(job))
    base = git(demo.repo, "rev-parse", "HEAD")
    start = repo_state(demo.repo)
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator", *args, "--json"],
        cwd=demo.repo,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "FLOW_TEST_DRIFT_JOB": str(work / "job.json")},
    )
    assert "Traceback" not in out.stderr, out.stderr
    assert (work / "done").exists(), "the user's commit was never made"
    # Up to the user's commit flow changed nothing; after it, nothing but its new branches.
    assert pickle.loads((work / "before.pickle").read_bytes()) == start
    assert_untouched(pickle.loads((work / "after.pickle").read_bytes()), repo_state(demo.repo))
    return Drifted(demo, out, base)


def run_args(demo: DemoPaths, *extra: str) -> tuple[str, ...]:
    return ("run", str(demo.spec), "--config", str(demo.config), *extra)


def ran(output: str) -> str:
    return next(line for line in output.splitlines() if line.startswith("Ran "))


def flow(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_by_default_the_branch_starts_from_the_old_base_and_the_report_says_main_moved(
    tmp_path: Path,
) -> None:
    demo = demo_with_hook(tmp_path)
    run = drifting(tmp_path, demo, NOTES, *run_args(demo))
    assert run.out.returncode == 0, run.output
    assert run.tip != run.base and git(run.repo, "rev-parse", "main^") == run.base
    assert run.parent() == run.base
    assert not Repo.open(run.repo).has_file(BRANCH, "NOTES.md")
    drift = run.summary["drift"]
    assert run.summary["outcome"] == "applied"
    assert run.summary["base_branch"] == "main"
    assert drift["branch"] == "main" and drift["base"] == run.base and drift["tip"] == run.tip
    assert drift["commits"] == 1
    assert drift["applies"] is True and drift["committed_on"] == "base"
    assert drift["checks"] == []  # reporting only: nothing re-run
    assert run.summary["applied"]["parent"] == run.base
    assert "base drift: main moved by 1 commit during the run" in run.report
    assert "also applies cleanly on its tip" in run.report
    notices = [e["message"] for e in run.events() if e["kind"] == "notice"]
    assert any("main moved by 1 commit" in m and "committed on the base" in m for m in notices)
    # `flow status` says it too, in words and in JSON.
    status = flow(run.repo, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"base moved: {run.summary['run_id']}: main moved by 1 commit" in status.stdout
    rows = [json.loads(line) for line in flow(run.repo, "status", "--json").stdout.splitlines()]
    (row,) = [r for r in rows if r["type"] == "run"]
    assert "main moved by 1 commit" in row["base_drift"]


def test_by_default_a_conflicting_tip_is_reported_and_the_base_still_gets_the_commit(
    tmp_path: Path,
) -> None:
    demo = demo_with_hook(tmp_path)
    run = drifting(tmp_path, demo, CONFLICT, *run_args(demo))
    assert run.out.returncode == 0, run.output
    assert run.parent() == run.base
    drift = run.summary["drift"]
    assert drift["applies"] is False and drift["why"] and drift["committed_on"] == "base"
    assert "does not apply cleanly on its tip" in run.report
    assert any("does not apply cleanly" in m for m in run.warnings())


def test_onto_tip_commits_on_the_tip_after_its_checks_pass_there(tmp_path: Path) -> None:
    demo = demo_with_hook(tmp_path, onto="tip")
    run = drifting(tmp_path, demo, PASSING_TEST, *run_args(demo))
    assert run.out.returncode == 0, run.output
    assert run.summary["outcome"] == "applied"
    assert run.parent() == run.tip != run.base
    # The branch is the user's tip plus the winner's median, nothing else.
    assert git(run.repo, "diff", "--name-only", run.tip, BRANCH).split() == ["stats.py"]
    assert git(run.repo, "diff", "--name-only", run.base, BRANCH).split() == [
        "stats.py",
        "tests/test_tip.py",
    ]
    drift = run.summary["drift"]
    assert drift["onto_tip"] is True and drift["committed_on"] == "tip"
    assert run.summary["applied"]["parent"] == run.tip
    # The checks really ran on the tip's content: the user's new test, which exercises the
    # winner's median, is one test more than on the base, and it passed.
    (tip_check,) = drift["checks"]
    base_checks = next(c for c in run.summary["checks"] if c["candidate"] == WINNER)
    assert ran(base_checks["results"][0]["output_tail"]).startswith("Ran 5 tests")
    assert tip_check["passed"] and ran(tip_check["output_tail"]).startswith("Ran 6 tests")
    assert f"on the tip of `main`, `{run.tip[:12]}`" in run.report
    assert "## Checks on the tip of `main`" in run.report
    assert "committed on the tip" in run.report


def test_onto_tip_where_the_users_commit_breaks_the_winner_commits_on_the_base(
    tmp_path: Path,
) -> None:
    demo = demo_with_hook(tmp_path)
    run = drifting(tmp_path, demo, BREAKING_TEST, *run_args(demo, "--onto-tip"))
    assert run.out.returncode == 0, run.output
    assert run.summary["outcome"] == "applied"
    assert run.parent() == run.base  # where its checks passed, not the tip where they fail
    drift = run.summary["drift"]
    assert drift["onto_tip"] is True and drift["applies"] is True
    assert drift["committed_on"] == "base"
    (tip_check,) = drift["checks"]
    assert not tip_check["passed"] and "test_low" in tip_check["output_tail"]
    why = "check `python3 -m unittest -q` failed (exit 1) there; committed on the base"
    assert why in drift["note"]
    assert "there; committed on the base" in run.report
    tip_section = run.report.split("## Checks on the tip of `main`", 1)[1].split("\n## ", 1)[0]
    assert "fail (exit 1)" in tip_section and "test_low" in tip_section
    assert any(why in m for m in run.warnings()), run.warnings()


def test_onto_tip_with_a_conflicting_tip_commits_on_the_base_and_touches_nothing(
    tmp_path: Path,
) -> None:
    demo = demo_with_hook(tmp_path)  # the spec asks for the tip this time
    spec_text = demo.spec.read_text()
    demo.spec.write_text(spec_text.replace("branch: flow/add-median\n", ONTO_TIP_FRONT, 1))
    repo = demo.repo
    # The user's checkout is busy: a stash, a staged file, an edited file, an untracked file.
    (repo / "README.md").write_text("stashed edit\n")
    git(repo, "stash", "-q")
    (repo / "staged.txt").write_text("staged, not committed\n")
    git(repo, "add", "staged.txt")
    (repo / "README.md").write_text("edited, not staged\n")
    (repo / "scratch.txt").write_text("untracked\n")
    objects_before = set(git(repo, "rev-list", "--all", "--objects").splitlines())
    run = drifting(tmp_path, demo, CONFLICT, *run_args(demo))
    assert run.out.returncode == 0, run.output
    assert run.summary["outcome"] == "applied"
    assert run.branches() == [f"refs/heads/{BRANCH}", "refs/heads/main"]
    assert run.parent() == run.base
    # No commit made but the user's, the kept candidates and the branch.
    run_id = run.summary["run_id"]
    kept = git(repo, "for-each-ref", "--format=%(refname)", "refs/flow").split()
    assert f"refs/flow/{run_id}/{WINNER}" in kept
    commits = set(git(repo, "rev-list", "--all").splitlines())
    made = {line.split()[0] for line in commits} - {line.split()[0] for line in objects_before}
    ours = {git(repo, "rev-parse", ref) for ref in kept} | {git(repo, "rev-parse", BRANCH)}
    assert made == {run.tip} | ours
    assert git(repo, "stash", "list").count("\n") == 0 and "stash@{0}" in git(repo, "stash", "list")
    assert git(repo, "diff", "--cached", "--name-only") == "staged.txt"
    assert (repo / "README.md").read_text() == "edited, not staged\n"
    drift = run.summary["drift"]
    assert drift["applies"] is False and drift["committed_on"] == "base" and drift["why"]
    assert drift["checks"] == []  # nothing to check where it does not apply
    assert "does not apply cleanly on its tip" in drift["note"]
    assert "committed on the base" in drift["note"]
    assert any("does not apply cleanly" in m for m in run.warnings())


def test_a_batch_with_onto_tip_says_which_run_saw_the_base_move(tmp_path: Path) -> None:
    demo = demo_with_hook(tmp_path)
    second = demo.root / "spec2.md"
    second.write_text(
        demo.spec.read_text().replace("branch: flow/add-median", "branch: flow/add-median-2")
    )
    args = ("batch", str(demo.spec), str(second), "--budget", "5", "--parallel", "1")
    run = drifting(tmp_path, demo, NOTES, *args, "--config", str(demo.config), "--onto-tip")
    assert run.out.returncode == 0, run.output
    by_branch = {s["branch"]: s for s in run.summaries}
    # The first spec ran while main moved and went onto the tip; the second started there.
    assert by_branch[BRANCH]["drift"]["committed_on"] == "tip"
    assert run.parent(BRANCH) == run.tip
    assert by_branch["flow/add-median-2"]["drift"] is None
    assert run.parent("flow/add-median-2") == run.tip
    finished = next(e for e in run.events() if e["kind"] == "batch_finished")
    text = Path(finished["report"]).read_text()
    assert "## Base moved during the run" in text
    moved = text.split("## Base moved during the run", 1)[1].split("##", 1)[0]
    assert str(demo.spec) in moved and "committed on the tip" in moved
    assert str(second) not in moved


def test_the_base_branch_is_named_only_for_branches(make_repo: Any) -> None:
    root = make_repo()
    git(root, "branch", "dev")
    git(root, "tag", "v1")
    repo = Repo.open(root)
    sha = git(root, "rev-parse", "HEAD")
    assert repo.branch_of("HEAD") == "main"
    assert repo.branch_of("dev") == "dev"
    assert repo.branch_of("refs/heads/dev") == "dev"
    for rev in ("v1", sha, "main~0", "-h", "nope"):
        assert repo.branch_of(rev) is None, rev
    git(root, "tag", "dev")  # now ambiguous: a tag and a branch of that name
    assert repo.branch_of("dev") is None
    git(root, "checkout", "-q", "--detach")
    assert repo.branch_of("HEAD") is None


@pytest.mark.parametrize("value", ["tips", "TIP", "1"])
def test_apply_onto_is_validated(tmp_path: Path, value: str) -> None:
    demo = prepare_demo(tmp_path)
    config = yaml.safe_load(demo.config.read_text())
    config["apply"] = {"onto": value}
    demo.config.write_text(yaml.safe_dump(config))
    out = flow(demo.repo, "validate", str(demo.spec), "-c", str(demo.config))
    assert out.returncode == 2, out.stdout + out.stderr
    assert "apply.onto" in out.stderr and "'base' or 'tip'" in out.stderr, out.stderr


@pytest.mark.parametrize(
    "front", ["apply: {onto: tips}", "apply: tip", "apply: {ontoo: tip}", "apply: {}"]
)
def test_a_specs_apply_is_validated(tmp_path: Path, front: str) -> None:
    demo = prepare_demo(tmp_path)
    text = demo.spec.read_text().replace("branch: flow/add-median\n", f"{front}\n", 1)
    demo.spec.write_text(text)
    out = flow(demo.repo, "validate", str(demo.spec), "-c", str(demo.config))
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"{demo.spec}:5: apply: expected {{onto: base}} or {{onto: tip}}" in out.stderr


def test_onto_tip_on_the_command_line_beats_the_specs_onto_base(tmp_path: Path) -> None:
    demo = demo_with_hook(tmp_path, onto="tip")
    text = demo.spec.read_text()
    demo.spec.write_text(text.replace("branch: flow/add-median\n", ONTO_BASE_FRONT, 1))
    # The spec says base, beating agents.yaml's tip: reported, committed on the base.
    run = drifting(tmp_path / "a", demo, NOTES, *run_args(demo))
    assert run.out.returncode == 0, run.output
    assert run.summary["drift"]["onto_tip"] is False and run.parent() == run.base
    # --onto-tip beats the spec.
    git(run.repo, "branch", "-D", BRANCH)
    again = drifting(tmp_path / "b", demo, {"NOTES.md": "More.\n"}, *run_args(demo, "--onto-tip"))
    assert again.out.returncode == 0, again.output
    newest = max(again.summaries, key=lambda s: s["run_id"])
    assert newest["drift"]["committed_on"] == "tip" and again.parent() == again.tip
