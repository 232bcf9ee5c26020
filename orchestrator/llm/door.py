"""The one door to the models: budget reservation, per-provider limits, retries, cost, ledger.

litellm is imported on the first real call (see `wire.acompletion`), never at import time.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
from collections.abc import Mapping
from urllib.parse import urlparse

from orchestrator import catalog, pools
from orchestrator.budget import Budget, Reservation
from orchestrator.config import (
    LoadedConfig,
    Provider,
    ResolvedModel,
    resolve_api_key,
    secret_values,
)
from orchestrator.errors import AuthenticationFailed, ConfigError, ProviderError
from orchestrator.events import ModelCall, Notice
from orchestrator.ledger import Ledger
from orchestrator.llm import wire
from orchestrator.llm.limits import Limiter
from orchestrator.llm.messages import Completion, Message, ToolSpec, Usage
from orchestrator.llm.quirks import quirk_hint
from orchestrator.llm.scripted import ScriptedModel
from orchestrator.protocols import EventSink, NullSink
from orchestrator.redact import Redactor, environment_secrets

ALLOW_ENV = "FLOW_ALLOW_MODEL_REQUESTS"
CONNECT_RETRIES = 1
"""Retries for a provider that could not be reached: a server that is down or a mistyped
URL rarely comes back within a backoff, and each retry keeps the run waiting."""
CACHE_WRITE_FACTOR = 1.25
"""Anthropic bills a prompt token written to its cache (5-minute breakpoints) at 1.25 times
its input price."""
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")  # as in config.resolve_api_key


def request_key(
    run_id: str,
    stage: str,
    model: str,
    messages: list[Message],
    tools: list[ToolSpec] | None,
    tool_choice: str | None,
) -> str:
    """A stable identity for one turn of a conversation, so a resumed run finds the reply it
    paid for.

    It names the run, the stage and scope, the model, the turn (how many assistant replies
    the conversation already holds) and a hash of everything except what tools returned:
    system and user prompts, every assistant turn, the tool calls, ids and names, the tools
    offered. Tool output is left out because it differs between a run and its resume (test
    timings, `ls -l`, temporary paths): a resumed agent gets its stored replies back turn by
    turn and runs their tool calls again in its fresh checkout. A different prompt, or a
    reply never received before, changes the hash, and every later turn then asks anew.
    """
    turn = sum(1 for m in messages if m.role == "assistant")
    payload = json.dumps(
        {
            "messages": [_keyed(m) for m in messages],
            "tools": [t.model_dump(mode="json") for t in tools or []],
            "tool_choice": tool_choice,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    digest = hashlib.sha256("\0".join((run_id, stage, model, str(turn), payload)).encode())
    return digest.hexdigest()


def _keyed(message: Message) -> dict[str, object]:
    """What of a message identifies the turn: all of it, except the text a tool returned."""
    if message.role == "tool":
        return message.model_dump(mode="json", exclude={"content"})
    return message.model_dump(mode="json")


_CONTEXT_WORDS = re.compile(
    r"context.{0,20}(window|length|limit)|too (long|many tokens)|"
    r"maximum.{0,30}tokens|ContextWindowExceeded",
    re.IGNORECASE,
)


def falls_back(err: ProviderError) -> bool:
    """Worth another model: rate limits and server errors past their retries, or a prompt
    too long for this model's context window. Not: bad keys, malformed requests."""
    if err.retryable:
        return True
    return err.status in (400, 413) and bool(_CONTEXT_WORDS.search(str(err)))


class _Sent:
    """One attempt: its reservation (taken after the provider slot) and whether the request
    left for the provider."""

    def __init__(self, worst: float):
        self.worst = worst
        self.value = False
        self.reservation: Reservation | None = None

    def settle(self, amount: float) -> None:
        """Book the attempt's cost against its reservation (once; nothing if none was taken)."""
        if self.reservation is not None:
            self.reservation.settle(amount)
            self.reservation = None


def vendor_of(litellm_model: str) -> str:
    """litellm's vendor for a model string (its price map first, else the id's prefix)."""
    entry = catalog.lookup(litellm_model)
    vendor = str(entry.get("litellm_provider", "")) if entry else ""
    return vendor or litellm_model.split("/", 1)[0]


