"""agents.yaml: providers, models, per-stage routing and budget, validated once at the edge."""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator import catalog
from orchestrator.errors import ConfigError
from orchestrator.llm.quirks import DEFAULTS as DEFAULT_QUIRKS
from orchestrator.llm.quirks import Quirks, ResolvedQuirks, effective_quirks

SCRIPTED_PREFIX = "scripted/"
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Window(_Strict):
    """A request quota per rolling window (coding plans)."""

    requests: int = Field(gt=0, description="requests allowed per window")
    hours: float = Field(gt=0, description="window length in hours")


class Provider(_Strict):
    api: Literal["openai", "anthropic"] = "openai"
    """Wire protocol of the endpoint."""
    base_url: str | None = None
    """Endpoint base URL; omit for the vendor's default."""
    api_key: str | None = None
    """An environment variable's name (UPPER_CASE); anything else is taken literally."""
    max_concurrency: int = Field(default=4, ge=1)
    """In-flight requests, shared by every run in the process."""
    window: Window | None = None
    timeout_s: float = Field(default=600.0, gt=0)
    """Per-request timeout in seconds (for a streamed reply: the longest silence)."""
    stream: Literal["auto", "always", "never"] = "auto"
    """Stream replies: `auto` streams calls that may generate more than 16,384 tokens, so a
    long generation is not cut by the timeout and charged as a failure."""
    retries: int = Field(default=3, ge=0)
    """Retries for rate limits and server errors."""
    quirks: Quirks | None = None
    """Request quirks for every model of this provider (over the preset for its name/host)."""


class Price(_Strict):
    """USD per million tokens; 0 is an explicit price (flat-rate plans)."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cached_input: float | None = Field(default=None, ge=0)
    tiers: list[PriceTierConfig] = Field(default_factory=list)
    """Higher prices for long prompts, e.g. `[{above_tokens: 200000, input: 2.5, output: 15}]`."""


class PriceTierConfig(_Strict):
    """USD per million tokens once a prompt has more than `above_tokens` tokens."""

    above_tokens: int = Field(ge=1)
    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cached_input: float | None = Field(default=None, ge=0)


class ModelConfig(_Strict):
    id: str
    """The provider's model name, or a litellm model string when no provider is given."""
    provider: str | None = None
    family: str | None = None
    """Reviewers never review their own family (default: provider, else litellm's vendor)."""
    price: Price | None = None
    max_output_tokens: int = Field(default=8192, ge=1)
    context_window: int | None = Field(default=None, ge=1)
    script: str | None = None
    """For `scripted/…` ids: a YAML script path or `module:function` (relative to agents.yaml)."""
    quirks: Quirks | None = None
    """Request quirks for this model (over its provider's)."""


class ModelRef(_Strict):
    model: str
    fallbacks: list[str] = Field(default_factory=list)
    """Models tried in order when this one keeps failing (rate limits past retries, server
    errors, context window exceeded)."""


class AgentRef(ModelRef):
    agent: str | None = None
    """An agent CLI (see `agents:`) that works instead of flow's own loop; its model calls
    go through a per-entry proxy to flow's model door."""
    login: bool = False
    """Run the CLI on its user's own login (a Claude or ChatGPT plan) instead of a proxy:
    flow cannot meter or cap those calls and records the CLI's own usage, marked so."""


class BuilderRef(AgentRef):
    count: int = Field(default=1, ge=1, le=32)


AGENT_CLIS = ("opencode", "claude", "aider", "codex")
"""Agent CLIs flow can drive (orchestrator/agents/cli/ has one file each)."""
REVIEWING_CLIS = ("claude", "codex")
"""Those with a read-only mode and structured output, so they can review."""


class AgentSettings(_Strict):
    command: str | None = None
    """The CLI's path or name on PATH (default: its usual command)."""
    version: str | None = None
    """Expected version text (a substring of `COMMAND --version`); checked by validate."""
    args: list[str] = Field(default_factory=list)
    """Extra arguments put before the task."""
    timeout_s: float = Field(default=1800.0, gt=0)
    """Wall-clock limit for one run of the CLI."""
    login_concurrency: int = Field(default=1, ge=1)
    """How many runs on the user's own login (`login: true`) may run at once."""


