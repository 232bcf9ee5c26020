"""Shared fixtures: real temporary git repositories; real model calls blocked by default."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

# Tests never reach the network: litellm must use its bundled price map, and no key is set.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
os.environ.setdefault("FLOW_ALLOW_MODEL_REQUESTS", "0")
for _name in list(os.environ):
    if _name.endswith("_API_KEY"):
        del os.environ[_name]


def git(cwd: Path, *args: str) -> str:
    # GIT_OPTIONAL_LOCKS=0: even `git status` would otherwise refresh (rewrite) the index.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    out = subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True, env=env
    )
    return out.stdout.strip()


MakeRepo = Callable[..., Path]


@pytest.fixture(autouse=True, scope="session")
def _cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """flow's cache (checkouts, the bases overlay views share) in the session's temp dir, not
    the user's: bases are kept between runs."""
    old = os.environ.get("FLOW_CACHE_DIR")
    os.environ["FLOW_CACHE_DIR"] = str(tmp_path_factory.mktemp("flow-cache"))
    yield
    if old is None:
        os.environ.pop("FLOW_CACHE_DIR", None)
    else:
        os.environ["FLOW_CACHE_DIR"] = old


@pytest.fixture
def make_repo(tmp_path: Path) -> MakeRepo:
    """Create a git repository with an identity and one commit of `files`."""

    def make(files: dict[str, str] | None = None, name: str = "repo") -> Path:
        root = tmp_path / name
        root.mkdir(parents=True)
        git(root, "init", "-q", "-b", "main")
        git(root, "config", "user.name", "Test User")
        git(root, "config", "user.email", "test@example.com")
        git(root, "config", "commit.gpgsign", "false")
        for rel, text in (files or {"README.md": "hello\n"}).items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        git(root, "add", "-A")
        git(root, "commit", "-q", "-m", "initial")
        return root

    return make


def repo_state(root: Path) -> dict[str, object]:
    """Everything of the user's repository that flow promises not to touch."""
    files: dict[str, bytes] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if rel.parts[0] in (".git", ".flow") or not path.is_file():
            continue
        files[str(rel)] = path.read_bytes()
    index = (root / ".git" / "index").read_bytes() if (root / ".git" / "index").exists() else b""
    return {
        "files": files,
        "index": index,
        "head": (root / ".git" / "HEAD").read_text(),
        "head_sha": git(root, "rev-parse", "HEAD"),
        "status": git(root, "status", "--porcelain=v1", "--untracked-files=all"),
        "stash": git(root, "stash", "list"),
        "branches": git(root, "for-each-ref", "--format=%(refname) %(objectname)", "refs/heads"),
    }


def assert_untouched(before: dict[str, object], after: dict[str, object]) -> None:
    """The user's repository is as it was, except for new branches under flow/."""
    assert {k: v for k, v in after.items() if k != "branches"} == {
        k: v for k, v in before.items() if k != "branches"
    }
    old = set(str(before["branches"]).splitlines())
    new = set(str(after["branches"]).splitlines())
    assert old <= new, f"a branch changed or vanished: {sorted(old - new)}"
    assert all(line.startswith("refs/heads/flow/") for line in new - old), sorted(new - old)


@contextmanager
def untouched(repo: Path) -> Iterator[None]:
    """Wrap every flow invocation of an end-to-end test: the user's state must survive it."""
    before = repo_state(repo)
    yield
    assert_untouched(before, repo_state(repo))


def flow_in(
    repo: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the real `flow` CLI in the user's repository; its state must survive the run."""
    import sys

    with untouched(repo):
        return subprocess.run(
            [sys.executable, "-m", "orchestrator", *args],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
        )
