"""`flow validate --baseline`: the spec's checks on the base commit, before any model works.

A check that cannot run there (program not found, nothing collected, a module that is not
installed where the checks run) would fail every candidate for a reason no builder can fix:
an error. A check that already passes there cannot tell a candidate that does the work from
one that does nothing: a warning. The checks run as they do in a run: in a throwaway
checkout, confined and with the checks' environment (`nodes.check.run_check_as_checks`).
"""

from __future__ import annotations

import asyncio
import re
import secrets
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal

from orchestrator import pools
from orchestrator.config import LoadedConfig
from orchestrator.evidence.heldout import CANNOT_RUN_EXITS, on_base
from orchestrator.proc import CommandResult
from orchestrator.spec import Spec
from orchestrator.workspace import Repo, remove_run_worktrees, worktree_dir

_NO_MODULE = re.compile(r"No module named '?([\w.]+)'?")
TAIL_LINES = 3
Verdict = Literal["passes", "fails", "cannot run"]


@dataclass(frozen=True)
class BaselineCheck:
    """How one check ran on the base commit."""

    index: int
    command: str
    verdict: Verdict
    why: str
    """What the verdict rests on: an exit code, the reason it cannot run."""
    tail: str
    """The last lines of its output."""

    def line(self, spec: Spec, base: str) -> str:
        where = f"{spec.path}: checks.{self.index} {self.command!r}"
        if self.verdict == "cannot run":
            return (
                f"{where} cannot run on the base {base[:12]} ({self.why}); it would fail every "
                f"candidate: install what it needs or fix the command. Its output ends: "
                f"{self.tail or '(nothing)'}"
            )
        if self.verdict == "passes":
            return (
                f"{where} already passes on the base {base[:12]}, so it cannot tell a candidate "
                "that does the work from one that does nothing; add a check (or a test) of "
                "the new behaviour"
            )
        return f"{where} fails on the base {base[:12]} ({self.why}), as a check of new work should"


def judge(result: CommandResult, modules: set[str]) -> tuple[Verdict, str]:
    """(verdict, why) for one check's run on the base; `modules` are the top-level names
    the repository itself provides (a missing one of those is the work not yet done)."""
    verdict = on_base(result)
    if verdict == "cannot run":
        if result.timed_out:
            return verdict, "timed out"
        if result.exit_code in CANNOT_RUN_EXITS:
            return verdict, f"exit {result.exit_code}: {CANNOT_RUN_EXITS[result.exit_code]}"
        return verdict, "no tests ran"
    if verdict == "fails":
        absent = sorted(
            {m for m in _NO_MODULE.findall(result.output) if m.split(".")[0] not in modules}
        )
        if absent:
            return "cannot run", f"import error: no module named {absent[0]!r} where checks run"
    return verdict, f"exit {result.exit_code}"


def repository_modules(files: list[str]) -> set[str]:
    """Names a Python import could find in the repository: every directory and every .py
    file's stem, wherever it lies (src/ layouts, test directories)."""
    names: set[str] = set()
    for rel in files:
        parts = PurePosixPath(rel).parts
        names.update(parts[:-1])
        if parts and parts[-1].endswith((".py", ".pyi")):
            names.add(parts[-1].split(".", 1)[0])
    return names


def _tail(output: str) -> str:
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    return " | ".join(lines[-TAIL_LINES:])[-400:]


async def _run(spec: Spec, loaded: LoadedConfig, repo: Repo, base_sha: str) -> list[BaselineCheck]:
    from orchestrator.nodes.check import run_check_as_checks

    run_id = f"validate-{secrets.token_hex(4)}"
    path = worktree_dir(repo, run_id) / "baseline"
    modules = repository_modules(await pools.git(repo.files_at, base_sha))
    out: list[BaselineCheck] = []
    try:
        await pools.git(repo.add_worktree, path, base_sha)
        for i, command in enumerate(spec.checks):
            result = await run_check_as_checks(loaded, repo.root, command, path)
            verdict, why = judge(result, modules)
            out.append(BaselineCheck(i, command, verdict, why, _tail(result.output)))
    finally:
        await pools.git(remove_run_worktrees, repo, run_id)
    return out


def run_baseline(
    spec: Spec, loaded: LoadedConfig, repo: Repo, base_sha: str
) -> list[BaselineCheck]:
    """Every check of `spec` on `base_sha`, in a throwaway checkout removed afterwards."""
    return asyncio.run(_run(spec, loaded, repo, base_sha))