class Stages(_Strict):
    planner: ModelRef
    builders: list[BuilderRef] = Field(min_length=1)
    reviewers: list[AgentRef] = Field(default_factory=list)
    testers: list[ModelRef] = Field(default_factory=list)
    """Held-out acceptance tests: each tester writes tests from the spec's scenarios in a
    checkout of its own; builders never see them, candidates are judged by them."""


class OutputTokens(_Strict):
    """The most one call of each stage may generate: sent with the request as its output
    limit (never above the model's own), so a call's worst case is what it asked for."""

    planner: int = Field(default=8192, ge=256)
    builders: int = Field(default=32768, ge=256)
    reviewers: int = Field(default=8192, ge=256)
    testers: int = Field(default=32768, ge=256)

    def for_stage(self, stage: str) -> int | None:
        """The cap of a door stage name (`plan`, `build`, `review`, `test`); None: none."""
        names = {"plan": "planner", "build": "builders", "review": "reviewers", "test": "testers"}
        field = names.get(stage)
        return int(getattr(self, field)) if field else None


class Budget(_Strict):
    per_run_usd: float | None = Field(default=None, ge=0)
    per_call_usd: float | None = Field(default=None, ge=0)
    output_tokens: OutputTokens = Field(default_factory=OutputTokens)


class BuilderSettings(_Strict):
    enough: int | None = Field(default=None, ge=1, le=32)
    """Adaptive N: at most this many builders in flight, and none starts once this many
    candidates pass their checks (a spec's `builders: {max, enough}` overrides it)."""
    max_turns: int = Field(default=40, ge=1)
    command_timeout_s: float = Field(default=300.0, gt=0)
    output_cap_bytes: int = Field(default=16_000, ge=256)
    context_share: float = Field(default=0.6, gt=0, le=1)
    """No request of flow's own builder loop passes this share of its model's context window
    (`models.<name>.context_window`, else litellm's map): old tool outputs are elided first."""


class CheckSettings(_Strict):
    timeout_s: float = Field(default=900.0, gt=0)
    output_cap_bytes: int = Field(default=32_000, ge=256)
    env: list[str] = Field(default_factory=list)
    """Variables the checks get although their names look secret (a test database's password);
    never one that agents.yaml reads a model key from."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Under `--ray`: what one candidate's checks hold on a node (`{num_cpus: 2}`, a custom
    resource); builders hold one CPU. Ignored by the local executor."""

    @field_validator("resources")
    @classmethod
    def _amounts(cls, wanted: dict[str, float]) -> dict[str, float]:
        for name, amount in wanted.items():
            if amount < 0:
                raise ValueError(f"{name}: {amount} is negative; give 0 or more")
        return wanted

    @field_validator("env")
    @classmethod
    def _names(cls, names: list[str]) -> list[str]:
        for i, name in enumerate(names):
            if not _VAR_NAME.match(name):
                raise ValueError(
                    f"item {i}, {name!r}, is not an environment variable name "
                    "(letters, digits and _, not starting with a digit)"
                )
        return names


class RaySettings(_Strict):
    address: str | None = None
    """A running cluster (`HOST:PORT` of its head, or `auto`); none: a local Ray instance is
    started for the batch and stopped after it."""
    builder_resources: dict[str, float] = Field(default_factory=lambda: {"num_cpus": 1.0})
    """What one builder holds on a node while it works (it mostly waits for its model: a
    fraction of a CPU lets more builders share a node); the checks hold `checks.resources`."""


class ExecutorSettings(_Strict):
    ray: RaySettings | None = None
    """Run the batch's builders and checks on Ray (as `flow batch --ray`)."""


class ApplySettings(_Strict):
    onto: Literal["base", "tip"] = "base"
    """`base`: the branch starts from the commit the run started from; `tip`: when the base
    branch moved meanwhile, commit on its tip if the winner applies there cleanly and the
    spec's checks pass there, else on the base."""


