"""Held-out acceptance tests: written from the spec by a tester, run on every candidate.

A tester works like a builder, in a checkout of its own at the base, and ends with
`submit_tests`: one shell command per test. What it wrote is kept in the run directory,
which no builder can see (their sandbox hides the user's repository and its `.flow/`), and
never enters a builder's prompt. Each test then runs on the base commit: one that fails
there tests the new behaviour, one that passes guards the old; one that cannot run at all
(program missing, nothing collected, a usage error, a time-out) is discarded. After a
candidate passes the spec's checks, the kept tests run on it, in a fresh checkout of the
base with the candidate's (protected) patch and then the tester's files written over it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from orchestrator import overlay, pools
from orchestrator.context import Context
from orchestrator.evidence.protect import is_test_file
from orchestrator.proc import CommandResult
from orchestrator.state import HeldOut, HeldOutResult, HeldOutTest
from orchestrator.workspace import apply_patch, diff_stats, worktree_diff

TAIL_CHARS = 2000
CANNOT_RUN_EXITS = {
    4: "pytest: usage error",
    5: "pytest: no tests collected",
    126: "not executable",
    127: "command not found",
}
"""Exit codes that mean a test did not run at all, rather than failed."""


def on_base(result: CommandResult) -> Literal["passes", "fails", "cannot run"]:
    """How a test ran on the base: `passes`, `fails` or `cannot run`."""
    if result.timed_out or result.exit_code is None or result.exit_code in CANNOT_RUN_EXITS:
        return "cannot run"
    text = result.output.lower()
    if "no tests ran" in text or "ran 0 tests" in text or "no test files" in text:
        return "cannot run"
    return "passes" if result.exit_code == 0 else "fails"


def tester_files(
    checkout: Path, base_sha: str, base_files: set[str]
) -> tuple[dict[str, str], list[str]]:
    """The files the tester wrote: new files and test files; its edits of other existing
    files (it was to write tests, not the change) are left out and listed."""
    patch = worktree_diff(checkout, base_sha)
    files, _, _ = diff_stats(patch)
    kept: dict[str, str] = {}
    dropped: list[str] = []
    for rel in files:
        target = checkout / rel
        if rel in base_files and not is_test_file(rel):
            dropped.append(rel)
            continue
        if target.is_symlink() or not target.is_file():
            continue  # deleted, or a link: nothing to write
        try:
            kept[rel] = target.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            dropped.append(rel)
    return kept, dropped


def write_files(checkout: Path, files: dict[str, str]) -> None:
    """Write the tester's files over a checkout (a candidate's same-named file included)."""
    for rel, text in files.items():
        target = checkout / rel
        if target.is_symlink():
            target.unlink()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")


def load_files(ctx: Context, held: HeldOut) -> dict[str, str]:
    if held.files is None:
        return {}
    data: dict[str, str] = json.loads((ctx.run_dir / held.files).read_text(encoding="utf-8"))
    return data


async def run_on_base(
    ctx: Context,
    held: HeldOut,
    files: dict[str, str],
    submitted: list[dict[str, str]],
    base_sha: str,
) -> list[HeldOutTest]:
    """Each submitted test on the base commit, with the tester's files and nothing else."""
    from orchestrator.nodes.check import run_check

    path = ctx.worktrees / f"test-{held.index}-base"
    tests: list[HeldOutTest] = []
    try:
        view = not ctx.keep_worktrees  # a kept checkout must outlive flow's process
        await pools.git(ctx.repo.add_worktree, path, base_sha, view=view)
        await pools.git(write_files, overlay.host(path), files)
        for t in submitted:
            out = await run_check(ctx, t["command"], path)
            tests.append(
                HeldOutTest(
                    tester=held.index,
                    name=ctx.redact(t["name"]),
                    command=t["command"],
                    on_base=on_base(out),
                    base_exit=out.exit_code,
                )
            )
    finally:
        if not ctx.keep_worktrees:
            await pools.git(ctx.repo.remove_worktree, path)
    return tests


async def run_on_candidate(
    ctx: Context, index: int, patch: bytes, heldout: list[HeldOut], base_sha: str
) -> list[HeldOutResult]:
    """Every kept held-out test on base + the candidate's patch + the testers' files."""
    from orchestrator.nodes.check import run_check

    path = ctx.worktrees / f"heldout-{index}"
    results: list[HeldOutResult] = []
    try:
        view = not ctx.keep_worktrees
        await pools.git(ctx.repo.add_worktree, path, base_sha, view=view)
        await pools.git(apply_patch, path, patch)
        for held in heldout:
            if not held.kept:
                continue
            await pools.git(write_files, overlay.host(path), load_files(ctx, held))
            for t in held.kept:
                out = await run_check(ctx, t.command, path)
                results.append(
                    HeldOutResult(
                        tester=held.index,
                        name=t.name,
                        passed=out.exit_code == 0 and not out.timed_out,
                        exit_code=out.exit_code,
                        output_tail=ctx.redact(out.output[-TAIL_CHARS:]),
                    )
                )
    finally:
        if not ctx.keep_worktrees:
            await pools.git(ctx.repo.remove_worktree, path)
    return results


def informative(results: dict[int, list[HeldOutResult]]) -> set[tuple[int, str]]:
    """The tests that tell candidates apart: a test no candidate passes says nothing."""
    return {(r.tester, r.name) for rs in results.values() for r in rs if r.passed}