def cost_of(rm: ResolvedModel, usage: Usage) -> float:
    """USD of a reply: litellm's own calculation for a model priced from its map (it knows
    size tiers), else our prices, cached prompt tokens at the cache-read price."""
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    written = min(usage.cache_write_tokens, usage.prompt_tokens - cached)
    if rm.price_source == "litellm":
        known = wire.litellm_cost(
            rm.litellm_model, usage.prompt_tokens, cached, usage.completion_tokens, written
        )
        if known is not None:
            return known
    inp, out, cache = rm.prices_for(usage.prompt_tokens)
    plain = usage.prompt_tokens - cached - written
    return (
        plain * inp
        + cached * cache
        + written * inp * CACHE_WRITE_FACTOR
        + usage.completion_tokens * out
    )


def caches_prompts(rm: ResolvedModel) -> bool:
    """Anthropic's protocol caches a prompt prefix only where the request marks it."""
    return rm.api == "anthropic" or (
        rm.api == "litellm" and vendor_of(rm.litellm_model) == "anthropic"
    )


def takes_cache_key(rm: ResolvedModel) -> bool:
    """OpenAI's own API caches prefixes by itself and routes requests that share a
    `prompt_cache_key` to the same cache; OpenAI-compatible servers may refuse the field."""
    if rm.api == "openai":
        return (rm.base_url or "").startswith("https://api.openai.com")
    return rm.api == "litellm" and vendor_of(rm.litellm_model) == "openai"


def uses_tokenizer(rm: ResolvedModel) -> bool:
    """OpenAI's own models, reached through litellm: tiktoken's encodings ship with litellm,
    so their prompts are counted rather than bounded by bytes."""
    return rm.api == "litellm" and vendor_of(rm.litellm_model) in ("openai", "azure")


def _api_base(rm: ResolvedModel) -> str | None:
    """The endpoint for litellm; it appends `/v1/messages` to an Anthropic-protocol base."""
    base = rm.base_url
    if base and rm.api == "anthropic":
        trimmed = base.rstrip("/")
        # A base copied in OpenAI style (…/v1) would otherwise become …/v1/v1/messages.
        if trimmed.endswith("/v1"):
            return trimmed[: -len("/v1")]
    return base