class Config(_Strict):
    providers: dict[str, Provider] = Field(default_factory=dict)
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    stages: Stages
    budget: Budget = Field(default_factory=Budget)
    builder: BuilderSettings = Field(default_factory=BuilderSettings)
    checks: CheckSettings = Field(default_factory=CheckSettings)
    profiles: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Named stage assignments, applied by `--profile` (see layers.py)."""
    agents: dict[str, AgentSettings] = Field(default_factory=dict)
    """Per agent CLI: command, expected version, extra arguments, time limit."""
    sandbox: Literal["auto", "required"] = "auto"
    """`required`: refuse to run where bubblewrap cannot confine builder commands."""
    apply: ApplySettings = Field(default_factory=ApplySettings)
    """Where the winner is committed when the base branch moved during the run."""
    executor: ExecutorSettings = Field(default_factory=ExecutorSettings)
    """Where builders and checks run: here (default) or on a Ray cluster."""
    reviews: Literal["required", "optional"] = "required"
    """`required`: with reviewers configured, a candidate no review completed for (all failed,
    refused by the budget) is not applied; `optional`: the checks alone may decide."""

    @model_validator(mode="after")
    def _references(self) -> Config:
        for name, model in self.models.items():
            if model.provider is not None and model.provider not in self.providers:
                raise ValueError(f"models.{name}.provider: unknown provider {model.provider!r}")
            if model.id.startswith(SCRIPTED_PREFIX) and not model.script:
                raise ValueError(f"models.{name}.script: a scripted model needs a script")
        for name in self.agents:
            if name not in AGENT_CLIS:
                raise ValueError(
                    f"agents.{name}: unknown agent CLI; known: {', '.join(AGENT_CLIS)}"
                )
        agent_refs: list[tuple[str, int, AgentRef]] = [
            ("builders", i, b) for i, b in enumerate(self.stages.builders)
        ]
        agent_refs += [("reviewers", i, r) for i, r in enumerate(self.stages.reviewers)]
        for stage, i, entry in agent_refs:
            where = f"stages.{stage}.{i}"
            if entry.agent is not None and entry.agent not in AGENT_CLIS:
                raise ValueError(
                    f"{where}.agent: unknown agent CLI {entry.agent!r}; "
                    f"known: {', '.join(AGENT_CLIS)}"
                )
            if entry.login and entry.agent is None:
                raise ValueError(f"{where}.login: only an agent CLI runs on a login; add agent:")
            if stage == "reviewers" and entry.agent and entry.agent not in REVIEWING_CLIS:
                raise ValueError(
                    f"{where}.agent: {entry.agent} cannot review (no read-only structured "
                    f"output); reviewing CLIs: {', '.join(REVIEWING_CLIS)}"
                )
        reviewer_models = [r.model for r in self.stages.reviewers]
        for name in reviewer_models:
            if reviewer_models.count(name) > 1:
                raise ValueError(f"stages.reviewers: {name!r} is listed twice; list it once")
        for where, ref in _stage_refs(self.stages):
            if ref not in self.models and "/" not in ref and catalog.lookup(ref) is None:
                raise ValueError(f"{where}: unknown model {ref!r} (define it under models:)")
        return self


class PriceTier(BaseModel):
    """Prices that apply when a prompt has more than `above_tokens` tokens."""

    above_tokens: int
    input_per_token: float
    output_per_token: float
    cached_per_token: float


_TIER_KEY = re.compile(r"^input_cost_per_token_above_(\d+)k_tokens$")


def _tiers(entry: dict[str, Any], inp: float, out: float, cached: float) -> tuple[PriceTier, ...]:
    """litellm's size tiers of one model (the standard service tier only)."""
    tiers = []
    for key in entry:
        found = _TIER_KEY.match(key)
        if not found:
            continue
        above = f"above_{found.group(1)}k_tokens"
        tier_in = float(entry[key])
        tiers.append(
            PriceTier(
                above_tokens=int(found.group(1)) * 1000,
                input_per_token=tier_in,
                output_per_token=float(entry.get(f"output_cost_per_token_{above}", out)),
                cached_per_token=float(entry.get(f"cache_read_input_token_cost_{above}", tier_in)),
            )
        )
    return tuple(sorted(tiers, key=lambda t: t.above_tokens))


