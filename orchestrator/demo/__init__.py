"""The offline demo: a bundled example repository, spec and scripted models."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from pydantic import BaseModel

HERE = Path(__file__).parent


class DemoPaths(BaseModel):
    root: Path
    repo: Path
    spec: Path
    config: Path
    branch: str = "flow/add-median"


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def prepare_demo(parent: Path | None = None) -> DemoPaths:
    """Copy the example into a new temporary directory and make it a git repository."""
    root = Path(tempfile.mkdtemp(prefix="flow-demo-", dir=parent))
    repo = root / "repo"
    shutil.copytree(HERE / "repo", repo, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(HERE / "scripts", root / "scripts")
    shutil.copy(HERE / "spec.md", root / "spec.md")
    shutil.copy(HERE / "agents.yaml", root / "agents.yaml")
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "config", "user.name", "flow demo")
    _git(repo, "config", "user.email", "demo@flow.invalid")
    _git(repo, "config", "commit.gpgsign", "false")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "stats: mean")
    return DemoPaths(root=root, repo=repo, spec=root / "spec.md", config=root / "agents.yaml")


def remove_demo(where: DemoPaths) -> None:
    """Delete the demo's temporary directory (and nothing outside it)."""
    from orchestrator.workspace import _remove_tree

    _remove_tree(where.root)
