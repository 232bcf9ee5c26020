"""Where a run's builders and checks execute: in this process (the default), or on Ray.

The graph, the door, the ledger, the caps and the user's repository stay with the process
that runs flow; an executor only decides where one candidate is built and checked."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from orchestrator.config import LoadedConfig
    from orchestrator.context import Context
    from orchestrator.state import BuildTask

LOCAL = "local"
"""`--ray` without an address: a Ray instance on this machine, started for the batch."""


class Executor(Protocol):
    async def candidate(self, task: BuildTask, ctx: Context) -> dict[str, object]:
        """Build one candidate and check it: the build node's update (candidates, notes,
        checks), its patch and transcript written under `ctx.run_dir` as a local build
        writes them."""
        ...

    async def close_run(self, run_id: str) -> None:
        """The run is over: what served its remote work is let go."""
        ...


@contextlib.asynccontextmanager
async def executor_for(ray: str | None, loaded: LoadedConfig) -> AsyncIterator[Executor | None]:
    """The batch's executor: None (here) without `ray`; else one on the cluster at that
    address, or on a Ray instance started here for the batch (`LOCAL`)."""
    settings = loaded.config.executor.ray
    if ray is None and settings is not None:
        ray = settings.address or LOCAL
    if ray is None:
        yield None
        return
    from orchestrator.executors import ray as on_ray

    on_ray.require_ray(ray)
    with contextlib.ExitStack() as stack:
        address = ray
        if ray == LOCAL:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flow-ray-")))
            address = stack.enter_context(on_ray.local_head(loaded, scratch))
        on_ray.connect(address)
        stack.callback(on_ray.disconnect)
        executor = on_ray.RayExecutor()
        try:
            yield executor
        finally:
            await executor.close()
