"""Per-provider request quirks: what each endpoint accepts, resolved once per configured model.

Precedence: built-in defaults < preset (provider name, base_url host, model id) < the
provider's `quirks:` < the model's `quirks:`. Pure data and pure functions: no litellm, no
config import, no I/O.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict

SystemRole = Literal["system", "developer", "user"]
Effort = Literal["default", "low", "medium", "high"]
EffortParam = Literal["reasoning_effort", "reasoning", "thinking", "drop"]
MaxTokensParam = Literal["max_tokens", "max_completion_tokens"]


class Quirks(BaseModel):
    """How requests to one endpoint must be shaped; in config every field is optional (inherit)."""

    model_config = ConfigDict(extra="forbid")

    reasoning_passback: bool | None = None
    """Send earlier turns' reasoning (`reasoning_content`, thinking blocks) back to the model."""
    normalize_tool_schema: bool | None = None
    """Inline `$ref`/`$defs`, give every nested schema a `type` (Moonshot rejects the rest)."""
    strict_tools: bool | None = None
    """Send `strict: true` on function definitions (the schemas must then meet strict mode)."""
    system_role: SystemRole | None = None
    """How system prompts are sent; `user` folds them into the first user message."""
    reasoning_effort: Effort | None = None
    """Reasoning effort to ask for; `default` leaves it to the provider."""
    reasoning_effort_param: EffortParam | None = None
    """How the effort is sent: `reasoning_effort`, OpenRouter's `reasoning: {effort}`,
    a `thinking: {type: enabled}` switch, or `drop` (never sent)."""
    max_tokens_param: MaxTokensParam | None = None
    """Which field carries the output-token limit."""


class ResolvedQuirks(BaseModel):
    """Quirks with every field decided; the defaults are what an unknown endpoint gets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reasoning_passback: bool = True
    normalize_tool_schema: bool = True
    strict_tools: bool = False
    system_role: SystemRole = "system"
    reasoning_effort: Effort = "default"
    reasoning_effort_param: EffortParam = "reasoning_effort"
    max_tokens_param: MaxTokensParam = "max_tokens"

    def over(self, *layers: Quirks | None) -> ResolvedQuirks:
        """These quirks with each later layer's set fields on top."""
        merged = self.model_dump()
        for layer in layers:
            if layer is not None:
                merged.update(layer.model_dump(exclude_none=True))
        return ResolvedQuirks.model_validate(merged)


# Reasoning passback and schema normalization are harmless elsewhere, so they are on for
# every endpoint: a new gateway works unconfigured.
DEFAULTS = ResolvedQuirks()

PRESETS: dict[str, Quirks] = {
    "openai": Quirks(reasoning_effort_param="drop"),  # non-reasoning models reject it
    "anthropic": Quirks(),  # litellm maps reasoning_effort to a thinking budget
    "deepseek": Quirks(),  # reasoning_effort low/high/max; reasoning passback required
    "moonshot": Quirks(reasoning_effort_param="thinking"),
    "minimax": Quirks(reasoning_effort_param="drop"),  # M2 always thinks
    "zhipu": Quirks(reasoning_effort_param="thinking"),
    "gemini": Quirks(),  # rejects `strict` (the default already never sends it)
    "openrouter": Quirks(reasoning_effort_param="reasoning"),
    "local": Quirks(),  # llama.cpp, vLLM, Ollama: conservative defaults
}

# Host suffix → preset; a known vendor host outranks the provider's name.
_HOSTS: tuple[tuple[str, str], ...] = (
    ("api.openai.com", "openai"),
    ("anthropic.com", "anthropic"),
    ("deepseek.com", "deepseek"),
    ("moonshot.cn", "moonshot"),
    ("moonshot.ai", "moonshot"),
    ("kimi.com", "moonshot"),
    ("minimax.io", "minimax"),
    ("minimaxi.com", "minimax"),
    ("minimax.chat", "minimax"),
    ("bigmodel.cn", "zhipu"),
    ("z.ai", "zhipu"),
    ("generativelanguage.googleapis.com", "gemini"),
    ("openrouter.ai", "openrouter"),
)
_NAMES: tuple[tuple[str, str], ...] = (
    ("openrouter", "openrouter"),
    ("openai", "openai"),
    ("anthropic", "anthropic"),
    ("claude", "anthropic"),
    ("deepseek", "deepseek"),
    ("moonshot", "moonshot"),
    ("kimi", "moonshot"),
    ("minimax", "minimax"),
    ("zhipu", "zhipu"),
    ("bigmodel", "zhipu"),
    ("zai", "zhipu"),
    ("z.ai", "zhipu"),
    ("glm", "zhipu"),
    ("gemini", "gemini"),
    ("google", "gemini"),
    ("ollama", "local"),
    ("vllm", "local"),
    ("llama", "local"),
    ("lmstudio", "local"),
    ("local", "local"),
)
_OPENAI_REASONING = re.compile(r"^(openai/)?(gpt-5|o[134])([-.:]|$)")
_OPENAI_CHAT = re.compile(r"^(openai/)?(gpt-4|gpt-3\.5|chatgpt-)")
# Gemma 1 and 2 chat templates raise "System role not supported"; Gemma 3 folds it itself.
_NO_SYSTEM = re.compile(r"(^|/)gemma(-?[12]([-.:]|$)|-\d+b)", re.IGNORECASE)


