"""check: the spec's check commands, in a checkout holding exactly base + the candidate's diff."""

from __future__ import annotations

from pathlib import Path

from orchestrator import pools
from orchestrator.config import LoadedConfig, secret_values
from orchestrator.context import Context
from orchestrator.errors import WorkspaceError
from orchestrator.events import CheckDone, CheckStarted
from orchestrator.preflight import missing_programs, program_of
from orchestrator.proc import CommandResult, checks_env, run_shell
from orchestrator.state import Candidate, CandidateChecks, CheckResult, CheckTask
from orchestrator.workspace import Repo, apply_patch

TAIL_CHARS = 4000
__all__ = ["check_candidate", "checks_on", "missing_programs", "program_of"]


async def check_candidate(
    ctx: Context, cand: Candidate, base_sha: str, reuse: Path | None = None
) -> CandidateChecks:
    """The spec's checks on base + the candidate's patch, in a checkout holding exactly that:
    the builder's own checkout `reuse` reset to it, or else a fresh one."""
    report = CandidateChecks(candidate=cand.index)
    if ctx.spec.checks and cand.patch:
        task = CheckTask(candidate=cand, base_sha=base_sha)
        report.results = await _run_checks(ctx, task, reuse)
    done = sum(r.passed for r in report.results)
    summary = f"{done}/{len(report.results)} passed" if report.results else "no checks"
    ctx.events.emit(
        CheckDone(run_id=ctx.run_id, candidate=cand.index, passed=report.passed, summary=summary)
    )
    return report


async def run_check(ctx: Context, command: str, path: Path) -> CommandResult:
    """One check command (or held-out test) in a checkout, as the checks run."""
    return await run_check_as_checks(ctx.config, ctx.repo.root, command, path)


async def run_check_as_checks(
    loaded: LoadedConfig, project: Path, command: str, path: Path
) -> CommandResult:
    """One command in a checkout of `project`, confined and with the environment of the
    spec's checks (also `flow validate --baseline`)."""
    settings = loaded.config.checks
    return await run_shell(
        command,
        path,
        timeout_s=settings.timeout_s,
        output_cap=settings.output_cap_bytes,
        env=check_environment(loaded, project),
        isolate_user=True,
    )


async def _run_checks(ctx: Context, task: CheckTask, reuse: Path | None) -> list[CheckResult]:
    assert task.candidate.patch is not None
    patch = (ctx.run_dir / task.candidate.patch).read_bytes()
    index = task.candidate.index
    name = f"check-{index}"
    return await checks_on(ctx, name, task.base_sha, patch, candidate=index, reuse=reuse)


async def checks_on(
    ctx: Context,
    name: str,
    sha: str,
    patch: bytes,
    candidate: int | None = None,
    reuse: Path | None = None,
) -> list[CheckResult]:
    """The spec's checks in a checkout of `sha` holding `patch`, named `name` under the run's
    checkouts (the builder's checkout `reuse` reset to that, or else a fresh one); the
    candidates' checks and the re-check on the base branch's tip."""
    path = ctx.worktrees / name
    results: list[CheckResult] = []
    try:
        view = not ctx.keep_worktrees  # a kept checkout must outlive flow's process
        await pools.git(_checkout, ctx.repo, path, sha, patch, reuse, view)
        for position, command in enumerate(ctx.spec.checks, 1):
            ctx.events.emit(
                CheckStarted(
                    run_id=ctx.run_id,
                    where=name,
                    candidate=candidate,
                    command=ctx.redact(command),
                    position=position,
                    total=len(ctx.spec.checks),
                )
            )
            out = await run_check(ctx, command, path)
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
            await pools.git(ctx.repo.remove_worktree, path)
    return results


def _checkout(
    repo: Repo, path: Path, sha: str, patch: bytes, reuse: Path | None, view: bool
) -> None:
    if reuse is not None:
        try:
            repo.reuse_worktree(reuse, path, sha, patch)
            return
        except (WorkspaceError, OSError):
            repo.remove_worktree(reuse)  # what could not be reset is not used
            repo.remove_worktree(path)
    repo.add_worktree(path, sha, view=view)
    apply_patch(path, patch)


def check_environment(loaded: LoadedConfig, project: Path | None = None) -> dict[str, str]:
    """The user's environment for the checks, less secrets, every variable this config reads
    a model key from and every key value under any other name, and flow's own virtualenv;
    plus `checks.env`."""
    return checks_env(
        hidden=loaded.key_variables(),
        hidden_values=secret_values(loaded),
        allowed=loaded.config.checks.env,
        project=project,
    )
