"""Blocking work in bounded pools of its own: git never crowds out a model call, the bounds
hold as seen from outside, and a batch prepares its next spec without breaking its caps."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import yaml
from conftest import git, untouched

from orchestrator import pools
from orchestrator.batch import BatchOptions, run_batch
from orchestrator.config import load_config
from orchestrator.demo import DemoPaths, prepare_demo
from orchestrator.events import RunFinished, RunStarted
from orchestrator.ledger import Ledger
from orchestrator.llm.door import Door
from orchestrator.llm.messages import Message
from orchestrator.protocols import ListSink
from orchestrator.testing import ChatServer, ServerReply, scripted_handler
from orchestrator.testing.demo_http import demo_scripts, http_config
from orchestrator.workspace import Repo

# Counts the git processes alive at once, under a lock shared by all of them.
GIT_WRAPPER = """#!/bin/sh
exec 9>>"{state}.lock"
flock 9
n=$(( $(cat "{state}" 2>/dev/null || echo 0) + 1 ))
echo "$n" > "{state}"
echo "$n" >> "{state}.log"; echo "$n $*" >> "{state}.argv"
flock -u 9
"{real}" "$@"
rc=$?
flock 9
echo $(( $(cat "{state}") - 1 )) > "{state}"
flock -u 9
exit $rc
"""


def specs(demo: DemoPaths, n: int, text: str | None = None) -> list[Path]:
    out = []
    for i in range(n):
        path = demo.root / f"spec{i}.md"
        body = text if text is not None else demo.spec.read_text()
        path.write_text(body.replace("flow/add-median", f"flow/median-{i}"))
        out.append(path)
    return out


def counting_git(tmp_path: Path) -> tuple[Path, Path]:
    """A directory whose `git` counts the real git's processes alive at once; the log."""
    real = subprocess.run(["which", "git"], capture_output=True, text=True, check=True)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    state = tmp_path / "git-count"
    wrapper = bindir / "git"
    wrapper.write_text(GIT_WRAPPER.format(state=state, real=real.stdout.strip()))
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return bindir, Path(f"{state}.log")


