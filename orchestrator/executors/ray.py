"""The Ray executor: each candidate's build and its checks are Ray tasks on any node; the
door stays here, so provider slots, caps, the ledger and the keys hold for the whole cluster.

A node learns the base from a git bundle of the base commit (never the working tree), the
spec, and the config with every key value removed. Its model calls and events cross back
through a `Relay` actor; the driver's door makes each call. A task lost with its node is
started again elsewhere as a new attempt: its requests repeat, and the door answers the ones
already paid from the ledger."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator import pools
from orchestrator.config import LoadedConfig, secret_values
from orchestrator.errors import FlowError
from orchestrator.events import Notice
from orchestrator.executors.node import Call, Job, build_on_node, check_on_node
from orchestrator.executors.relay import Relay
from orchestrator.redact import environment_secrets

if TYPE_CHECKING:
    from orchestrator.context import Context
    from orchestrator.llm.door import Door
    from orchestrator.state import BuildTask

ATTEMPTS = 3
"""Tries of one build or check when its node is lost, each on whatever node Ray picks."""
START_TIMEOUT_S = 60.0
EXTRA = "pip install 'flow-orchestrator[ray]'"


def require_ray(address: str | None = None) -> None:
    """Ray imported (a clear error when it is not installed), set up for `address` first:
    Ray reads at import whether 127.0.0.1 may stay 127.0.0.1."""
    if address is not None and (address == "local" or on_loopback(address)):
        # Otherwise Ray swaps 127.0.0.1 for the machine's outward address, which a head
        # bound to loopback does not answer on.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray  # noqa: F401
    except ImportError:
        raise FlowError(f"--ray needs Ray, an optional extra: {EXTRA}") from None


def import_ray() -> Any:
    require_ray()
    import ray

    return ray


def _host(address: str) -> str:
    return address.split("://")[-1].rsplit(":", 1)[0]


def on_loopback(address: str) -> bool:
    """Ray's own idea of this machine's name, which it swaps for the outward address."""
    return _host(address) in ("127.0.0.1", "localhost")


def without_keys(loaded: LoadedConfig) -> LoadedConfig:
    """The config a node gets: variable names stay (the checks hide them), values go."""
    from orchestrator.config import looks_like_variable

    providers = {
        name: p.model_copy(update={"api_key": None})
        if p.api_key and not looks_like_variable(p.api_key)
        else p
        for name, p in loaded.config.providers.items()
    }
    models = {
        name: m.model_copy(update={"api_key_ref": None})
        if m.api_key_ref and not looks_like_variable(m.api_key_ref)
        else m
        for name, m in loaded.models.items()
    }
    config = loaded.config.model_copy(update={"providers": providers})
    return loaded.model_copy(update={"config": config, "models": models})


def _lost() -> tuple[type[BaseException], ...]:
    ray = import_ray()
    e = ray.exceptions
    return (
        e.NodeDiedError,
        e.WorkerCrashedError,
        e.LocalRayletDiedError,
        e.ObjectLostError,
        e.OwnerDiedError,
    )


@dataclass
class _Run:
    """One run's traffic: its relay actor, the task serving it, its base's bundle."""

    relay: Any
    bundle: Any
    doors: dict[str, Door] = field(default_factory=dict)
    pump: asyncio.Task[None] | None = None
    barriers: dict[int, asyncio.Event] = field(default_factory=dict)
    tokens: Iterator[int] = field(default_factory=itertools.count)
    calls: set[asyncio.Task[None]] = field(default_factory=set)
    seen: dict[tuple[str, str], int] = field(default_factory=dict)
    inflight: dict[str, asyncio.Future[Any]] = field(default_factory=dict)

    async def barrier(self) -> None:
        """Returns once every event a finished task sent has reached the driver's sink."""
        token = next(self.tokens)
        seen = self.barriers[token] = asyncio.Event()
        await self.relay.barrier.remote(token)
        await seen.wait()
        del self.barriers[token]


