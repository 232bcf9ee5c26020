"""The spec's checks run as the user, with the user's environment less its secrets (issue 8.3).

Through the real `flow run`: a check prints the names of every variable it sees and its
uid, and fails, so the report carries its output. Run once as whoever runs the tests and
once as an unprivileged user (setpriv), which a check mapped to root inside its namespace
would not see as itself.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from orchestrator.config import parse_config
from orchestrator.demo import prepare_demo
from orchestrator.errors import ConfigError

NOBODY = 65534
KEY = "sk-plan-key-0123456789"
USER_ENV = {
    # what real test suites need: the checks get them
    "PYTHONPATH": "/opt/flow-test/pylib",
    "JAVA_HOME": "/usr/lib/jvm/flow-test",
    "DATABASE_URL": "postgresql://app@localhost:5432/app_test",
    "TEST_DB_PASSWORD": "hunter2-but-only-for-tests",  # looks secret; checks.env lets it in
    # what they must never get
    "ZHIPU_API_KEY": "sk-zhipu-0123456789",  # named like a key
    "GITHUB_TOKEN": "ghp_0123456789abcdef",  # named like a token
    "MY_PLAN_KEY": KEY,  # agents.yaml reads a (fallback) model's key from it
    "MY_PROVIDER_CRED": "zp-0123456789abcdef",  # an agents.yaml key; the name does not say so
    "COPIED_SETTING": KEY,  # a model key under an innocent name
}
PRESENT = ("PYTHONPATH", "JAVA_HOME", "DATABASE_URL", "TEST_DB_PASSWORD", "HOME", "PATH")
ABSENT = ("ZHIPU_API_KEY", "GITHUB_TOKEN", "MY_PLAN_KEY", "MY_PROVIDER_CRED", "COPIED_SETTING")
PROBE = """#!/bin/sh
python3 -c 'import os; print("names:", " ".join(sorted(os.environ)))'
echo "ids: $(id -u) $(id -g)"
exit 1
"""


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user can reach (pytest's own tmp_path is root's alone)."""
    top = Path(tempfile.mkdtemp(prefix="flow-checks-env-", dir="/tmp"))
    top.chmod(0o755)
    yield top
    shutil.rmtree(top, ignore_errors=True)


def _config(path: Path) -> None:
    """The demo's scripted models, one builder, and two providers whose keys are variables."""
    config = yaml.safe_load(path.read_text())
    url = "http://127.0.0.1:9/v1"
    config["providers"] = {
        "plan": {"api": "openai", "base_url": url, "api_key": "MY_PLAN_KEY"},
        "other": {"api": "openai", "base_url": url, "api_key": "MY_PROVIDER_CRED"},
    }
    config["models"]["spare"] = {"provider": "plan", "id": "m", "price": {"input": 0, "output": 0}}
    config["stages"]["planner"]["fallbacks"] = ["spare"]
    config["stages"]["builders"] = [{"model": "glm-sim"}]
    config["checks"] = {"env": ["TEST_DB_PASSWORD"]}
    path.write_text(yaml.safe_dump(config))


def _chown(top: Path, uid: int) -> None:
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            os.lchown(name, uid, uid)


