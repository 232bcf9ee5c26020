"""The user committing to the base branch while flow builds (tests/test_drift.py).

flow loads this file as the demo's good builder (`FILE.py:builder`), so it runs inside the real
`flow` process while a builder works: the run has fixed its base, and the builder's first
reply waits until the user's commit is made. That is the synchronisation, without a sleep.
The first call plays the user: it snapshots the repository, makes a real `git commit` of the
job's files in the user's checkout (only those paths: whatever else the user has staged stays
staged), and snapshots it again, so the test can hold flow to "untouched" on both sides of the
user's commit. Then, and on every later call, it answers as the demo's good builder does.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from functools import cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import repo_state

from orchestrator.llm.messages import Message, Usage
from orchestrator.llm.scripted import ScriptedModel

JOB_ENV = "FLOW_TEST_DRIFT_JOB"


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    done = subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True)
    return done.stdout.decode().strip()


def commit_once(job_path: Path) -> None:
    """Make the job's commit in the user's checkout, once per job, with snapshots around it."""
    job = json.loads(job_path.read_text())
    done = Path(job["done"])
    if done.exists():
        return
    repo = Path(job["repo"])
    Path(job["before"]).write_bytes(pickle.dumps(repo_state(repo)))
    for rel, text in job["files"].items():
        path = repo / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    _git(repo, "add", "--", *job["files"])
    _git(repo, "commit", "-q", "-m", job["message"], "--only", "--", *job["files"])
    Path(job["after"]).write_bytes(pickle.dumps(repo_state(repo)))
    done.write_text(_git(repo, "rev-parse", "HEAD"))


@cache
def _good_builder(script: str) -> ScriptedModel:
    return ScriptedModel("good-builder", Path(script))


def builder(messages: list[Message], tools: object, tool_choice: object) -> tuple[Message, Usage]:
    job_path = Path(os.environ[JOB_ENV])
    commit_once(job_path)
    script = json.loads(job_path.read_text())["builder_script"]
    return _good_builder(script).reply(messages)
