"""What can be wrong before money is spent, shared by `flow validate`, `flow run` and batches.

Light on purpose: `flow validate` runs it, so it imports neither litellm nor langgraph.
"""

from __future__ import annotations

import os
import shlex
import shutil
from collections.abc import Callable, Mapping

from orchestrator.catalog import VENDOR_KEYS, vendor_of
from orchestrator.config import LoadedConfig, ResolvedModel, resolve_api_key
from orchestrator.errors import BudgetExceeded, ConfigError, WorkspaceError
from orchestrator.fmt import usd
from orchestrator.proc import checks_env
from orchestrator.spec import Spec
from orchestrator.workspace import Repo

PROMPT_ALLOWANCE_TOKENS = 8_000
"""Prompt size assumed for a first call's worst case (the spec, the plan, a repository view)."""


def vendor_key(model: ResolvedModel, environ: Mapping[str, str] | None = None) -> None:
    """A bare litellm model id needs its vendor's variable; a missing one names it."""
    if model.api != "litellm":
        return
    env = os.environ if environ is None else environ
    vendor = vendor_of(model.litellm_model)
    names = VENDOR_KEYS.get(vendor)
    if names and not any(env.get(n) for n in names):
        raise ConfigError(
            f"models.{model.name}: litellm sends {model.litellm_model!r} to {vendor}, which "
            f"needs {names[0]}, and it is not set; export {names[0]}=… or route the model "
            "through a provider (`provider:` with its own api_key)"
        )


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


def missing_programs(
    commands: list[str], has_file: Callable[[str], bool], path: str | None = None
) -> list[str]:
    """Check programs that are neither on the checks' PATH (`path`, default: that of
    `checks_env`) nor (for ./paths) files of the repository."""
    search = checks_env().get("PATH") if path is None else path
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
        elif shutil.which(program, path=search) is None:
            missing.append(program)
    return missing


def _worst_first_call(loaded: LoadedConfig, model: str, stage: str) -> float:
    return loaded.worst_call(model, stage, PROMPT_ALLOWANCE_TOKENS)


def one_pass(loaded: LoadedConfig, slots: list[str]) -> tuple[float, float, float]:
    """The worst case of one pass: the planner's call, a builder's first turn (the dearest
    slot) and one review round."""
    stages = loaded.config.stages
    planner = _worst_first_call(loaded, stages.planner.model, "plan")
    builder = max(_worst_first_call(loaded, m, "build") for m in slots)
    reviews = sum(_worst_first_call(loaded, r.model, "review") for r in stages.reviewers)
    return planner, builder, reviews


def affordable(loaded: LoadedConfig, slots: list[str], budget_usd: float | None) -> None:
    """The budget must cover the planner, one builder's first turn and one review round:
    below that a run would spend and then skip every review (and apply nothing)."""
    if budget_usd is None:
        return
    planner, builder, reviews = one_pass(loaded, slots)
    need = planner + builder + reviews
    if need > budget_usd:
        raise BudgetExceeded(
            f"budget {usd(budget_usd)} cannot afford one pass at the worst case: planner "
            f"{usd(planner)} + a builder's first turn {usd(builder)} + one review round "
            f"{usd(reviews)} = {usd(need)}; raise the budget (--budget; --per-spec in a batch; "
            f"budget.per_run_usd) to at least {usd(need)}, or lower budget.output_tokens"
        )


def used_models(loaded: LoadedConfig, slots: list[str]) -> list[str]:
    """Every model a run may call: its stages' models and their fallbacks."""
    stages = loaded.config.stages
    names = {stages.planner.model, *slots, *(r.model for r in stages.reviewers)}
    names.update(t.model for t in stages.testers)
    for chain in loaded.fallback_chains().values():
        names.update(chain)
    return sorted(names)


def branch_free(spec: Spec, repo: Repo) -> None:
    """The spec's branch does not exist yet (a batch checks again when a run starts)."""
    if repo.branch_exists(spec.branch):
        raise WorkspaceError(
            f"{spec.path}: branch {spec.branch!r} already exists in {repo.root}; "
            "set `branch:` in the spec's front matter or delete the branch"
        )


def preflight(
    spec: Spec,
    loaded: LoadedConfig,
    repo: Repo,
    *,
    builders: int | None = None,
    budget_usd: float | None = None,
) -> str:
    """Everything that can be wrong before money is spent; returns the base commit."""
    try:
        base_sha = repo.resolve(spec.base or "HEAD")
    except WorkspaceError as err:
        raise WorkspaceError(
            f"{spec.path}: base: {err}; set `base:` to a branch, tag or commit of the repository"
        ) from None
    absent, remote = repo.missing_objects(base_sha)
    if absent:
        raise WorkspaceError(
            f"{repo.root} is a partial clone: {absent} objects of the base {base_sha[:12]} were "
            "never downloaded, so builders would see files missing; download them with\n"
            f"  git -c remote.{remote}.partialclonefilter=blob:limit=1g fetch --refetch {remote}"
        )
    missing = missing_programs(
        spec.checks,
        lambda path: repo.has_file(base_sha, path),
        checks_env(project=repo.root).get("PATH"),
    )
    if missing:
        raise WorkspaceError(
            f"{spec.path}: checks: {missing[0]!r} is not installed (not on "
            "PATH, nor a file of the repository); install it or fix the command"
        )
    branch_free(spec, repo)
    if loaded.config.sandbox == "required":
        from orchestrator import sandbox

        if sandbox.bwrap() is None:
            raise ConfigError(
                f"{loaded.path or 'agents.yaml'}: sandbox: required, but bubblewrap cannot run "
                "here; install it (apt-get install bubblewrap) or set `sandbox: auto`"
            )
    if loaded.agent_entries():
        from orchestrator.agent_status import check_agents

        check_agents(loaded)  # a CLI that is not installed fails here, not after the planner
    slots = loaded.builder_slots(builders or spec.builders)
    for name in used_models(loaded, slots):
        model = loaded.model(name)
        resolve_api_key(model)
        vendor_key(model)
        if model.scripted and model.script is not None:
            from orchestrator.llm.scripted import ScriptedModel

            ScriptedModel(name, model.script)  # a missing or broken script fails here, not mid-run
    limit = budget_usd if budget_usd is not None else loaded.config.budget.per_run_usd
    affordable(loaded, slots, limit)
    return base_sha