class RayExecutor:
    """`Executor` on a Ray cluster the process is connected to (see `connect`)."""

    def __init__(self) -> None:
        self.ray = import_ray()
        self._runs: dict[str, _Run] = {}
        self._bundles: dict[tuple[str, str], Any] = {}
        self._remote_relay = self.ray.remote(num_cpus=0, max_restarts=0)(Relay)
        self._build = self.ray.remote(build_on_node)
        self._check = self.ray.remote(check_on_node)

    async def candidate(self, task: BuildTask, ctx: Context) -> dict[str, object]:
        run = await self._run_for(ctx, task.base_sha)
        job = self._job(ctx, task.base_sha, run)
        settings = ctx.config.config.executor.ray
        holds = _options(settings.builder_resources if settings else {"num_cpus": 1.0})
        update, files = await self._retrying(
            ctx,
            f"build-{task.index}",
            lambda attempt: self._build.options(**holds).remote(job(attempt), run.bundle, task),
            run,
        )
        for rel, data in files.items():
            target = ctx.run_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            text = rel.startswith("transcripts/")
            target.write_bytes(
                ctx.redact(data.decode("utf-8", "replace")).encode() if text else data
            )
        cand = update["candidates"][0]
        if cand.status != "ok":  # unfinished or empty: nothing to check
            return dict(update)
        if not ctx.spec.checks or cand.patch is None:
            from orchestrator.nodes.check import check_candidate

            return {**update, "checks": [await check_candidate(ctx, cand, task.base_sha)]}
        patch = (ctx.run_dir / cand.patch).read_bytes()
        options = _options(ctx.config.config.checks.resources)
        checks = await self._retrying(
            ctx,
            f"check-{task.index}",
            lambda attempt: self._check.options(**options).remote(
                job(attempt), run.bundle, cand, patch
            ),
            run,
        )
        return {**update, "checks": [checks]}

    async def close_run(self, run_id: str) -> None:
        run = self._runs.pop(run_id, None)
        if run is None:
            return
        if run.pump is not None:
            run.pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run.pump
        for call in list(run.calls):
            call.cancel()
        self.ray.kill(run.relay)

    def _job(self, ctx: Context, base_sha: str, run: _Run) -> Any:
        keyless = without_keys(ctx.config)

        def make(attempt: str) -> Job:
            return Job(ctx.run_id, attempt, ctx.spec, keyless, base_sha, ctx.resuming, run.relay)

        return make

    async def _retrying(self, ctx: Context, what: str, submit: Any, run: _Run) -> Any:
        lost = _lost()
        for n in range(ATTEMPTS):
            attempt = f"{what}#{n}"
            try:
                result = await submit(attempt)
            except lost as err:
                if n + 1 == ATTEMPTS:
                    raise FlowError(f"{what}: its node was lost {ATTEMPTS} times ({err})") from None
                ctx.events.emit(
                    Notice(
                        run_id=ctx.run_id,
                        level="warning",
                        message=f"{what}: its Ray node was lost; starting it again on another "
                        "(replies already paid for come from the ledger)",
                    )
                )
                continue
            await run.barrier()
            return result
        raise AssertionError("unreachable")

    async def _run_for(self, ctx: Context, base_sha: str) -> _Run:
        run = self._runs.get(ctx.run_id)
        if run is None:
            bundle = await self._bundle(ctx, base_sha)
            here = self.ray.get_runtime_context().get_node_id()
            placement = self.ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                node_id=here, soft=False
            )
            relay = self._remote_relay.options(scheduling_strategy=placement).remote()
            run = self._runs[ctx.run_id] = _Run(relay=relay, bundle=bundle)
            run.pump = asyncio.create_task(self._serve(ctx, run))
        return run

    async def _bundle(self, ctx: Context, base_sha: str) -> Any:
        key = (str(ctx.repo.git_dir), base_sha)
        if key not in self._bundles:
            data = await pools.git(bundle_of, ctx.repo.git_dir, base_sha)
            self._bundles[key] = self.ray.put(data)
        return self._bundles[key]

    async def close(self) -> None:
        """The batch is over: every run's relay and serving task are let go."""
        for run_id in list(self._runs):
            await self.close_run(run_id)

    async def _serve(self, ctx: Context, run: _Run) -> None:
        """Take what the run's nodes sent: events to the sink, calls to the door."""
        while True:
            try:
                items = await run.relay.take.remote()
            except self.ray.exceptions.RayActorError:
                return  # the relay is gone: the run or the driver is ending
            for kind, number, attempt, item in items:
                if kind == "event":
                    ctx.events.emit(item)
                elif kind == "barrier":
                    run.barriers[number].set()
                else:
                    call = asyncio.create_task(self._answer(ctx, run, number, attempt, item))
                    run.calls.add(call)
                    call.add_done_callback(run.calls.discard)

    async def _answer(self, ctx: Context, run: _Run, number: int, attempt: str, call: Call) -> None:
        from orchestrator.llm.door import request_key

        turn = request_key(
            ctx.run_id,
            f"{call.stage}/{call.scope}",
            call.model,
            call.messages,
            call.tools,
            call.tool_choice,
        )
        nth = run.seen[(attempt, turn)] = run.seen.get((attempt, turn), 0) + 1
        key = f"{turn}#{nth}"
        # A new attempt may repeat a call its lost predecessor still has in flight: it waits
        # for that one's reply instead of buying it again (a finished one the ledger replays).
        shared = run.inflight.get(key)
        if shared is None:
            shared = run.inflight[key] = asyncio.ensure_future(self._call(ctx, run, attempt, call))
            shared.add_done_callback(lambda _: run.inflight.pop(key, None))
        try:
            outcome: Any = await asyncio.shield(shared)
        except Exception as err:  # raised again on the node, where the builder handles it
            outcome = err
        await run.relay.answer.remote(number, outcome)

    async def _call(self, ctx: Context, run: _Run, attempt: str, call: Call) -> Any:
        door = run.doors.get(attempt)
        if door is None:
            door = run.doors[attempt] = _sibling_door(ctx)
        return await door.complete(
            call.model,
            call.messages,
            stage=call.stage,
            tools=call.tools,
            tool_choice=call.tool_choice,
            scope=call.scope,
            fallbacks=call.fallbacks,
        )