class Door:
    """Implements `ModelDoor` for every model of a loaded config.

    `stage` and `scope` are part of the response-cache key: parallel agents that may send
    identical conversations to one model pass distinct scopes (e.g. "build-1", "build-2").
    """

    backoff_base_s = 1.0
    backoff_cap_s = 30.0

    def __init__(
        self,
        loaded: LoadedConfig,
        *,
        run_id: str,
        spec: str = "",
        ledger: Ledger | None = None,
        budget: Budget | None = None,
        events: EventSink | None = None,
        limiter: Limiter | None = None,
        environ: Mapping[str, str] | None = None,
    ):
        self.loaded = loaded
        self.run_id = run_id
        self.spec = spec
        self.ledger = ledger
        self.budget = budget
        self.events: EventSink = events or NullSink()
        self.limiter = limiter or Limiter(loaded.config.providers)
        self._environ = environ
        self._scripted: dict[str, ScriptedModel] = {}
        self._redactor: Redactor | None = None
        self._seen: dict[str, int] = {}
        self._refused: dict[str, str] = {}
        """Providers that refused their key in this run, with what they said."""

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
        """One completion; when `model` keeps failing, the `fallbacks` are tried in order.

        `Completion.model` names the model that answered, so an agent can stay on it.
        """
        chain = [model, *(fallbacks or [])]
        if len(chain) > 1:
            stored = await self._replay(chain, messages, stage, tools, tool_choice, scope)
            if stored is not None:
                return stored
        for i, name in enumerate(chain):
            try:
                return await self._complete_one(
                    name, messages, stage=stage, tools=tools, tool_choice=tool_choice, scope=scope
                )
            except ProviderError as err:
                if i == len(chain) - 1 or not falls_back(err):
                    raise
                reason = self._redact(str(err).splitlines()[0])[:300]
                if self.ledger is not None:
                    self.ledger.record(
                        run_id=self.run_id,
                        spec=self.spec,
                        stage=stage,
                        model=name,
                        outcome="fallback",
                        error=f"→ {chain[i + 1]}: {reason}",
                    )
                self.events.emit(
                    Notice(
                        run_id=self.run_id,
                        level="warning",
                        message=f"{name} failed ({reason}); falling back to {chain[i + 1]}",
                    )
                )
        raise AssertionError("unreachable: the loop returns or raises")

    async def _complete_one(
        self,
        model: str,
        messages: list[Message],
        *,
        stage: str,
        tools: list[ToolSpec] | None,
        tool_choice: str | None,
        scope: str,
    ) -> Completion:
        rm = self._resolve(model)
        key = None if rm.scripted else resolve_api_key(rm, self._env_dict())
        self._check_allowed(rm)
        rkey = self._occurrence(
            request_key(self.run_id, f"{stage}/{scope}", rm.name, messages, tools, tool_choice)
        )
        if self.ledger is not None:
            stored = self.ledger.cached(rkey)
            if stored is not None:
                await pools.db(self._log, rm, stage, "replayed", Usage(), 0.0, rkey)
                return stored.model_copy(update={"cost_usd": 0.0})
        bucket = self.bucket(rm)
        refused = self._refused.get(bucket) if bucket else None
        if refused is not None:  # the provider said no once; it is not asked again this run
            raise AuthenticationFailed(refused, retryable=False, status=None)
        try:
            return await self._attempts(
                rm, key, messages, stage, tools, tool_choice, rkey, self._cache_key(stage, scope)
            )
        except AuthenticationFailed as err:
            if bucket:
                self._refused[bucket] = str(err)
            raise

    def _cache_key(self, stage: str, scope: str) -> str:
        """One conversation's name for a provider's prompt cache: the same after a resume,
        different for each agent of a run, and saying nothing of the run or the spec."""
        digest = hashlib.sha256(f"{self.run_id}\0{stage}\0{scope}".encode()).hexdigest()
        return f"flow-{digest[:24]}"

    def output_tokens(self, rm: ResolvedModel, stage: str) -> int:
        """The output limit sent with a call: the stage's cap, never above the model's."""
        if rm.name not in self.loaded.models:
            return rm.max_output_tokens
        return self.loaded.output_tokens(rm.name, stage)

    def worst_case(
        self,
        rm: ResolvedModel,
        messages: list[Message],
        tools: list[ToolSpec] | None,
        stage: str,
    ) -> float:
        """What one attempt may cost at most: reserved before it is sent."""
        prompt = wire.prompt_bound(rm.litellm_model, uses_tokenizer(rm), messages, tools, rm.quirks)
        if caches_prompts(rm):  # every prompt token may be a cache write
            prompt = int(prompt * CACHE_WRITE_FACTOR) + 1
        return rm.worst_cost(prompt, self.output_tokens(rm, stage))

    async def _replay(
        self,
        chain: list[str],
        messages: list[Message],
        stage: str,
        tools: list[ToolSpec] | None,
        tool_choice: str | None,
        scope: str,
    ) -> Completion | None:
        """The stored reply of whichever model of the chain answered this turn before.

        When a fallback answered a turn, a resume must not ask the first model again: it
        might answer this time, be paid, and send the conversation another way.
        """
        if self.ledger is None:
            return None
        for name in chain:
            rm = self._resolve(name)
            base = request_key(
                self.run_id, f"{stage}/{scope}", rm.name, messages, tools, tool_choice
            )
            rkey = self._occurrence(base, take=False)
            stored = self.ledger.cached(rkey)
            if stored is not None:
                self._occurrence(base)
                await pools.db(self._log, rm, stage, "replayed", Usage(), 0.0, rkey)
                return stored.model_copy(update={"cost_usd": 0.0})
        return None

    async def _attempts(
        self,
        rm: ResolvedModel,
        key: str | None,
        messages: list[Message],
        stage: str,
        tools: list[ToolSpec] | None,
        tool_choice: str | None,
        rkey: str,
        cache_key: str,
    ) -> Completion:
        """Call until success, a failure a retry cannot fix, or the provider's retries run out.

        Each attempt holds its own reservation of the worst case. A failure with no HTTP
        status may have been billed, so it is settled at that worst case: the caps stay true
        whatever the provider charges for work it did but never delivered.
        """
        provider = self._provider(rm)
        worst = self.worst_case(rm, messages, tools, stage)
        max_out = self.output_tokens(rm, stage)
        attempt = 0
        while True:
            sent = _Sent(worst)
            try:
                message, usage = await self._call_once(
                    rm, provider, key, messages, tools, tool_choice, sent, max_out, cache_key
                )
            except asyncio.CancelledError:
                # A request on the wire is billed by the provider whether or not we read
                # the reply; only one still waiting for its slot was provably never sent.
                charge = worst if sent.value and not rm.scripted else 0.0
                sent.settle(charge)
                note = "cancelled in flight; counted at its worst case" if charge else None
                self._log(rm, stage, "cancelled", Usage(), charge, rkey, note or "cancelled")
                raise
            except Exception as exc:
                failure = None if rm.scripted else wire.classify(exc)
                if failure is None:
                    # Not a provider failure (a reply we could not read): billed if it was sent.
                    sent.settle(worst if sent.value and not rm.scripted else 0.0)
                    raise
                charge = worst if failure.maybe_billed and sent.value else 0.0
                sent.settle(charge)
                await self._failed(rm, provider, stage, rkey, failure, attempt, charge)
                attempt += 1  # the retry reserves room of its own, after its slot
                continue
            cost = cost_of(rm, usage)
            note = None
            if not rm.scripted and not usage.prompt_tokens and not usage.completion_tokens:
                # No usage in the reply (gateways, local servers): the provider's bill is
                # unknown, so it is counted at the worst case the request allowed.
                cost = worst
                note = f"reply without usage; counted at its worst case, ${worst:.6f}"
            sent.settle(cost)
            completion = Completion(message=message, usage=usage, cost_usd=cost, model=rm.name)
            # The ledger write (an fsync) happens off the event loop all runs share.
            await pools.db(self._log, rm, stage, "ok", usage, cost, rkey, note, completion)
            return completion

    async def _failed(
        self,
        rm: ResolvedModel,
        provider: Provider,
        stage: str,
        rkey: str,
        failure: wire.Failure,
        attempt: int,
        charge: float,
    ) -> None:
        """Record a failed attempt; raise unless a retry can help, else wait for it."""
        retries = (
            min(provider.retries, CONNECT_RETRIES) if failure.unreachable else provider.retries
        )
        retry = failure.retryable and attempt < retries
        error = self._redact(failure.message)[:500]
        if charge:
            error = f"{error} (no reply; counted at its worst case, ${charge:.6f})"
        outcome = "retry" if retry else "error"
        await pools.db(self._log, rm, stage, outcome, Usage(), charge, rkey, error)
        if not retry:
            raise self._provider_error(rm, failure) from None
        delay = self._delay(failure, attempt)
        what = (
            f"cannot connect to {self._endpoint(rm)} ({failure.message})"
            if failure.unreachable
            else f"HTTP {failure.status or 'error'}"
        )
        self.events.emit(
            Notice(
                run_id=self.run_id,
                level="warning",
                message=f"{rm.name}: {what}; retry {attempt + 1}/{retries} in {delay:.1f}s",
            )
        )
        await asyncio.sleep(delay)

    async def _call_once(
        self,
        rm: ResolvedModel,
        provider: Provider,
        key: str | None,
        messages: list[Message],
        tools: list[ToolSpec] | None,
        tool_choice: str | None,
        sent: _Sent,
        max_out: int,
        cache_key: str,
    ) -> tuple[Message, Usage]:
        if rm.scripted:
            await self._hold(sent)
            sent.value = True
            return self._script(rm).reply(messages, tools, tool_choice)
        quirks = rm.quirks
        sent_messages = wire.messages_to_wire(messages, quirks)
        if caches_prompts(rm):
            sent_messages = wire.cache_breakpoints(sent_messages)
        kwargs: dict[str, object] = {
            "model": rm.litellm_model,
            "messages": sent_messages,
            **wire.limit_params(quirks, max_out),
            "timeout": provider.timeout_s,
            "num_retries": 0,  # retries happen here, where the budget and ledger can see them
            "drop_params": True,
        }
        if takes_cache_key(rm):
            kwargs["prompt_cache_key"] = cache_key
        if tools:
            kwargs["tools"] = wire.tools_to_wire(tools, quirks)
            if tool_choice is not None:
                kwargs["tool_choice"] = wire.tool_choice_to_wire(tool_choice)
        if rm.api != "litellm":
            if rm.base_url:
                kwargs["api_base"] = _api_base(rm)
            if key is None and rm.api == "openai":
                key = "sk-none"  # local OpenAI-compatible servers want some key
        if key is not None:
            kwargs["api_key"] = key
        await wire.warm_up()
        async with self.limiter.slot(self.bucket(rm)):
            # Reserve only once the slot is ours: a call queued for a slot holds no money
            # that a call ready to go could use.
            await self._hold(sent)
            sent.value = True  # from here on the provider may have the request
            if self._streams(provider, max_out):
                response, usage_seen = await wire.acompletion_streamed(**kwargs)
            else:
                response, usage_seen = await wire.acompletion(**kwargs), True
        message, usage = wire.response_from_wire(response)
        return message, usage if usage_seen else Usage()

    @staticmethod
    def _streams(provider: Provider, max_out: int) -> bool:
        """Long generations stream (Anthropic-protocol providers are called whole)."""
        if provider.stream == "never" or provider.api == "anthropic":
            return False
        return provider.stream == "always" or max_out > wire.STREAM_ABOVE_TOKENS

    async def _hold(self, sent: _Sent) -> None:
        """Reserve the attempt's worst case, waiting while other calls' reservations fill the
        room; BudgetExceeded only when a cap cannot hold it even once they settle."""
        if self.budget is not None:
            sent.reservation = await self.budget.wait_reserve(sent.worst)

    def _delay(self, failure: wire.Failure, attempt: int) -> float:
        if failure.retry_after is not None:
            return failure.retry_after
        ceiling = min(self.backoff_cap_s, self.backoff_base_s * 2.0**attempt)
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    @staticmethod
    def _endpoint(rm: ResolvedModel) -> str:
        """The URL a model is called at, as the user would recognise it."""
        if rm.base_url:
            return rm.base_url
        return f"the {catalog.vendor_of(rm.litellm_model)} API (litellm's default URL)"

    def _provider_error(self, rm: ResolvedModel, failure: wire.Failure) -> ProviderError:
        status = failure.status
        if failure.unreachable:
            where = f"provider {rm.provider!r}" if rm.provider else f"models.{rm.name}"
            fix = f"providers.{rm.provider}.base_url" if rm.provider else "the network"
            return ProviderError(
                f"{rm.name}: cannot connect to {self._endpoint(rm)} ({where}: "
                f"{failure.message}); check that the server is up and {fix}",
                retryable=True,
                status=None,
            )
        if failure.auth:
            ref = rm.api_key_ref
            if ref is None:
                where = "the vendor's API key environment variable (read by litellm)"
            elif _ENV_NAME.match(ref):
                where = f"the environment variable {ref}"
            else:
                where = f"providers.{rm.provider}.api_key"
            return AuthenticationFailed(
                f"{rm.name}: the provider refused the API key (HTTP {status}); check {where}",
                retryable=False,
                status=status,
            )
        detail = self._redact(failure.message)[:300]
        hint = quirk_hint(failure.message, rm.quirks) if status in (400, 422) else None
        where = f"providers.{rm.provider}" if rm.provider else f"models.{rm.name}"
        advice = f"; this endpoint may need `quirks: {{{hint}}}` under {where}" if hint else ""
        return ProviderError(
            f"{rm.name}: provider call failed (HTTP {status or '-'}): {detail}{advice}",
            retryable=failure.retryable,
            status=status,
        )

    def _log(
        self,
        rm: ResolvedModel,
        stage: str,
        outcome: str,
        usage: Usage,
        cost: float,
        rkey: str,
        error: str | None = None,
        response: Completion | None = None,
    ) -> None:
        if self.ledger is not None:
            self.ledger.record(
                run_id=self.run_id,
                spec=self.spec,
                stage=stage,
                model=rm.name,
                provider=self._provider_label(rm),
                usage=usage,
                cost_usd=cost,
                outcome=outcome,
                error=error,
                request_key=rkey,
                response=self._redacted(response),
            )
        self.events.emit(
            ModelCall(
                run_id=self.run_id,
                stage=stage,
                model=rm.name,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cost_usd=cost,
                outcome=outcome,
            )
        )

    def _resolve(self, name: str) -> ResolvedModel:
        rm = self.loaded.models.get(name)
        if rm is None:
            known = ", ".join(sorted(self.loaded.models))
            raise ConfigError(f"unknown model {name!r}; known: {known}")
        return rm

    def _script(self, rm: ResolvedModel) -> ScriptedModel:
        model = self._scripted.get(rm.name)
        if model is None:
            if rm.script is None:
                raise ConfigError(f"models.{rm.name}.script: a scripted model needs a script")
            model = self._scripted[rm.name] = ScriptedModel(rm.name, rm.script)
        return model

    def _provider(self, rm: ResolvedModel) -> Provider:
        found = self.loaded.config.providers.get(rm.provider) if rm.provider else None
        return found or Provider()

    @staticmethod
    def bucket(rm: ResolvedModel) -> str | None:
        """The concurrency bucket: the configured provider, else the vendor of a bare litellm
        id (every `gpt-*` is `openai`), so a `providers.<vendor>` entry sets its slots."""
        if rm.scripted:
            return None
        return rm.provider or vendor_of(rm.litellm_model)

    @staticmethod
    def _provider_label(rm: ResolvedModel) -> str:
        if rm.scripted:
            return "scripted"
        return rm.provider or rm.litellm_model.split("/", 1)[0]

    def _env_dict(self) -> dict[str, str] | None:
        return None if self._environ is None else dict(self._environ)

    def _check_allowed(self, rm: ResolvedModel) -> None:
        """Tests block real model calls (FLOW_ALLOW_MODEL_REQUESTS=0); local servers stay open."""
        env = os.environ if self._environ is None else self._environ
        if rm.scripted or env.get(ALLOW_ENV, "1") != "0":
            return
        host = urlparse(rm.base_url or "").hostname
        if host not in _LOOPBACK:
            raise ProviderError(f"{rm.name}: real model requests are disabled ({ALLOW_ENV}=0)")

    def _occurrence(self, key: str, *, take: bool = True) -> str:
        """The n-th request of this run with one key gets its own key (`key#n`).

        A turn's key leaves tool output out, so two requests of one scope can share it: one
        re-asked after an unusable reply, or parallel calls of one agent CLI. Neither may be
        answered with the other's stored reply; a resumed run asks in the same order and
        replays each. Parallel builders differ by scope, so they never share a key.
        `take=False` only looks at the next key, without counting the request.
        """
        n = self._seen.get(key, 0)
        if take:
            self._seen[key] = n + 1
        return key if n == 0 else f"{key}#{n}"

    def _redact(self, text: str) -> str:
        if self._redactor is None:
            env = os.environ if self._environ is None else self._environ
            # litellm-routed models read vendor keys from the environment itself.
            vendor = environment_secrets(env)
            self._redactor = Redactor(secret_values(self.loaded, self._env_dict()) + vendor)
        return self._redactor(text)

    def _redacted(self, completion: Completion | None) -> Completion | None:
        """What is stored for replay: a reply that echoed a key keeps no copy of it on disk."""
        if completion is None:
            return None
        text = completion.model_dump_json()
        clean = self._redact(text)
        return completion if clean == text else Completion.model_validate_json(clean)