class ResolvedModel(BaseModel):
    """Everything the model door needs to call one configured model."""

    name: str
    litellm_model: str
    provider: str | None
    api: Literal["openai", "anthropic", "litellm", "scripted"]
    base_url: str | None
    api_key_ref: str | None
    family: str
    input_per_token: float
    output_per_token: float
    cached_per_token: float
    price_source: Literal["config", "litellm", "scripted"]
    max_output_tokens: int
    context_window: int | None
    script: Path | str | None = None
    quirks: ResolvedQuirks = DEFAULT_QUIRKS
    """Effective request quirks (fully resolved)."""
    tiers: tuple[PriceTier, ...] = ()
    """litellm's higher prices for prompts above a size (`*_above_200k_tokens`), ascending."""
    reasoning_per_token: float = 0.0
    """litellm's price of a reasoning output token, where it differs from the output price."""

    def prices_for(self, prompt_tokens: int) -> tuple[float, float, float]:
        """(input, output, cached) USD per token for a prompt of this size."""
        price = (self.input_per_token, self.output_per_token, self.cached_per_token)
        for tier in self.tiers:
            if prompt_tokens > tier.above_tokens:
                price = (tier.input_per_token, tier.output_per_token, tier.cached_per_token)
        return price

    def worst_cost(self, prompt_bound: int, output_tokens: int) -> float:
        """The most a call can cost: every price it may reach (any tier up to its prompt bound,
        cache prices, reasoning output) at the most tokens it may send and receive."""
        reachable = [(self.input_per_token, self.output_per_token, self.cached_per_token)]
        reachable += [
            (t.input_per_token, t.output_per_token, t.cached_per_token)
            for t in self.tiers
            if prompt_bound > t.above_tokens
        ]
        prompt = max(max(inp, cached) for inp, _, cached in reachable)
        output = max([out for _, out, _ in reachable] + [self.reasoning_per_token])
        return prompt_bound * prompt + output_tokens * output

    @property
    def scripted(self) -> bool:
        return self.api == "scripted"


class LoadedConfig(BaseModel):
    """A validated config and where it came from."""

    config: Config
    path: Path | None
    models: dict[str, ResolvedModel]

    def model(self, name: str) -> ResolvedModel:
        return self.models[name]

    def output_tokens(self, name: str, stage: str) -> int:
        """The output limit a call of `stage` sends to model `name`: the stage's cap
        (`budget.output_tokens`), never above the model's own."""
        own = self.models[name].max_output_tokens
        cap = self.config.budget.output_tokens.for_stage(stage)
        return min(own, cap) if cap else own

    def worst_call(self, name: str, stage: str, prompt_tokens: int) -> float:
        """The most one call of `stage` with a prompt of this size may cost."""
        return self.models[name].worst_cost(prompt_tokens, self.output_tokens(name, stage))

    def builder_slots(self, override: int | None = None) -> list[str]:
        """Model name per builder slot, in config order; an override trims or cycles the list."""
        slots = [b.model for b in self.config.stages.builders for _ in range(b.count)]
        if override is None or override == len(slots):
            return slots
        return [slots[i % len(slots)] for i in range(override)]

    def builder_agent(self, index: int) -> str | None:
        """The agent CLI of builder slot `index` (slots cycle as in `builder_slots`)."""
        return self.builder_entry(index).agent

    def builder_entry(self, index: int) -> BuilderRef:
        entries = [b for b in self.config.stages.builders for _ in range(b.count)]
        return entries[index % len(entries)]

    def reviewer_entry(self, model: str) -> AgentRef | None:
        return next((r for r in self.config.stages.reviewers if r.model == model), None)

    def agent_entries(self) -> list[tuple[str, AgentRef]]:
        """(where, entry) of every stage entry an agent CLI runs."""
        stages = self.config.stages
        found: list[tuple[str, AgentRef]] = [
            (f"stages.builders.{i}", b) for i, b in enumerate(stages.builders) if b.agent
        ]
        found += [(f"stages.reviewers.{i}", r) for i, r in enumerate(stages.reviewers) if r.agent]
        return found

    def tester_warnings(self) -> list[str]:
        """A tester of a family some builder has may share its blind spots: say so."""
        builders = {self.models[b.model].family for b in self.config.stages.builders}
        out = []
        for i, t in enumerate(self.config.stages.testers):
            family = self.models[t.model].family
            if family in builders:
                out.append(
                    f"stages.testers.{i}: tester {t.model!r} is of family {family!r}, like a "
                    "builder; a tester of a family no builder has makes the held-out tests "
                    "more independent"
                )
        return out

    def reviewers_for(self, builder_model: str) -> list[str]:
        family = self.models[builder_model].family
        names = [r.model for r in self.config.stages.reviewers]
        return [n for n in names if self.models[n].family != family]

    def key_variables(self) -> dict[str, str]:
        """Every environment variable this config reads a model key from → where it says so:
        each provider's `api_key` (used by a stage, a fallback or no one) and the vendor
        variable litellm reads for each bare model id."""
        found: dict[str, str] = {}
        for name, provider in self.config.providers.items():
            if provider.api_key and _ENV_NAME.match(provider.api_key):
                found.setdefault(provider.api_key, f"providers.{name}.api_key")
        for model in self.models.values():
            if model.api == "litellm":
                vendor = catalog.vendor_of(model.litellm_model)
                for var in catalog.VENDOR_KEYS.get(vendor, ()):
                    found.setdefault(var, f"the key litellm reads for models.{model.name}")
        return found

    def fallback_chains(self) -> dict[tuple[str, str], list[str]]:
        """(stage, model) → the models to try after it, from the stage entries."""
        stages = self.config.stages
        chains: dict[tuple[str, str], list[str]] = {}
        entries: list[tuple[str, ModelRef]] = [("plan", stages.planner)]
        entries += [("build", b) for b in stages.builders]
        entries += [("review", r) for r in stages.reviewers]
        entries += [("test", t) for t in stages.testers]
        for stage, ref in entries:
            if ref.fallbacks:
                chains[(stage, ref.model)] = list(ref.fallbacks)
        return chains


