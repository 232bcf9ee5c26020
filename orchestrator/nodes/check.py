"""check: the spec's check commands, in a fresh worktree holding exactly the candidate's diff."""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
from collections.abc import Callable

from langgraph.runtime import Runtime

from orchestrator.context import Context
from orchestrator.events import CheckDone
from orchestrator.proc import run_shell, sandbox_env
from orchestrator.state import CandidateChecks, CheckResult, CheckTask
from orchestrator.workspace import apply_patch

TAIL_CHARS = 4000


async def check(task: CheckTask, runtime: Runtime[Context]) -> dict[str, object]:
    ctx = runtime.context
    cand = task.candidate
    report = CandidateChecks(candidate=cand.index)
    if ctx.spec.checks and cand.patch:
        report.results = await _run_checks(ctx, task)
    done = sum(r.passed for r in report.results)
    summary = f"{done}/{len(report.results)} passed" if report.results else "no checks"
    ctx.events.emit(
        CheckDone(run_id=ctx.run_id, candidate=cand.index, passed=report.passed, summary=summary)
    )
    return {"checks": [report]}


async def _run_checks(ctx: Context, task: CheckTask) -> list[CheckResult]:
    assert task.candidate.patch is not None
    path = ctx.worktrees / f"check-{task.candidate.index}"
    settings = ctx.config.config.checks
    results: list[CheckResult] = []
    try:
        await asyncio.to_thread(ctx.repo.add_worktree, path, task.base_sha)
        patch = (ctx.run_dir / task.candidate.patch).read_bytes()
        await asyncio.to_thread(apply_patch, path, patch)
        for command in ctx.spec.checks:
            out = await run_shell(
                command,
                path,
                timeout_s=settings.timeout_s,
                output_cap=settings.output_cap_bytes,
                env=sandbox_env(),
                isolate_user=True,
            )
            results.append(
                CheckResult(
                    command=ctx.redact(command),
                    exit_code=out.exit_code,
                    timed_out=out.timed_out,
                    passed=out.exit_code == 0 and not out.timed_out,
                    duration_s=out.duration_s,
                    output_tail=ctx.redact(out.output[-TAIL_CHARS:]),
                )
            )
    except Exception as err:  # a check that cannot even start is a failed check, not a crash
        results.append(
            CheckResult(
                command="(setting up the check worktree)",
                exit_code=None,
                passed=False,
                output_tail=ctx.redact(str(err))[:TAIL_CHARS],
            )
        )
    finally:
        if not ctx.keep_worktrees:
            await asyncio.to_thread(ctx.repo.remove_worktree, path)
    return results


_SHELL_WORDS = {
    "if",
    "for",
    "while",
    "until",
    "case",
    "{",
    "(",
    "!",
    "[[",
    "time",
    "exec",
    "cd",
    "export",
    "test",
    "[",
    "true",
    "false",
    "set",
    "source",
    ".",
    "eval",
}


def program_of(command: str) -> str | None:
    """The program a check command starts, when that is plain to see (else None)."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError:
        return None
    while words and "=" in words[0] and not words[0].startswith("="):
        words = words[1:]  # FOO=1 cmd …
    if not words or words[0] in _SHELL_WORDS or words[0].startswith(("$", "`")):
        return None
    return words[0]


def missing_programs(commands: list[str], has_file: Callable[[str], bool]) -> list[str]:
    """Check programs that are neither on PATH nor (for ./paths) files of the repository."""
    missing = []
    for command in commands:
        program = program_of(command)
        if program is None:
            continue
        if "/" in program:
            if not os.path.isabs(program) and has_file(os.path.normpath(program)):
                continue
            if os.path.isabs(program) and os.access(program, os.X_OK):
                continue
            missing.append(program)
        elif shutil.which(program, path=sandbox_env().get("PATH")) is None:
            missing.append(program)
    return missing