def _host(base_url: str | None) -> str:
    return (urlparse(base_url).hostname or "").lower() if base_url else ""


def _is_local(host: str) -> bool:
    if host in ("localhost", "host.docker.internal") or host.endswith(".local"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_private


def preset_name(provider: str | None, base_url: str | None, api: str = "openai") -> str | None:
    """Which preset an endpoint gets: a known vendor host, else the provider's name."""
    host = _host(base_url)
    for suffix, preset in _HOSTS:
        if host == suffix or host.endswith("." + suffix):
            return preset
    name = (provider or "").lower()
    for needle, preset in _NAMES:
        if needle in name:
            return preset
    if api == "anthropic":
        return "anthropic"
    if host and _is_local(host):
        return "local"
    return None


def _model_rules(model_id: str, preset: str | None) -> Quirks:
    """Rules that follow the model family wherever it is served."""
    mid = model_id.lower()
    if _OPENAI_REASONING.match(mid):
        return Quirks(
            # OpenRouter takes `max_tokens` for every model and translates it.
            max_tokens_param="max_completion_tokens" if preset != "openrouter" else None,
            reasoning_effort_param="reasoning_effort" if preset == "openai" else None,
            # Gateways differ on `developer`; OpenAI itself prefers it for reasoning models.
            system_role="developer" if preset == "openai" else None,
        )
    if _OPENAI_CHAT.match(mid):
        return Quirks(reasoning_effort_param="drop")
    if _NO_SYSTEM.search(mid):
        return Quirks(system_role="user")
    return Quirks()


def effective_quirks(
    provider_name: str | None,
    base_url: str | None,
    model_id: str,
    provider_quirks: Quirks | None,
    model_quirks: Quirks | None,
    *,
    api: str = "openai",
) -> ResolvedQuirks:
    """The fully resolved quirks (no None) for one model."""
    preset = preset_name(provider_name, base_url, api)
    base = PRESETS.get(preset or "", Quirks())
    resolved = DEFAULTS.over(base, _model_rules(model_id, preset), provider_quirks, model_quirks)
    if api == "anthropic":
        # The Messages API has one limit field, and litellm maps `reasoning_effort` to a
        # thinking budget itself; the other spellings are OpenAI-protocol ones.
        update: dict[str, Any] = {"max_tokens_param": "max_tokens"}
        if resolved.reasoning_effort_param in ("reasoning", "thinking"):
            update["reasoning_effort_param"] = "reasoning_effort"
        resolved = resolved.model_copy(update=update)
    return resolved


# ---- tool-schema normalization ------------------------------------------------------------

_BRANCHES = ("anyOf", "oneOf")
_SCHEMA_MAPS = ("properties", "patternProperties", "dependentSchemas")
# Constraint-only subschemas: adding an inferred type there would change their meaning.
_CONSTRAINTS = ("allOf", "not", "if", "then", "else", "contains", "propertyNames")
_PERMISSIVE: dict[str, Any] = {"type": "object"}


def _value_type(values: list[Any]) -> str:
    kinds = set()
    for v in values:
        if v is None:
            continue
        if isinstance(v, bool):
            kinds.add("boolean")
        elif isinstance(v, int):
            kinds.add("integer")
        elif isinstance(v, float):
            kinds.add("number")
        elif isinstance(v, dict):
            kinds.add("object")
        elif isinstance(v, list):
            kinds.add("array")
        else:
            kinds.add("string")
    if kinds == {"integer", "number"}:
        return "number"
    return kinds.pop() if len(kinds) == 1 else "string"


def _infer_type(node: Mapping[str, Any]) -> str:
    if isinstance(node.get("enum"), list) and node["enum"]:
        return _value_type(node["enum"])
    if "const" in node:
        return _value_type([node["const"]])
    if any(k in node for k in ("properties", "required", "additionalProperties")):
        return "object"
    if "items" in node or "prefixItems" in node:
        return "array"
    return "string"


class _Normalizer:
    """Walks a schema once; `stack` holds the refs being expanded (recursion guard)."""

    def __init__(self, root: Mapping[str, Any]):
        self.defs: dict[str, Any] = {}
        for key in ("definitions", "$defs"):
            found = root.get(key)
            if isinstance(found, Mapping):
                self.defs.update({f"#/{key}/{name}": value for name, value in found.items()})

    def schema(self, node: Any, stack: tuple[str, ...], infer: bool = True) -> Any:
        if not isinstance(node, Mapping):
            return node  # `true`/`false` schemas and malformed parts pass through
        ref = node.get("$ref")
        if isinstance(ref, str):
            return self._ref(ref, node, stack, infer)
        parent = node.get("type")
        branchy = any(isinstance(node.get(k), list) for k in _BRANCHES)
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in ("$defs", "definitions") or (key == "type" and branchy):
                continue  # Moonshot wants the type on each anyOf/oneOf branch, not the parent
            if key in _SCHEMA_MAPS and isinstance(value, Mapping):
                out[key] = {name: self.schema(sub, stack) for name, sub in value.items()}
            elif key in _BRANCHES and isinstance(value, list):
                out[key] = [self.schema(_with_type(b, parent), stack) for b in value]
            elif key in ("items", "prefixItems", "additionalProperties"):
                out[key] = self._each(value, stack, True)
            elif key in _CONSTRAINTS:
                out[key] = self._each(value, stack, False)
            else:
                out[key] = value
        if infer and not branchy and "type" not in out:
            out["type"] = _infer_type(out)
        return out

    def _each(self, value: Any, stack: tuple[str, ...], infer: bool) -> Any:
        if isinstance(value, list):
            return [self.schema(sub, stack, infer) for sub in value]
        return self.schema(value, stack, infer)

    def _ref(self, ref: str, node: Mapping[str, Any], stack: tuple[str, ...], infer: bool) -> Any:
        siblings = {k: v for k, v in node.items() if k != "$ref"}
        target = self.defs.get(ref)
        if target is None or ref in stack:
            # Unknown targets and recursion become a permissive object: safe and finite.
            return self.schema({**_PERMISSIVE, **siblings}, stack, infer)
        base = dict(target) if isinstance(target, Mapping) else dict(_PERMISSIVE)
        return self.schema({**base, **siblings}, (*stack, ref), infer)


def _with_type(branch: Any, parent: Any) -> Any:
    if parent is None or not isinstance(branch, Mapping) or "type" in branch or "$ref" in branch:
        return branch
    return {**branch, "type": parent}


def normalize_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a tool's JSON schema with refs inlined and a `type` on every schema."""
    out = _Normalizer(schema).schema(schema, ())
    return dict(out) if isinstance(out, Mapping) else {"type": "object"}


# ---- hints ----------------------------------------------------------------------------------

# A provider's 400 text → the quirk that usually fixes it.
_HINTS: tuple[tuple[re.Pattern[str], str, Any], ...] = (
    (
        re.compile(r"reasoning_content|thinking block|redacted_thinking", re.IGNORECASE),
        "reasoning_passback",
        True,
    ),
    (re.compile(r"max_completion_tokens"), "max_tokens_param", "max_completion_tokens"),
    (re.compile(r"\bstrict\b", re.IGNORECASE), "strict_tools", False),
    (re.compile(r"developer", re.IGNORECASE), "system_role", "system"),
    (re.compile(r"system role|role: system", re.IGNORECASE), "system_role", "user"),
    (re.compile(r"json schema|\$ref|\$defs", re.IGNORECASE), "normalize_tool_schema", True),
    (re.compile(r"reasoning_effort"), "reasoning_effort_param", "drop"),
)


def quirk_hint(error: str, current: ResolvedQuirks) -> str | None:
    """The quirk a provider's 400 text points at, when it is not already set that way."""
    for pattern, name, value in _HINTS:
        if pattern.search(error) and getattr(current, name) != value:
            shown = str(value).lower() if isinstance(value, bool) else value
            return f"{name}: {shown}"
    return None
