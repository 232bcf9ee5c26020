"""What runs on a Ray node: one candidate's build, or its checks, in checkouts of the node's
own copy of the base (made once per node from the run's git bundle).

Nothing here holds a key: model calls go back to the driver's door through a `Relay` actor,
events too; the config arrives with every key value removed (`without_keys`)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config import LoadedConfig
from orchestrator.context import Context
from orchestrator.events import Event
from orchestrator.ledger import Ledger
from orchestrator.llm.messages import Completion, Message, ToolSpec
from orchestrator.redact import Redactor
from orchestrator.spec import Spec
from orchestrator.state import BuildTask, Candidate, CandidateChecks
from orchestrator.workspace import Repo, cache_root


@dataclass(frozen=True)
class Call:
    """One `ModelDoor.complete` call, as it crosses to the driver."""

    model: str
    messages: list[Message]
    stage: str
    tools: list[ToolSpec] | None
    tool_choice: str | None
    scope: str
    fallbacks: list[str] | None


@dataclass(frozen=True)
class Job:
    """What one piece of a run's work needs on a node; no key value is in it."""

    run_id: str
    attempt: str
    """Names this try of the work: a try restarted on another node is a new attempt, whose
    identical requests the driver answers from the ledger."""
    spec: Spec
    loaded: LoadedConfig
    base_sha: str
    resuming: bool
    relay: Any
    """The run's `Relay` actor handle."""


class RemoteDoor:
    """`ModelDoor` on a node: every call is made by the driver's door."""

    def __init__(self, job: Job) -> None:
        self.job = job

    async def complete(
        self,
        model: str,
        messages: list[Message],
        *,
        stage: str,
        tools: list[ToolSpec] | None = None,
        tool_choice: str | None = None,
        scope: str = "",
        fallbacks: list[str] | None = None,
    ) -> Completion:
        call = Call(model, messages, stage, tools, tool_choice, scope, fallbacks)
        answer = await self.job.relay.call.remote(self.job.attempt, call)
        if isinstance(answer, BaseException):
            raise answer
        assert isinstance(answer, Completion)
        return answer


class RelaySink:
    """`EventSink` on a node: events reach the driver's sink in the order they were sent."""

    def __init__(self, job: Job) -> None:
        self.job = job

    def emit(self, event: Event) -> None:
        self.job.relay.emit.remote(event)


def build_on_node(
    job: Job, bundle: bytes, task: BuildTask
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The candidate's build: the node's update and the files it wrote under the run's
    directory (its patch, its transcript), by path relative to it."""
    from orchestrator.nodes.build import build_candidate

    async def work(ctx: Context) -> dict[str, Any]:
        return await build_candidate(task, ctx)

    return _on_node(job, bundle, work)


def check_on_node(job: Job, bundle: bytes, cand: Candidate, patch: bytes) -> CandidateChecks:
    """The spec's checks on base + `patch`, in a checkout of the node's own."""
    from orchestrator.nodes.check import check_candidate

    async def work(ctx: Context) -> CandidateChecks:
        assert cand.patch is not None
        (ctx.run_dir / cand.patch).parent.mkdir(parents=True, exist_ok=True)
        (ctx.run_dir / cand.patch).write_bytes(patch)
        return await check_candidate(ctx, cand, job.base_sha, None)

    checks, _files = _on_node(job, bundle, work)
    assert isinstance(checks, CandidateChecks)
    return checks


def _on_node(job: Job, bundle: bytes, work: Any) -> tuple[Any, dict[str, bytes]]:
    repo = node_repo(bundle, job.base_sha)
    top = cache_root() / "ray-work"
    top.mkdir(parents=True, exist_ok=True)
    sweep(top)
    scratch = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-{job.run_id}-", dir=top))
    try:
        run_dir = scratch / "run"
        run_dir.mkdir()
        with Ledger(scratch / "unused.sqlite") as ledger:  # the door's ledger is the driver's
            ctx = Context(
                run_id=job.run_id,
                repo=repo,
                spec=job.spec,
                config=job.loaded,
                door=RemoteDoor(job),
                events=RelaySink(job),
                run_dir=run_dir,
                worktrees=scratch / "checkouts",
                ledger=ledger,
                redact=Redactor([]),
                resuming=job.resuming,
            )
            result = asyncio.run(_then_flushed(job, work(ctx)))
        files = {
            str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()
        }
        return result, files
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def sweep(top: Path) -> list[Path]:
    """Remove the scratch of work whose process is gone (its node was killed, or the
    machine restarted): done by the next work on the node. Returns what was removed."""
    gone = []
    for path in top.iterdir():
        pid = path.name.split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            gone.append(path)
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _then_flushed(job: Job, work: Any) -> Any:
    """The work's result, once the relay holds every event it sent (they come first)."""
    try:
        return await work
    finally:
        await job.relay.ping.remote()


def node_repo(bundle: bytes, base_sha: str) -> Repo:
    """This node's bare copy of the base, made from the bundle the first time it is asked
    for (one process at a time; others wait and reuse it)."""
    top = cache_root() / "ray-bases"
    top.mkdir(parents=True, exist_ok=True)
    path = top / f"{base_sha}.git"
    with open(top / f"{base_sha}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "flow-complete").exists():
            shutil.rmtree(path, ignore_errors=True)
            _make_base(path, bundle, base_sha)
    return Repo(path, path)


def _make_base(path: Path, bundle: bytes, base_sha: str) -> None:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "HOME": "/nonexistent",
        "LC_ALL": "C",
    }
    staging = path.with_suffix(".incoming")
    shutil.rmtree(staging, ignore_errors=True)
    file = path.with_suffix(".bundle")
    file.write_bytes(bundle)
    try:
        for args in (
            ["git", "init", "--bare", "--quiet", "--template=", str(staging)],
            [
                "git",
                "-C",
                str(staging),
                "fetch",
                "--quiet",
                str(file),
                "refs/flow/base:refs/flow/base",
            ],
            ["git", "-C", str(staging), "cat-file", "-e", f"{base_sha}^{{commit}}"],
        ):
            subprocess.run(args, env=env, check=True, capture_output=True, timeout=600)
        (staging / "flow-complete").write_text(base_sha + "\n", encoding="utf-8")
        staging.rename(path)
    finally:
        file.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