@pytest.mark.parametrize("who", ["self", "nobody"])
def test_checks_see_the_users_environment_and_uid_but_no_key(shared_dir: Path, who: str) -> None:
    demo = prepare_demo(shared_dir)
    _config(demo.config)
    probe = demo.root / "probe.sh"
    probe.write_text(PROBE)
    probe.chmod(0o755)
    spec = demo.spec.read_text()
    demo.spec.write_text(spec.replace("  - python3 -m unittest -q\n", f"  - {probe}\n", 1))
    home = demo.root / "home"
    home.mkdir()
    env = {**os.environ, **USER_ENV, "HOME": str(home), "FLOW_CACHE_DIR": str(demo.root / "c")}
    prefix: list[str] = []
    uid, gid = os.getuid(), os.getgid()
    if who == "nobody":
        setpriv = shutil.which("setpriv")
        assert setpriv is not None, "setpriv (util-linux) is needed to run flow unprivileged"
        prefix = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        uid = gid = NOBODY
        demo.root.chmod(0o755)
        _chown(demo.root, NOBODY)
    argv = [sys.executable, "-m", "orchestrator", "run", str(demo.spec)]
    out = subprocess.run(
        [*prefix, *argv, "--config", str(demo.config)],
        cwd=demo.repo,
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert "Traceback" not in out.stderr, out.stderr
    reports = list((demo.repo / ".flow" / "runs").glob("*/report.md"))
    assert len(reports) == 1, out.stdout + out.stderr
    report = reports[0].read_text()
    names_line = next((ln for ln in report.splitlines() if "names:" in ln), None)
    assert names_line is not None, report
    names = set(names_line.split("names:", 1)[1].split())
    missing = [n for n in PRESENT if n not in names]
    assert not missing, f"the check lacks {missing}: {sorted(names)}"
    leaked = [n for n in ABSENT if n in names]
    assert not leaked, f"the check got {leaked}"
    assert f"ids: {uid} {gid}" in report, report


@pytest.mark.parametrize(
    ("entries", "says"),
    [
        (["A-B"], r"checks\.env: item 0, 'A-B', is not an environment variable name"),
        ("TEST_DB_PASSWORD", r"checks\.env: Input should be a valid list"),
        (["OK", "MY_PROVIDER_CRED"], r"checks\.env\.1: MY_PROVIDER_CRED is providers\.other"),
        (["MY_PLAN_KEY"], r"checks\.env\.0: MY_PLAN_KEY is providers\.plan\.api_key"),
    ],
)
def test_bad_checks_env_is_refused_naming_file_and_field(
    tmp_path: Path, entries: object, says: str
) -> None:
    """`flow validate` refuses a checks.env that is not a list of names or that would hand a
    model key (even a fallback's, under an innocent name) to the checks: exit 2, one line."""
    demo = prepare_demo(tmp_path)
    _config(demo.config)
    config = yaml.safe_load(demo.config.read_text())
    config["checks"] = {"env": entries}
    demo.config.write_text(yaml.safe_dump(config))
    config_path = str(demo.config)
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator", "validate", str(demo.spec), "--config", config_path],
        cwd=demo.repo,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **USER_ENV},
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    # The file, the line the entry is on, the field.
    assert re.search(re.escape(str(demo.config)) + r":\d+: " + says, out.stderr), out.stderr
    assert len(out.stderr.strip().splitlines()) <= 2, out.stderr


def test_bare_model_ids_vendor_key_cannot_be_let_through() -> None:
    """A bare litellm id reads its vendor's variable: that one is a model key too."""
    base = {
        "providers": {"p": {"api": "openai", "base_url": "http://x/v1", "api_key": "P_ACCESS"}},
        "models": {"m": {"provider": "p", "id": "m", "price": {"input": 0, "output": 0}}},
        "stages": {"planner": {"model": "gpt-5"}, "builders": [{"model": "m"}]},
    }
    assert parse_config({**base, "checks": {"env": ["TEST_DB_PASSWORD"]}}).config.checks.env
    with pytest.raises(ConfigError, match=r"checks\.env\.0: OPENAI_API_KEY is the key litellm"):
        parse_config({**base, "checks": {"env": ["OPENAI_API_KEY"]}})


def test_checks_env_drops_git_redirections_and_keeps_the_users_own_settings() -> None:
    """Run from a git hook, flow has GIT_DIR set: a check's git must not act on the user's repo."""
    from orchestrator.proc import checks_env

    env = checks_env(
        environ={"GIT_DIR": "/home/u/repo/.git", "GIT_INDEX_FILE": "i", "CI": "", "X_PASSWD": "p"},
        allowed=["X_PASSWD"],
    )
    assert env == {
        "CI": "",
        "X_PASSWD": "p",
        "GIT_TERMINAL_PROMPT": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