def _options(wanted: dict[str, float]) -> dict[str, Any]:
    """Ray task options for what a piece of work holds (one CPU unless it says otherwise);
    Ray does not retry it: a lost node's work is started again here, as a new attempt."""
    rest = dict(wanted)
    return {
        "num_cpus": rest.pop("num_cpus", 1.0),
        "num_gpus": rest.pop("num_gpus", 0.0),
        "resources": rest,
        "max_retries": 0,
    }


def _sibling_door(ctx: Context) -> Door:
    """A door sharing the run's caps, slots, ledger and sink, counting repeated requests on
    its own: a task's new attempt asks again from the start and gets the paid replies."""
    from orchestrator.llm.door import Door

    door = ctx.door
    assert isinstance(door, Door)
    return Door(
        door.loaded,
        run_id=door.run_id,
        spec=door.spec,
        ledger=door.ledger,
        budget=door.budget,
        events=door.events,
        limiter=door.limiter,
    )


def bundle_of(git_dir: Path, sha: str) -> bytes:
    """A git bundle of commit `sha` (as `refs/flow/base`), made in a scratch repository that
    borrows the user's objects: no ref of the user's is written."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "HOME": "/nonexistent",
        "LC_ALL": "C",
    }
    with tempfile.TemporaryDirectory(prefix="flow-bundle-") as tmp:
        scratch = Path(tmp) / "scratch.git"

        def git(*args: str) -> bytes:
            return subprocess.run(
                ["git", "-C", str(scratch), *args],
                env=env,
                check=True,
                capture_output=True,
                timeout=600,
            ).stdout

        subprocess.run(
            ["git", "init", "--bare", "--quiet", "--template=", str(scratch)],
            env=env,
            check=True,
            capture_output=True,
        )
        (scratch / "objects" / "info" / "alternates").write_text(
            f"{(git_dir / 'objects').resolve()}\n", encoding="utf-8"
        )
        git("update-ref", "refs/flow/base", sha)
        out = Path(tmp) / "base.bundle"
        git("bundle", "create", "--quiet", str(out), "refs/flow/base")
        return out.read_bytes()


# Starting and reaching a cluster.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_environment(loaded: LoadedConfig, home: Path) -> dict[str, str]:
    """What a node flow starts runs with: nothing of the user's keys, Ray's phone-home off."""
    hidden = set(loaded.key_variables())
    secrets = set(secret_values(loaded)) | set(environment_secrets(os.environ))
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in hidden and v not in secrets and not k.startswith("RAY_")
    }
    env.update(
        HOME=str(home),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_enable_metrics_collection="0",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
    )
    return env


def quiet_home(path: Path) -> Path:
    """A HOME for Ray's processes holding the file that keeps Ray from asking cloud
    metadata addresses which cloud it runs on."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "ray_bootstrap_config.yaml").write_text("{}\n", encoding="utf-8")
    return path


@contextlib.contextmanager
def local_head(loaded: LoadedConfig, scratch: Path, num_cpus: int | None = None) -> Iterator[str]:
    """A Ray head on 127.0.0.1 started for this batch without the user's keys; stopped
    (its own processes only) when the batch ends. Yields its address."""
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists():
        raise FlowError(f"--ray: {ray_bin} is missing; {EXTRA}")
    port = _free_port()
    env = node_environment(loaded, quiet_home(scratch / "home"))
    args = [
        str(ray_bin),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--disable-usage-stats",
        "--include-dashboard=false",
        f"--temp-dir={scratch / 'ray'}",
    ]
    if num_cpus is not None:
        args.append(f"--num-cpus={num_cpus}")
    proc = subprocess.Popen(
        args,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        # `ray start --block` stops its own processes on SIGTERM (~3 s); sent to the whole
        # group at once, they die under it and it hangs. Whatever is left is killed.
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        shutil.rmtree(scratch / "ray", ignore_errors=True)


def connect(address: str) -> None:
    """Join the cluster at `address` as its driver (waiting for a head just started)."""
    require_ray(address)
    ray = import_ray()
    host = "127.0.0.1" if on_loopback(address) else _host(address)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            ray.init(
                address=address,
                # A cluster on this machine's loopback (127.0.0.2 stays as it is, unlike
                # 127.0.0.1): the driver is a node of it at that address too.
                _node_ip_address=host if host.startswith("127.") else None,
                logging_level="warning",
                log_to_driver=False,
                configure_logging=False,
            )
            return
        except ConnectionError as err:
            if time.monotonic() > deadline:
                raise FlowError(f"--ray {address}: no Ray cluster answered there ({err})") from None
            time.sleep(0.5)


def disconnect() -> None:
    import_ray().shutdown()