def _per_token(per_million: float) -> float:
    return per_million / 1_000_000


def _quirks(
    model: ModelConfig, provider: Provider | None, litellm_model: str, entry: dict[str, Any] | None
) -> ResolvedQuirks:
    """Preset (by provider name, base_url host, model id) < provider quirks < model quirks."""
    if provider is not None:
        vendor = model.provider
    else:
        vendor = str(entry.get("litellm_provider", "")) if entry else ""
        vendor = vendor or model.id.split("/", 1)[0]
    return effective_quirks(
        vendor,
        provider.base_url if provider else None,
        model.id,
        provider.quirks if provider else None,
        model.quirks,
        api="anthropic" if litellm_model.startswith("anthropic/") else "openai",
    )


def _resolve(name: str, model: ModelConfig, config: Config, base: Path | None) -> ResolvedModel:
    provider = config.providers.get(model.provider) if model.provider else None
    entry = catalog.lookup(model.id) if provider is None else None
    if model.id.startswith(SCRIPTED_PREFIX):
        api: Any = "scripted"
        litellm_model = model.id
        family = model.family or name
        script: Path | str | None = model.script
        if isinstance(script, str) and ":" not in script and base is not None:
            script = (base / script).resolve()
    elif provider is not None:
        api = provider.api
        litellm_model = f"{provider.api}/{model.id}"
        family = model.family or str(model.provider)
        script = None
    else:
        api = "litellm"
        litellm_model = model.id
        vendor = str(entry.get("litellm_provider", "")) if entry else ""
        family = model.family or vendor or model.id.split("/", 1)[0]
        script = None
    tiers: tuple[PriceTier, ...] = ()
    reasoning = 0.0
    if model.price is not None:
        inp, out = _per_token(model.price.input), _per_token(model.price.output)
        cached = (
            _per_token(model.price.cached_input) if model.price.cached_input is not None else inp
        )
        source: Any = "config"
        tiers = tuple(
            sorted(
                (
                    PriceTier(
                        above_tokens=t.above_tokens,
                        input_per_token=_per_token(t.input),
                        output_per_token=_per_token(t.output),
                        cached_per_token=_per_token(
                            t.cached_input if t.cached_input is not None else t.input
                        ),
                    )
                    for t in model.price.tiers
                ),
                key=lambda t: t.above_tokens,
            )
        )
    elif api == "scripted":
        inp = out = cached = 0.0
        source = "scripted"
    elif entry is not None and "input_cost_per_token" in entry and "output_cost_per_token" in entry:
        inp, out = float(entry["input_cost_per_token"]), float(entry["output_cost_per_token"])
        cached = float(entry.get("cache_read_input_token_cost", inp))
        source = "litellm"
        tiers = _tiers(entry, inp, out, cached)
        reasoning = float(entry.get("output_cost_per_reasoning_token") or 0.0)
    else:
        raise ConfigError(
            f"models.{name}.price: no known price for {model.id!r}; "
            "add `price: {input: …, output: …}` (USD per million tokens, 0 for flat-rate plans)"
        )
    limit = model.max_output_tokens
    if entry and "max_output_tokens" in entry and "max_output_tokens" not in model.model_fields_set:
        limit = int(entry["max_output_tokens"])
    window = model.context_window or (
        int(entry["max_input_tokens"]) if entry and entry.get("max_input_tokens") else None
    )
    quirks = _quirks(model, provider, litellm_model, entry)
    return ResolvedModel(
        name=name,
        litellm_model=litellm_model,
        provider=model.provider,
        api=api,
        base_url=provider.base_url if provider else None,
        api_key_ref=provider.api_key if provider else None,
        family=family,
        input_per_token=inp,
        output_per_token=out,
        cached_per_token=cached,
        price_source=source,
        max_output_tokens=limit,
        context_window=window,
        script=script,
        quirks=quirks,
        tiers=tiers,
        reasoning_per_token=reasoning,
    )


