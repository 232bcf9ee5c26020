"""Scripted models: deterministic functions of the conversation, for tests and the offline demo.

A script is a YAML file of replies (the reply index is the number of assistant messages
already in the conversation, so a resumed conversation gets the same reply) or a callable
`(messages, tools, tool_choice) -> Message | dict | (Message, Usage)`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator.errors import ConfigError
from orchestrator.llm.messages import Message, ToolCall, ToolSpec, Usage

ScriptFn = Callable[[list[Message], list[ToolSpec], str | None], Any]
_MODULE = re.compile(r"^[A-Za-z_][\w.]*$")
EXHAUSTED = "(script exhausted)"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScriptToolCall(_Strict):
    name: str
    arguments: dict[str, Any] | str = Field(default_factory=dict)
    """A mapping (JSON-encoded for the model) or the raw JSON text itself."""


class ScriptUsage(_Strict):
    prompt: int = Field(ge=0)
    completion: int = Field(ge=0)
    cached: int = Field(default=0, ge=0)


class ScriptReply(_Strict):
    content: str | None = None
    tool_calls: list[ScriptToolCall] = Field(default_factory=list)
    reasoning_content: str | None = None
    usage: ScriptUsage | None = None
    """Reported token usage; default: characters / 4 of the conversation and of the reply."""


class Script(_Strict):
    replies: list[ScriptReply] = Field(default_factory=list)
    fallback: ScriptReply | None = None
    """Reply once `replies` are used up; default: content "(script exhausted)"."""


def _chars(messages: list[Message]) -> int:
    total = 0
    for m in messages:
        total += len(m.content or "") + len(m.reasoning_content or "")
        total += sum(len(c.name) + len(c.arguments) for c in m.tool_calls)
    return total


def default_usage(messages: list[Message], reply: Message) -> Usage:
    return Usage(
        prompt_tokens=math.ceil(_chars(messages) / 4),
        completion_tokens=math.ceil(_chars([reply]) / 4),
    )


def _arguments(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _assistant(data: dict[str, Any], turn: int) -> Message:
    """A reply given as a dict: tool calls may omit ids and give arguments as a mapping."""
    calls = []
    for i, raw in enumerate(data.get("tool_calls") or []):
        call = dict(raw) if isinstance(raw, dict) else raw.model_dump()
        call.setdefault("id", f"call_{turn}_{i}")
        call["arguments"] = _arguments(call.get("arguments", {}))
        calls.append(ToolCall.model_validate(call))
    body = {k: v for k, v in data.items() if k not in ("tool_calls", "usage")}
    body["role"] = "assistant"
    return Message.model_validate({**body, "tool_calls": calls})


def _load_callable(script: str) -> ScriptFn:
    target, _, attr = script.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise ConfigError(f"scripted model script {script!r}: file {target} not found")
            module_name = "flow_script_" + hashlib.sha1(target.encode()).hexdigest()[:12]
            spec = importlib.util.spec_from_file_location(module_name, path)
            if spec is None or spec.loader is None:
                raise ConfigError(f"scripted model script {script!r}: cannot load {target}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        elif _MODULE.match(target):
            module = importlib.import_module(target)
        else:
            raise ConfigError(
                f"scripted model script {script!r}: expected FILE.py:FUNCTION, "
                "MODULE:FUNCTION or a YAML file"
            )
    except ConfigError:
        raise
    except Exception as err:  # any error while importing user code is a script error
        raise ConfigError(f"scripted model script {script!r}: import failed ({err})") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"scripted model script {script!r}: no function {attr!r} in {target}")
    return fn  # type: ignore[no-any-return]


def _load_yaml(path: Path) -> Script:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"scripted model script {path}: not found") from None
    except OSError as err:
        raise ConfigError(f"scripted model script {path}: cannot read ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"scripted model script {path}: not valid YAML ({err})") from None
    try:
        return Script.model_validate(data if data is not None else {})
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ConfigError(f"scripted model script {path}: {loc}: {first['msg']}") from None


class ScriptedModel:
    """A model whose replies are a deterministic function of the conversation."""

    def __init__(self, name: str, script: Path | str | ScriptFn):
        self.name = name
        self._fn: ScriptFn | None = None
        self._script: Script | None = None
        if callable(script):
            self._fn = script
            self.source = getattr(script, "__qualname__", repr(script))
        elif isinstance(script, str) and ":" in script and not Path(script).is_file():
            self._fn = _load_callable(script)
            self.source = script
        else:
            self._script = _load_yaml(Path(script))
            self.source = str(script)

    def reply(
        self,
        messages: list[Message],
        tools: list[ToolSpec] | None = None,
        tool_choice: str | None = None,
    ) -> tuple[Message, Usage]:
        """The assistant's next message and the usage it reports."""
        turn = sum(1 for m in messages if m.role == "assistant")
        if self._fn is not None:
            return self._call(messages, tools or [], tool_choice, turn)
        assert self._script is not None
        replies = self._script.replies
        if turn < len(replies):
            step: ScriptReply | None = replies[turn]
        else:
            step = self._script.fallback
        if step is None:
            message = Message(role="assistant", content=EXHAUSTED)
            return message, default_usage(messages, message)
        message = _assistant(step.model_dump(exclude={"usage"}), turn)
        if step.usage is None:
            return message, default_usage(messages, message)
        u = step.usage
        return message, Usage(
            prompt_tokens=u.prompt, cached_tokens=u.cached, completion_tokens=u.completion
        )

    def _call(
        self, messages: list[Message], tools: list[ToolSpec], tool_choice: str | None, turn: int
    ) -> tuple[Message, Usage]:
        assert self._fn is not None
        result = self._fn([m.model_copy(deep=True) for m in messages], tools, tool_choice)
        usage: Usage | None = None
        if isinstance(result, tuple) and len(result) == 2:
            result, usage = result
            if not isinstance(usage, Usage):
                usage = Usage.model_validate(usage)
        if isinstance(result, Message):
            message = result.model_copy(update={"role": "assistant"})
        elif isinstance(result, dict):
            message = _assistant(result, turn)
        elif isinstance(result, str):
            message = Message(role="assistant", content=result)
        else:
            raise ConfigError(
                f"scripted model {self.name} ({self.source}): the script returned "
                f"{type(result).__name__}; expected a Message, a dict or a tuple"
            )
        return message, usage if usage is not None else default_usage(messages, message)
