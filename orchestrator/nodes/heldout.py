"""test and heldout: testers write acceptance tests while builders work; candidates that
pass their checks are then judged by them (orchestrator/evidence/heldout.py)."""

from __future__ import annotations

import json
from typing import Literal

from langgraph.runtime import Runtime

from orchestrator import pools
from orchestrator.agents.builder import Builder, BuildOutcome
from orchestrator.agents.prompts import TESTER_SYSTEM, tester_request
from orchestrator.agents.tools import TESTER_TOOL_SPECS, Tools
from orchestrator.context import Context
from orchestrator.errors import AuthenticationFailed
from orchestrator.events import Notice, TesterUpdate
from orchestrator.evidence import heldout as evidence
from orchestrator.fmt import clip
from orchestrator.nodes.build import context_window
from orchestrator.state import CandidateHeldOut, HeldOut, HeldOutTask, TestTask


async def test(task: TestTask, runtime: Runtime[Context]) -> dict[str, object]:
    """One tester: its tests, and how each ran on the base. A refused key raises only once
    the builders beside it are done (orchestrator/siblings.py)."""
    return await runtime.context.siblings.run(_test(task, runtime.context))


async def _test(task: TestTask, ctx: Context) -> dict[str, object]:
    model = ctx.config.model(task.model)
    held = HeldOut(index=task.index, model=task.model, family=model.family)
    path = ctx.worktrees / f"test-{task.index}"
    notes: list[str] = []
    outcome = BuildOutcome()

    def update(o: BuildOutcome, action: str, status: Literal["running", "ok", "failed"]) -> None:
        ctx.events.emit(
            TesterUpdate(
                run_id=ctx.run_id,
                index=task.index,
                model=task.model,
                status=status,
                turns=o.turns,
                tokens=o.prompt_tokens + o.completion_tokens,
                cost_usd=o.cost_usd,
                action=action,
            )
        )

    update(outcome, "starting", "running")
    try:
        await pools.git(ctx.repo.add_worktree, path, task.base_sha)
        settings = ctx.config.config.builder
        tools = Tools(
            path,
            command_timeout_s=settings.command_timeout_s,
            output_cap=settings.output_cap_bytes,
            tester=True,
        )
        tester = Builder(
            ctx.door,
            task.model,
            tools,
            max_turns=settings.max_turns,
            transcript=ctx.run_dir / "transcripts" / f"test-{task.index}.jsonl",
            redact=ctx.redact,
            scope=f"test-{task.index}",
            fallbacks=ctx.config.fallback_chains().get(("test", task.model)),
            system=TESTER_SYSTEM,
            tool_specs=TESTER_TOOL_SPECS,
            stage="test",
            progress=lambda o, action: update(o, action, "running"),
            window=context_window(ctx.config, task.model, "test"),
        )
        try:
            outcome = await tester.run(tester_request(ctx.spec.body, task.plan))
        except AuthenticationFailed:
            raise
        except Exception as err:  # a tester that fails leaves the run without its tests
            outcome = tester.outcome
            outcome.error = ctx.redact(str(err).splitlines()[0] if str(err) else repr(err))
        held.cost_usd = outcome.cost_usd
        if outcome.tests is None:
            held.error = outcome.error or "the tester did not call submit_tests"
        else:
            base_files = set(await pools.git(ctx.repo.files_at, task.base_sha))
            files, dropped = await pools.git(evidence.tester_files, path, task.base_sha, base_files)
            if dropped:
                notes.append(
                    f"tester #{task.index} ({task.model}) also changed files that are not "
                    f"tests; left out: {', '.join(dropped)}"
                )
            if ctx.redact.found_in(json.dumps(files).encode()):
                held.error = "the tests contain an API key or other secret; discarded"
            else:
                name = f"heldout/tester-{task.index}.json"
                (ctx.run_dir / "heldout").mkdir(parents=True, exist_ok=True)
                (ctx.run_dir / name).write_text(json.dumps(files), encoding="utf-8")
                held.files = name
                held.tests = await evidence.run_on_base(
                    ctx, held, files, outcome.tests, task.base_sha
                )
    except AuthenticationFailed:
        raise
    except Exception as err:  # checkout or git failure: the run goes on without these tests
        held.error = ctx.redact(str(err).splitlines()[0] if str(err) else repr(err))
    finally:
        if not ctx.keep_worktrees:
            await pools.git(ctx.repo.remove_worktree, path)
    kept = held.kept
    discarded = len(held.tests) - len(kept)
    fails = sum(t.on_base == "fails" for t in kept)
    summary = (
        f"tester #{task.index} ({task.model}): {held.error}"
        if held.error
        else f"tester #{task.index} ({task.model}): {len(kept)} held-out tests "
        f"({fails} fail on the base: the new behaviour)"
        + (f"; {discarded} could not run on the base and were discarded" if discarded else "")
    )
    done = f"{len(kept)} held-out tests ({fails} fail on the base)"
    update(outcome, clip(held.error, 200) if held.error else done, "failed" if held.error else "ok")
    ctx.events.emit(Notice(run_id=ctx.run_id, level="info", message=summary))
    return {"heldout": [held], "notes": [*notes, summary]}


async def heldout(task: HeldOutTask, runtime: Runtime[Context]) -> dict[str, object]:
    """The held-out tests on one candidate that passed its checks."""
    ctx = runtime.context
    cand = task.candidate
    assert cand.patch is not None
    patch = (ctx.run_dir / cand.patch).read_bytes()
    try:
        results = await evidence.run_on_candidate(
            ctx, cand.index, patch, task.heldout, task.base_sha
        )
    except Exception as err:  # a checkout that cannot be made: no held-out evidence for it
        ctx.events.emit(
            Notice(
                run_id=ctx.run_id,
                level="warning",
                message=f"held-out tests of #{cand.index} could not run: {ctx.redact(str(err))}",
            )
        )
        results = []
    passed = sum(r.passed for r in results)
    ctx.events.emit(
        Notice(
            run_id=ctx.run_id,
            level="info",
            message=f"#{cand.index} ({cand.model}): {passed}/{len(results)} held-out tests pass",
        )
    )
    return {"heldout_results": [CandidateHeldOut(candidate=cand.index, results=results)]}