def _check_reviewers(loaded: LoadedConfig) -> None:
    stages = loaded.config.stages
    if not stages.reviewers:
        return
    for i, b in enumerate(stages.builders):
        if not loaded.reviewers_for(b.model):
            fam = loaded.models[b.model].family
            raise ConfigError(
                f"stages.reviewers: builder {b.model!r} (stages.builders.{i}, family {fam!r}) "
                "has no reviewer of another family; add a reviewer from a different vendor "
                "or set `family:`"
            )


def _stage_refs(stages: Stages) -> list[tuple[str, str]]:
    """(key path, model name) of every model a stage names, fallbacks included."""
    entries: list[tuple[str, ModelRef]] = [("stages.planner", stages.planner)]
    entries += [(f"stages.builders.{i}", b) for i, b in enumerate(stages.builders)]
    entries += [(f"stages.reviewers.{i}", r) for i, r in enumerate(stages.reviewers)]
    entries += [(f"stages.testers.{i}", t) for i, t in enumerate(stages.testers)]
    refs = []
    for where, ref in entries:
        refs.append((f"{where}.model", ref.model))
        refs += [(f"{where}.fallbacks.{j}", f) for j, f in enumerate(ref.fallbacks)]
    return refs


def _implicit_models(config: Config) -> None:
    """Stage references that are litellm model strings become models named after themselves."""
    for _, ref in _stage_refs(config.stages):
        if ref not in config.models:
            config.models[ref] = ModelConfig(id=ref)


Where = Callable[[str], str]
"""Names the layer (file and line, `--set …`, a spec's `models:`) that set a dotted key path."""

_LEADING_PATH = re.compile(r"^([\w][\w.\-/]*): ")


def format_validation_error(source: str | Where, err: ValidationError) -> str:
    """One line per problem: the layer (file and line) that set the key, the dotted key path,
    what was expected; an unknown key gets its likely spelling."""
    label = source if callable(source) else (lambda _path: source)
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key" + _did_you_mean(e["loc"])
        elif e["type"] == "missing":
            msg = "required key is missing"
        path = loc
        if not path and (lead := _LEADING_PATH.match(msg)):
            path = lead.group(1)  # a model validator's message names its key path first
        where = label(path)
        lines.append(f"{where}: {loc}: {msg}" if loc else f"{where}: {msg}")
    # One or two lines: the first problem, and how many more there are.
    more = f"\n({len(lines) - 1} more problems; fix this one first)" if len(lines) > 1 else ""
    return lines[0] + more


def _did_you_mean(loc: tuple[int | str, ...]) -> str:
    """`; did you mean 'model'?` for an unknown key, from the keys its section accepts."""
    known = _keys_at(Config, list(loc[:-1]))
    if not known:
        return " (check the spelling; see agents.yaml in the README)"
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; known keys here: {', '.join(sorted(known))}"


