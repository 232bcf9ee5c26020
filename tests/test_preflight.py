"""`flow validate` is the run's preflight: what `flow run` (or `flow batch`) would refuse or
fail on after spending, validate refuses first; `--baseline` runs the checks on the base.

Everything through the real command line, on the demo's repository and scripted models.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import git, repo_state

from orchestrator.demo import DemoPaths, prepare_demo

VENV_BIN = str(Path(sys.prefix) / "bin")
PLAIN_PATH = "/usr/local/bin:/usr/bin:/bin"


def flow(
    demo: DemoPaths, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=demo.repo,
        capture_output=True,
        text=True,
        env={**os.environ, "FLOW_CACHE_DIR": str(demo.root / "cache"), **(env or {})},
        timeout=180,
    )


def validate(
    demo: DemoPaths, *extra: str, **kw: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    return flow(demo, "validate", str(demo.spec), "--config", str(demo.config), *extra, **kw)


def set_checks(demo: DemoPaths, *commands: str) -> None:
    text = demo.spec.read_text()
    head, _, rest = text.partition("checks:\n  - python3 -m unittest -q\n")
    assert rest, "the demo spec's checks changed"
    lines = "".join(f"  - {json.dumps(c)}\n" for c in commands)  # JSON strings are YAML
    demo.spec.write_text(f"{head}checks:\n{lines}{rest}")


def nothing_spent(demo: DemoPaths) -> None:
    runs = demo.repo / ".flow" / "runs"
    assert not runs.is_dir() or not any(runs.iterdir())


@pytest.fixture
def demo(tmp_path: Path) -> DemoPaths:
    return prepare_demo(tmp_path)


# ---- keys -----------------------------------------------------------------------------


def test_a_bare_model_id_without_its_vendor_key_fails_validate_and_run(demo: DemoPaths) -> None:
    env = {"OPENAI_API_KEY": ""}
    out = validate(demo, "--set", "stages.planner.model=gpt-5", env=env)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "OPENAI_API_KEY" in out.stderr and "gpt-5" in out.stderr
    run = flow(
        demo, "run", str(demo.spec), "--config", str(demo.config),
        "--set", "stages.planner.model=gpt-5", env=env,
    )  # fmt: skip
    assert run.returncode == 2 and "OPENAI_API_KEY" in run.stderr
    assert "HTTP 500" not in run.stderr and "applied" not in run.stdout
    nothing_spent(demo)
    # With the variable set, the same config validates: the check is about the key only.
    ok = validate(demo, "--set", "stages.planner.model=gpt-5", env={"OPENAI_API_KEY": "sk-x"})
    assert ok.returncode == 0, ok.stderr


def test_a_fallback_models_key_is_checked_too(demo: DemoPaths) -> None:
    out = validate(
        demo,
        "--set",
        "stages.planner.fallbacks=[claude-sonnet-4-5]",
        env={"ANTHROPIC_API_KEY": ""},
    )
    assert out.returncode == 2
    assert "ANTHROPIC_API_KEY" in out.stderr and "claude-sonnet-4-5" in out.stderr


# ---- the budget -----------------------------------------------------------------------


def test_a_budget_below_one_pass_is_refused_by_validate_run_and_batch(demo: DemoPaths) -> None:
    """--budget 0.05 used to run and silently skip every review."""
    out = validate(demo, "--budget", "0.05")
    assert out.returncode == 2
    assert "cannot afford one pass" in out.stderr and "review round" in out.stderr
    assert len(out.stderr.strip().splitlines()) <= 2
    same = validate(demo, "--set", "budget.per_run_usd=0.05")
    assert same.returncode == 2 and "cannot afford one pass" in same.stderr
    run = flow(demo, "run", str(demo.spec), "--config", str(demo.config), "--budget", "0.05")
    assert run.returncode == 2 and "cannot afford one pass" in run.stderr
    spec = str(demo.spec)
    batch = flow(demo, "batch", spec, "--config", str(demo.config), "--budget", "0.05")
    assert batch.returncode == 2 and "cannot afford one pass" in batch.stderr
    assert "Traceback" not in run.stderr + batch.stderr
    nothing_spent(demo)
    enough = validate(demo, "--budget", "0.30")
    assert enough.returncode == 0, enough.stderr


# ---- the repository and the checks' programs ----------------------------------------------


def test_an_existing_branch_fails_validate(demo: DemoPaths) -> None:
    git(demo.repo, "branch", "flow/add-median")
    out = validate(demo)
    assert out.returncode == 2 and "flow/add-median" in out.stderr and "exists" in out.stderr


def test_a_check_program_only_flow_itself_has_is_not_installed(demo: DemoPaths) -> None:
    """`flow` exists only in flow's own virtualenv: the checks do not see it, so it is
    not installed as far as the spec's checks go, even with that virtualenv activated."""
    assert (Path(VENV_BIN) / "flow").exists() and sys.prefix != sys.base_prefix
    set_checks(demo, "flow --version")
    env = {"PATH": f"{VENV_BIN}:{PLAIN_PATH}", "VIRTUAL_ENV": sys.prefix}
    out = validate(demo, env=env)
    assert out.returncode == 2, out.stdout
    assert "'flow' is not installed" in out.stderr and "checks" in out.stderr