def test_git_processes_at_once_never_exceed_the_git_pool(tmp_path: Path) -> None:
    demo = prepare_demo(tmp_path)
    paths = specs(demo, 4)
    bindir, log = counting_git(tmp_path)
    env = {
        **os.environ,
        "PATH": f"{bindir}:{os.environ['PATH']}",
        "FLOW_GIT_THREADS": "2",
        "FLOW_CACHE_DIR": str(tmp_path / "cache"),
    }
    cmd = [sys.executable, "-m", "orchestrator", "batch", *map(str, paths), "--budget", "5"]
    cmd += ["--config", str(demo.config), "--parallel", "4", "--json"]
    with untouched(demo.repo):
        proc = subprocess.run(
            cmd, cwd=demo.repo, env=env, capture_output=True, text=True, timeout=300
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for i in range(4):
        assert "def median" in git(demo.repo, "show", f"flow/median-{i}:stats.py")
    counts = [int(x) for x in log.read_text().split()]
    assert len(counts) > 40  # the wrapper saw the batch's git work
    # Four runs at once, each with builders and checks: without the bound, their git
    # commands overlap far beyond two (the default executor has six threads here).
    assert max(counts) == 2, max(counts)


async def test_a_model_call_is_not_held_up_by_git_work_filling_its_pool(
    tmp_path: Path,
) -> None:
    demo = prepare_demo(tmp_path)
    gate = threading.Event()
    inside = threading.Semaphore(0)

    def long_git_job() -> str:
        inside.release()
        gate.wait(60)
        return "done" if gate.is_set() else "timed out"

    with ChatServer(scripted_handler(demo_scripts(demo))) as srv:
        cfg = demo.root / "http.yaml"
        cfg.write_text(yaml.safe_dump(http_config(demo, srv.base_url, timeout_s=30)))
        ledger = Ledger(tmp_path / "ledger.sqlite")
        door = Door(load_config(cfg), run_id="r1", ledger=ledger)
        workers = pools.GIT.executor()._max_workers
        jobs = [asyncio.ensure_future(pools.git(long_git_job)) for _ in range(workers + 2)]
        try:
            for _ in range(workers):  # every git thread is taken, two more jobs queue
                assert await asyncio.to_thread(inside.acquire, True, 30)
            reply = await asyncio.wait_for(
                door.complete("flash-sim", [Message.user("plan this")], stage="plan"), 60
            )
            assert reply.message.content or reply.message.tool_calls
            assert not gate.is_set() and not any(j.done() for j in jobs)
            assert [r.outcome for r in ledger.rows(run_id="r1")] == ["ok"]  # written too
            assert len(srv.requests) == 1
        finally:
            gate.set()
            results = await asyncio.gather(*jobs)
            ledger.close()
    assert results == ["done"] * (workers + 2)


def test_batch_caps_and_provider_slots_hold_while_specs_are_prepared_ahead(
    tmp_path: Path,
) -> None:
    demo = prepare_demo(tmp_path)
    paths = specs(demo, 5)
    sink = ListSink()
    inner = scripted_handler(demo_scripts(demo))
    two = threading.Barrier(2, timeout=60)

    def handler(request: dict[str, Any]) -> dict[str, Any] | ServerReply:
        if not two.broken:  # the first calls wait until two are in flight at once
            with contextlib.suppress(threading.BrokenBarrierError):
                two.wait()
                two.abort()
        return inner(request)

    with ChatServer(handler, max_concurrency=2) as srv:
        cfg = demo.root / "http.yaml"
        data = http_config(demo, srv.base_url, max_concurrency=2, timeout_s=60)
        cfg.write_text(yaml.safe_dump(data))
        options = BatchOptions(budget_usd=5.0, parallel=2)
        with untouched(demo.repo):
            result = asyncio.run(
                run_batch(paths, load_config(cfg), Repo.open(demo.repo), sink, options)
            )
        peak_calls, rejected = srv.max_in_flight, srv.rejected
    assert [i.status for i in result.items] == ["applied"] * 5
    assert rejected == 0 and peak_calls == 2  # the server counts: never a third at once
    going = peak_runs = 0
    for event in sink.events:
        going += isinstance(event, RunStarted) - isinstance(event, RunFinished)
        peak_runs = max(peak_runs, going)
    assert peak_runs == 2


def test_a_spec_prepared_ahead_is_checked_again_when_it_starts(tmp_path: Path) -> None:
    """With one slot, the second spec is prepared while the first runs: its verdict must be
    the one at its start. Spec 1 builds on the branch spec 0 writes (refused ahead, allowed
    at the start); spec 2 names spec 0's branch too (allowed ahead, refused at the start)."""
    demo = prepare_demo(tmp_path)
    text = demo.spec.read_text()
    first = demo.root / "spec0.md"
    first.write_text(text.replace("flow/add-median", "flow/first"))
    chained = demo.root / "spec1.md"
    front = "---\nbase: flow/first\n"
    assert text.startswith("---\n")
    chained.write_text(text.replace("flow/add-median", "flow/second").replace("---\n", front, 1))
    same = demo.root / "spec2.md"
    same.write_text(text.replace("flow/add-median", "flow/first"))
    with untouched(demo.repo):
        result = asyncio.run(
            run_batch(
                [first, chained, same],
                load_config(demo.config),
                Repo.open(demo.repo),
                ListSink(),
                BatchOptions(budget_usd=5.0, parallel=1),
            )
        )
    statuses = [i.status for i in result.items]
    assert statuses == ["applied", "applied", "skipped"], [i.reason for i in result.items]
    assert "already exists" in (result.items[2].reason or "")
    assert git(demo.repo, "rev-parse", "flow/second^") == git(demo.repo, "rev-parse", "flow/first")