def _keys_at(annotation: Any, loc: list[int | str]) -> list[str]:
    """The keys the pydantic model at `loc` (inside `annotation`) accepts."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _keys_at(typing.get_args(annotation)[0], loc)
    if origin in (typing.Union, types.UnionType):
        for member in typing.get_args(annotation):
            found = _keys_at(member, loc)
            if found:
                return found
        return []
    if origin in (list, dict):
        if not loc:
            return []
        return _keys_at(typing.get_args(annotation)[-1], loc[1:])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if not loc:
            return list(annotation.model_fields)
        field = annotation.model_fields.get(str(loc[0]))
        return _keys_at(field.annotation, loc[1:]) if field is not None else []
    return []


def parse_config(
    data: Any,
    source: str = "agents.yaml",
    base: Path | None = None,
    where: Where | None = None,
) -> LoadedConfig:
    """Validate a parsed agents.yaml document; `where` names the layer behind a key path
    (default: `source` for every key)."""
    label: Where = where or (lambda _path: source)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with providers/models/stages at the top")
    try:
        config = Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(label, err)) from None
    named = set(config.models)
    _implicit_models(config)
    refs = {ref: path for path, ref in reversed(_stage_refs(config.stages))}
    models = {}
    for n, m in config.models.items():
        try:
            models[n] = _resolve(n, m, config, base)
        except ConfigError as err:
            # An implicit model (a stage names a litellm id) came from that stage's layer.
            at = f"models.{n}" if n in named else refs.get(n, f"models.{n}")
            raise ConfigError(f"{label(at)}: {err}") from None
    loaded = LoadedConfig(config=config, path=Path(source) if base else None, models=models)
    try:
        _check_reviewers(loaded)
        _check_checks_env(loaded)
    except ConfigError as err:
        lead = _LEADING_PATH.match(str(err))
        raise ConfigError(f"{label(lead.group(1) if lead else '')}: {err}") from None
    return loaded


def _check_checks_env(loaded: LoadedConfig) -> None:
    keys = loaded.key_variables()
    for i, name in enumerate(loaded.config.checks.env):
        if name in keys:
            raise ConfigError(
                f"checks.env.{i}: {name} is {keys[name]}, and model keys never reach the "
                f"checks; remove {name} from checks.env"
            )


def read_yaml(path: Path) -> Any:
    """A config file's YAML; errors name the file (and the line, for syntax errors)."""
    return read_yaml_lines(path)[0]


def read_yaml_lines(path: Path) -> tuple[Any, dict[str, int]]:
    """A config file's YAML and the line (1-based) of every dotted key path in it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found; pass --config FILE or create agents.yaml") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(
            f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})"
        ) from None
    finally:
        loader.dispose()
    lines: dict[str, int] = {}
    if node is not None:
        _node_lines(node, "", lines)
    return data, lines


def _node_lines(node: yaml.Node, prefix: str, lines: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = f"{prefix}{key.value}"
            lines.setdefault(path, key.start_mark.line + 1)
            _node_lines(value, path + ".", lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines.setdefault(f"{prefix}{i}", item.start_mark.line + 1)
            _node_lines(item, f"{prefix}{i}.", lines)


def line_of(lines: dict[str, int], path: str) -> int | None:
    """The line of `path`, else of its nearest ancestor that has one."""
    while path:
        if path in lines:
            return lines[path]
        path = path.rpartition(".")[0]
    return None


def load_config(path: Path) -> LoadedConfig:
    """Read and validate an agents.yaml file."""
    data, lines = read_yaml_lines(path)

    def where(key: str) -> str:
        line = line_of(lines, key)
        return f"{path}:{line}" if line else str(path)

    loaded = parse_config(data, str(path), path.parent.resolve(), where)
    loaded.path = path
    return loaded


def looks_like_variable(api_key: str) -> bool:
    """An `api_key` written as an environment variable's name, not as the key itself."""
    return bool(_ENV_NAME.match(api_key))


def resolve_api_key(model: ResolvedModel, environ: dict[str, str] | None = None) -> str | None:
    """The key for a model's provider; a missing environment variable is a ConfigError naming it."""
    ref = model.api_key_ref
    if ref is None:
        return None
    env = os.environ if environ is None else environ
    if _ENV_NAME.match(ref):
        value = env.get(ref)
        if not value:
            raise ConfigError(
                f"providers.{model.provider}.api_key: environment variable {ref} is not set; "
                f"export {ref}=… before running flow"
            )
        return value
    return ref


def secret_values(loaded: LoadedConfig, environ: dict[str, str] | None = None) -> list[str]:
    """Every key value this config could send, for redaction."""
    out = []
    for m in loaded.models.values():
        try:
            key = resolve_api_key(m, environ)
        except ConfigError:
            continue
        if key and len(key) >= 6:
            out.append(key)
    return sorted(set(out))