# ---- --baseline ---------------------------------------------------------------------------


def test_baseline_passes_a_check_that_fails_on_the_base(demo: DemoPaths) -> None:
    before = repo_state(demo.repo)
    out = validate(demo, "--baseline")
    assert out.returncode == 0, out.stderr
    assert "fails on the base" in out.stdout and "warning" not in out.stdout
    assert repo_state(demo.repo) == before
    # The throwaway checkout is gone.
    assert not any(p.is_file() for p in (demo.root / "cache").rglob("*"))


@pytest.mark.parametrize(
    ("command", "why"),
    [
        ("python3 -m flow_no_such_test_runner -q", "no module named 'flow_no_such_test_runner'"),
        ("python3 -m pytest -q tests/test_not_written.py", "exit 4"),
        ("python3 -c 'import sys; sys.exit(5)'", "no tests collected"),
        ("python3 -c 'import flow_absent_dependency'", "no module named 'flow_absent_dependency'"),
        ("sh -c 'exit 127'", "command not found"),
    ],
)
def test_baseline_refuses_a_check_that_cannot_run_on_the_base(
    demo: DemoPaths, command: str, why: str
) -> None:
    set_checks(demo, "python3 -m unittest -q", command)
    before = repo_state(demo.repo)
    out = validate(demo, "--baseline")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "checks.1" in out.stderr and "cannot run on the base" in out.stderr
    assert why in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith("flow: ") and len(lines) <= 2  # the check's own traceback may
    # show in its quoted output; flow's never does
    assert "checks.0" in out.stdout and "fails on the base" in out.stdout
    assert repo_state(demo.repo) == before
    # Without --baseline nothing runs: validate cannot know.
    assert validate(demo).returncode == 0


def test_baseline_does_not_blame_a_module_the_work_will_write(demo: DemoPaths) -> None:
    """A missing module of the repository's own (a test of new code) is a failure, not an
    environment that cannot run the checks."""
    set_checks(demo, "python3 -c 'import stats.median_impl'")
    out = validate(demo, "--baseline")
    assert out.returncode == 0, out.stderr
    assert "fails on the base" in out.stdout


def test_baseline_warns_about_a_check_that_already_passes(demo: DemoPaths) -> None:
    set_checks(demo, "python3 -m unittest -q tests.test_stats")
    out = validate(demo, "--baseline")
    assert out.returncode == 0, out.stderr
    assert "warning:" in out.stdout and "already passes on the base" in out.stdout


def test_baseline_runs_like_the_checks_without_keys_or_flows_virtualenv(demo: DemoPaths) -> None:
    """A check that would pass only if it saw a key, or flow's own python, fails on the base."""
    secret = "sk-baseline-0123456789"
    venv = sys.prefix
    set_checks(
        demo,
        f'test "$FLOW_BASELINE_API_KEY" = "{secret}"',
        f"python3 -c 'import sys; sys.exit(0 if sys.prefix == \"{venv}\" else 1)'",
    )
    env = {
        "FLOW_BASELINE_API_KEY": secret,
        "PATH": f"{VENV_BIN}:{PLAIN_PATH}",
        "VIRTUAL_ENV": venv,
    }
    out = validate(demo, "--baseline", env=env)
    assert out.returncode == 0, out.stderr
    assert "already passes" not in out.stdout, out.stdout
    assert out.stdout.count("fails on the base") == 2


# ---- speed ----------------------------------------------------------------------------------


def test_validate_is_fast_and_never_imports_litellm(demo: DemoPaths) -> None:
    """Under 0.5 s on an idle machine; measured here as CPU time, which a loaded CI machine
    inflates less than wall time, with room for that."""
    argv = ["validate", str(demo.spec), "--config", str(demo.config), "--baseline"]
    code = (
        "import sys\nfrom orchestrator.cli import app\n"
        f"try:\n    app({argv!r})\n"
        "except SystemExit:\n    pass\n"
        "print('MODULES:' + ' '.join(m for m in sys.modules if m.split('.')[0] in "
        "('litellm', 'langgraph', 'openai', 'httpx')))"
    )
    probe = subprocess.run(
        [sys.executable, "-c", code], cwd=demo.repo, capture_output=True, text=True, check=True
    )
    line = next(ln for ln in probe.stdout.splitlines() if ln.startswith("MODULES:"))
    assert line == "MODULES:", line  # not even with --baseline
    cpu, wall = [], []
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        out = validate(demo)
        wall.append(time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        assert out.returncode == 0, out.stderr
    print(
        f"validate: cpu median {statistics.median(cpu):.3f}s, wall {statistics.median(wall):.3f}s"
    )
    assert statistics.median(cpu) < 0.8
