"""Provider quirks: schema normalization, precedence, and per-provider conversations.

Each preset runs a builder conversation (≥ 3 turns) through the real Door and litellm against
the local server made to enforce that provider's rules; then the same conversation with the
quirk switched off in config gets the provider's own 400, as a non-retryable ProviderError.
"""

from __future__ import annotations

import asyncio
import copy
from dataclasses import dataclass, field
from typing import Any

import pytest

from orchestrator.config import ResolvedModel, parse_config
from orchestrator.errors import ConfigError, ProviderError
from orchestrator.llm import wire
from orchestrator.llm.door import Door, _api_base
from orchestrator.llm.messages import Completion, Message, ToolCall, ToolSpec, Usage
from orchestrator.llm.quirks import DEFAULTS, Quirks, effective_quirks, normalize_schema
from orchestrator.llm.scripted import ScriptedModel
from orchestrator.testing.anthropic import messages_handler, requires_thinking
from orchestrator.testing.server import (
    ChatServer,
    Rule,
    moonshot_tool_schemas,
    rejects_argument,
    rejects_max_tokens,
    rejects_role,
    rejects_strict,
    requires_reasoning,
    scripted_handler,
)

KEY_ENV = "QUIRKS_TEST_KEY"

# Builder tools as a generic MCP/pydantic source writes them: `definitions` refs with a
# sibling description, an enum without a type, a recursive type.
TOOLS = [
    ToolSpec(
        name="write_file",
        description="write a file",
        parameters={
            "type": "object",
            "properties": {
                "path": {"type": "string"},
                "content": {"type": "string"},
                "mode": {"enum": ["create", "overwrite"], "description": "how to write"},
            },
            "required": ["path", "content"],
        },
    ),
    ToolSpec(
        name="run",
        description="run a command",
        parameters={
            "type": "object",
            "definitions": {
                "Env": {
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "value": {"type": "string"}},
                }
            },
            "properties": {
                "command": {"type": "string"},
                "env": {"type": "array", "items": {"$ref": "#/definitions/Env"}},
            },
            "required": ["command"],
        },
    ),
    ToolSpec(
        name="finish",
        description="finish the task",
        parameters={"type": "object", "properties": {"summary": {"type": "string"}}},
    ),
]

STEPS = [
    ("write_file", {"path": "a.py", "content": "x = 1\n", "mode": "create"}),
    ("run", {"command": "python a.py", "env": [{"name": "PYTHONHASHSEED", "value": "0"}]}),
    ("finish", {"summary": "wrote a.py and ran it"}),
]


def builder(reasoning: bool) -> ScriptedModel:
    """Three tool calls, each with its reasoning (when the provider returns any), then done."""

    def brain(messages: list[Message], tools: list[ToolSpec], choice: str | None) -> object:
        turn = sum(1 for m in messages if m.role == "assistant")
        usage = Usage(prompt_tokens=100 + 10 * turn, completion_tokens=20)
        if turn >= len(STEPS):
            return {"content": "done"}, usage
        name, args = STEPS[turn]
        reply: dict[str, Any] = {"tool_calls": [{"name": name, "arguments": args}]}
        if reasoning:
            reply["reasoning_content"] = f"step {turn}: call {name} next."
        return reply, usage

    return ScriptedModel("builder", brain)


@dataclass
class Case:
    """One provider preset: its endpoint, the rules it enforces, and a quirk to switch off."""

    provider: str
    model_id: str
    rules: list[Rule]
    off: dict[str, Any]
    """Model `quirks:` that switch the preset's fix off."""
    error: str
    """The provider's text the switched-off conversation gets back."""
    api: str = "openai"
    reasoning: bool = True
    always_think: bool = False
    provider_quirks: dict[str, Any] = field(default_factory=dict)
    model_quirks: dict[str, Any] = field(default_factory=dict)


CASES = {
    "deepseek": Case(
        "deepseek",
        "deepseek-v4-flash",
        [requires_reasoning("deepseek")],
        {"reasoning_passback": False},
        "Missing `reasoning_content` field in the assistant message at message index 2",
    ),
    "moonshot-reasoning": Case(
        "moonshot",
        "kimi-k2.6",
        [requires_reasoning("moonshot"), moonshot_tool_schemas()],
        {"reasoning_passback": False},
        "thinking is enabled but reasoning_content is missing in assistant tool call message "
        "at index 2",
    ),
    "moonshot-schema": Case(
        "kimi",
        "kimi-k2.6",
        [requires_reasoning("moonshot"), moonshot_tool_schemas()],
        {"normalize_tool_schema": False},
        "tools.function.parameters is not a valid moonshot flavored json schema, details: "
        "<At path 'properties.mode': type is not defined>",
    ),
    "minimax-openai": Case(
        "minimax",
        "MiniMax-M2.7",
        [requires_reasoning("minimax")],
        {"reasoning_passback": False},
        "reasoning_content is missing in assistant tool call message at index 2",
    ),
    "minimax-anthropic": Case(
        "minimax",
        "MiniMax-M2.7",
        [requires_thinking(always=True)],
        {"reasoning_passback": False},
        "messages.1.content.0.type: Expected `thinking` or `redacted_thinking`, but found "
        "`tool_use`. When `thinking` is enabled",
        api="anthropic",
        always_think=True,
    ),
    "zhipu": Case(
        "zhipu",
        "glm-4.7",
        [requires_reasoning("zhipu")],
        {"reasoning_passback": False},
        "reasoning_content is missing in assistant tool call message at index 2",
        provider_quirks={"reasoning_effort": "high"},
    ),
    "openai-reasoning": Case(
        "openai",
        "o4-mini-2026-01-15",
        [rejects_max_tokens()],
        {"max_tokens_param": "max_tokens"},
        "Unsupported parameter: 'max_tokens' is not supported with this model. "
        "Use 'max_completion_tokens' instead.",
        reasoning=False,
    ),
    "openai-chat-effort": Case(
        "openai",
        "gpt-4.1-2026-01-15",
        [rejects_argument("reasoning_effort")],
        {"reasoning_effort_param": "reasoning_effort"},
        "Unrecognized request argument supplied: reasoning_effort",
        reasoning=False,
        provider_quirks={"reasoning_effort": "high"},
    ),
    "gateway-strict": Case(
        "gateway",
        "gemini-2.5-pro",
        [rejects_strict()],
        {"strict_tools": True},
        "Unknown name \"strict\" at 'request.tools[0].function_declarations[0]'",
    ),
    "gateway-developer": Case(
        "gateway",
        "o3-mini",
        [rejects_role("developer")],
        {"system_role": "developer"},
        "invalid role 'developer', must be one of: system, user, assistant, tool",
        reasoning=False,
    ),
    "no-system-role": Case(
        "vllm",
        "gemma-2-9b-it",
        [rejects_role("system")],
        {"system_role": "system"},
        "System role not supported",
    ),
    "anthropic": Case(
        "anthropic",
        "claude-sonnet-4-5",
        [requires_thinking()],
        {"reasoning_passback": False},
        "Expected `thinking` or `redacted_thinking`, but found `tool_use`",
        api="anthropic",
        model_quirks={"reasoning_effort": "low"},
    ),
}


def config_for(case: Case, base_url: str, off: bool = False) -> Any:
    model: dict[str, Any] = {
        "provider": case.provider,
        "id": case.model_id,
        "max_output_tokens": 4096,
        "price": {"input": 1.0, "output": 2.0},
    }
    quirks = {**case.model_quirks, **(case.off if off else {})}
    if quirks:
        model["quirks"] = quirks
    provider: dict[str, Any] = {
        "api": case.api,
        "base_url": base_url,
        "api_key": KEY_ENV,
        "retries": 2,
        "timeout_s": 30,
    }
    if case.provider_quirks:
        provider["quirks"] = case.provider_quirks
    return parse_config(
        {
            "providers": {case.provider: provider},
            "models": {"builder": model},
            "stages": {"planner": {"model": "builder"}, "builders": [{"model": "builder"}]},
        }
    )


def server_for(case: Case) -> ChatServer:
    scripts = {case.model_id: builder(case.reasoning)}
    if case.api == "anthropic":
        handler = messages_handler(scripts, always_think=case.always_think)
        return ChatServer(handler, rules=case.rules, protocol="anthropic")
    return ChatServer(scripted_handler(scripts), rules=case.rules)


async def converse(door: Door) -> list[Completion]:
    """The builder loop's shape: call, run the tools, send the results, until no tool call."""
    messages = [Message.system("You are a careful builder."), Message.user("Make a.py and run it.")]
    replies = []
    for _ in range(len(STEPS) + 1):
        done = await door.complete("builder", messages, stage="build", tools=TOOLS)
        replies.append(done)
        messages.append(done.message)
        if not done.message.tool_calls:
            break
        for call in done.message.tool_calls:
            messages.append(Message.tool(call.id, call.name, f"{call.name}: ok"))
    return replies


@pytest.fixture(autouse=True)
def key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-quirks-test-0123456789")


@pytest.mark.parametrize("name", sorted(CASES))
async def test_preset_conversation_succeeds(name: str) -> None:
    case = CASES[name]
    with server_for(case) as srv:
        door = Door(config_for(case, srv.base_url), run_id="r")
        replies = await converse(door)
    assert [r.message.tool_calls[0].name for r in replies[:-1]] == [s[0] for s in STEPS]
    assert replies[-1].message.content == "done"
    assert len(srv.requests) == 4 and srv.refused == []
    if case.reasoning:
        # The reasoning the server returned on turn 1 came back on turn 2.
        assert replies[0].message.reasoning_content == "step 0: call write_file next."
        assert "step 0: call write_file next." in str(srv.requests[1]["messages"])


@pytest.mark.parametrize("name", sorted(CASES))
async def test_quirk_switched_off_gets_the_providers_400(name: str) -> None:
    case = CASES[name]
    with server_for(case) as srv:
        door = Door(config_for(case, srv.base_url, off=True), run_id="r")
        with pytest.raises(ProviderError) as err:
            await converse(door)
    assert err.value.status == 400 and not err.value.retryable
    assert case.error in str(err.value)
    assert len(srv.refused) == 1  # not retried
    [switched] = case.off
    assert f"this endpoint may need `quirks: {{{switched}: " in str(err.value)


async def test_requests_carry_each_fix() -> None:
    """What the presets changed on the wire, request by request."""
    sent: dict[str, list[dict[str, Any]]] = {}
    for name in ("moonshot-schema", "openai-reasoning", "no-system-role", "zhipu", "anthropic"):
        case = CASES[name]
        with server_for(case) as srv:
            await converse(Door(config_for(case, srv.base_url), run_id="r"))
        sent[name] = srv.requests
    run_params = sent["moonshot-schema"][0]["tools"][1]["function"]["parameters"]
    assert "$ref" not in str(run_params) and "definitions" not in run_params
    assert run_params["properties"]["env"]["items"]["properties"]["name"] == {"type": "string"}
    openai = sent["openai-reasoning"][0]
    assert openai["max_completion_tokens"] == 4096 and "max_tokens" not in openai
    first = sent["no-system-role"][0]["messages"][0]
    assert first["role"] == "user"
    assert first["content"] == "You are a careful builder.\n\nMake a.py and run it."
    zhipu = sent["zhipu"][0]
    assert zhipu["thinking"] == {"type": "enabled"} and "reasoning_effort" not in zhipu
    anthropic = sent["anthropic"]
    assert anthropic[0]["thinking"]["type"] == "enabled"
    assert anthropic[0]["system"][0]["text"] == "You are a careful builder."
    assert anthropic[1]["messages"][1]["content"][0]["type"] == "thinking"


# ---- unit tests ------------------------------------------------------------------------------


def test_normalize_inlines_refs_and_adds_types_without_mutating() -> None:
    schema = {
        "$defs": {"Mode": {"enum": ["a", "b"]}},
        "definitions": {"Port": {"type": "integer", "minimum": 1}},
        "properties": {
            "mode": {"$ref": "#/$defs/Mode", "description": "the mode"},
            "port": {"$ref": "#/definitions/Port"},
            "level": {"enum": [1, 2, 3]},
            "ratio": {"enum": [0.5, 1]},
            "flag": {"const": True},
            "tags": {"items": {"type": "string"}},
            "meta": {"properties": {"k": {"type": "string"}}},
            "anything": {"description": "free text"},
            "missing": {"$ref": "#/components/schemas/Gone"},
        },
    }
    before = copy.deepcopy(schema)
    out = normalize_schema(schema)
    assert schema == before
    assert out["type"] == "object" and "$defs" not in out and "definitions" not in out
    props = out["properties"]
    assert props["mode"] == {"enum": ["a", "b"], "description": "the mode", "type": "string"}
    assert props["port"] == {"type": "integer", "minimum": 1}
    assert props["level"]["type"] == "integer" and props["ratio"]["type"] == "number"
    assert props["flag"]["type"] == "boolean"
    assert props["tags"]["type"] == "array" and props["meta"]["type"] == "object"
    assert props["anything"]["type"] == "string"
    assert props["missing"] == {"type": "object"}


def test_normalize_keeps_recursion_finite() -> None:
    schema = {
        "type": "object",
        "$defs": {
            "Node": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}},
                },
            }
        },
        "properties": {"root": {"$ref": "#/$defs/Node"}},
    }
    root = normalize_schema(schema)["properties"]["root"]
    assert root["properties"]["name"] == {"type": "string"}
    assert root["properties"]["children"]["items"] == {"type": "object"}
    assert "$ref" not in str(root)


def test_normalize_moves_the_type_onto_anyof_branches() -> None:
    schema = {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "anyOf": [{"minimum": 10}, {"maximum": -10}]},
            "maybe": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "not_x": {"not": {"enum": ["x"]}},
        },
    }
    props = normalize_schema(schema)["properties"]
    assert props["n"] == {
        "anyOf": [{"minimum": 10, "type": "integer"}, {"maximum": -10, "type": "integer"}]
    }
    assert props["maybe"] == {"anyOf": [{"type": "string"}, {"type": "null"}]}
    assert props["not_x"] == {"not": {"enum": ["x"]}, "type": "string"}


def test_precedence_defaults_preset_provider_model() -> None:
    plain = effective_quirks("corp", "https://llm.corp.example/v1", "some-model", None, None)
    assert plain == DEFAULTS
    assert plain.reasoning_passback and plain.normalize_tool_schema and not plain.strict_tools
    # Preset by name; a known host outranks the name.
    assert effective_quirks("zhipu", None, "glm-4.7", None, None).reasoning_effort_param == (
        "thinking"
    )
    by_host = effective_quirks("zhipu", "https://openrouter.ai/api/v1", "z-ai/glm-4.7", None, None)
    assert by_host.reasoning_effort_param == "reasoning"
    # Model families: OpenAI reasoning models anywhere, `developer` only at OpenAI itself.
    openai = effective_quirks("openai", None, "gpt-5.2", None, None)
    assert (openai.max_tokens_param, openai.system_role) == ("max_completion_tokens", "developer")
    assert openai.reasoning_effort_param == "reasoning_effort"
    routed = effective_quirks("openrouter", None, "openai/gpt-5", None, None)
    assert routed.max_tokens_param == "max_tokens"
    gateway = effective_quirks("gw", "http://10.0.0.5:4000/v1", "o3-mini", None, None)
    assert (gateway.max_tokens_param, gateway.system_role) == ("max_completion_tokens", "system")
    assert effective_quirks("openai", None, "gpt-4.1", None, None).reasoning_effort_param == "drop"
    # Provider quirks over the preset, model quirks over the provider's.
    layered = effective_quirks(
        "openai",
        None,
        "gpt-5",
        Quirks(system_role="user", strict_tools=True),
        Quirks(system_role="system"),
    )
    assert (layered.system_role, layered.strict_tools) == ("system", True)
    assert layered.max_tokens_param == "max_completion_tokens"
    # The Anthropic protocol has one limit field and litellm maps the effort.
    kimi = effective_quirks(
        "kimi", None, "kimi-k2.6", None, Quirks(max_tokens_param=None), api="anthropic"
    )
    assert (kimi.max_tokens_param, kimi.reasoning_effort_param) == (
        "max_tokens",
        "reasoning_effort",
    )


def test_config_resolves_quirks_and_rejects_unknown_keys() -> None:
    loaded = parse_config(
        {
            "providers": {
                "kimi": {
                    "base_url": "https://api.moonshot.ai/v1",
                    "api_key": "K",
                    "quirks": {"reasoning_effort": "high"},
                }
            },
            "models": {
                "k2": {"provider": "kimi", "id": "kimi-k2.6", "price": {"input": 0, "output": 0}},
                "k2x": {
                    "provider": "kimi",
                    "id": "kimi-k2.6",
                    "price": {"input": 0, "output": 0},
                    "quirks": {"reasoning_passback": False},
                },
                "sonnet": {"id": "anthropic/claude-sonnet-4-5"},
            },
            "stages": {"planner": {"model": "k2"}, "builders": [{"model": "k2x"}]},
        }
    )
    k2, k2x = loaded.models["k2"].quirks, loaded.models["k2x"].quirks
    assert (k2.reasoning_effort, k2.reasoning_effort_param, k2.reasoning_passback) == (
        "high",
        "thinking",
        True,
    )
    assert k2x.reasoning_effort == "high" and not k2x.reasoning_passback
    assert loaded.models["sonnet"].quirks.max_tokens_param == "max_tokens"
    with pytest.raises(ConfigError, match=r"providers\.p\.quirks\.stirct_tools: unknown key"):
        parse_config(
            {
                "providers": {"p": {"quirks": {"stirct_tools": True}}},
                "models": {"m": {"provider": "p", "id": "x", "price": {"input": 0, "output": 0}}},
                "stages": {"planner": {"model": "m"}, "builders": [{"model": "m"}]},
            }
        )


def test_wire_applies_each_quirk() -> None:
    call = ToolCall(id="c1", name="finish", arguments="{}")
    blocks = [{"type": "thinking", "thinking": "t", "signature": "s"}]
    convo = [
        Message.system("rules"),
        Message.user("task"),
        Message(
            role="assistant",
            tool_calls=[call],
            reasoning_content="t",
            provider_fields={"thinking_blocks": blocks},
        ),
        Message.tool("c1", "finish", "ok"),
    ]
    kept = wire.messages_to_wire(convo, DEFAULTS)
    assert kept[2]["reasoning_content"] == "t" and kept[2]["thinking_blocks"] == blocks
    dropped = wire.messages_to_wire(convo, DEFAULTS.over(Quirks(reasoning_passback=False)))
    assert "reasoning_content" not in dropped[2] and "thinking_blocks" not in dropped[2]
    dev = wire.messages_to_wire(convo, DEFAULTS.over(Quirks(system_role="developer")))
    assert [m["role"] for m in dev] == ["developer", "user", "assistant", "tool"]
    folded = wire.messages_to_wire(convo[:1], DEFAULTS.over(Quirks(system_role="user")))
    assert folded == [{"role": "user", "content": "rules"}]

    strict = wire.tools_to_wire(TOOLS[:1], DEFAULTS.over(Quirks(strict_tools=True)))
    assert strict is not None and strict[0]["function"]["strict"] is True
    raw = wire.tools_to_wire(TOOLS[1:2], DEFAULTS.over(Quirks(normalize_tool_schema=False)))
    assert raw is not None and raw[0]["function"]["parameters"] == TOOLS[1].parameters
    assert "strict" not in raw[0]["function"]

    def limits(**q: Any) -> dict[str, Any]:
        return wire.limit_params(DEFAULTS.over(Quirks(**q)), 100)

    assert limits() == {"max_tokens": 100}
    assert limits(max_tokens_param="max_completion_tokens") == {"max_completion_tokens": 100}
    assert limits(reasoning_effort="high") == {"max_tokens": 100, "reasoning_effort": "high"}
    assert limits(reasoning_effort="low", reasoning_effort_param="reasoning") == {
        "max_tokens": 100,
        "extra_body": {"reasoning": {"effort": "low"}},
    }
    assert limits(reasoning_effort="low", reasoning_effort_param="thinking")["extra_body"] == {
        "thinking": {"type": "enabled"}
    }
    assert limits(reasoning_effort="high", reasoning_effort_param="drop") == {"max_tokens": 100}


def test_anthropic_base_url_in_openai_style_is_trimmed() -> None:
    loaded = config_for(CASES["anthropic"], "https://api.minimax.io/anthropic/v1/")
    rm: ResolvedModel = loaded.models["builder"]
    assert _api_base(rm) == "https://api.minimax.io/anthropic"
    openai = config_for(CASES["deepseek"], "https://api.deepseek.com/v1")
    assert _api_base(openai.models["builder"]) == "https://api.deepseek.com/v1"


def test_reasoning_details_round_trip_and_switch_off() -> None:
    details = [{"type": "reasoning.text", "text": "plan", "format": "openai-responses-v1"}]
    response = {
        "choices": [
            {
                "message": {
                    "role": "assistant",
                    "content": None,
                    "reasoning_content": "plan",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                        }
                    ],
                    "provider_specific_fields": {"reasoning_details": details},
                }
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2},
    }
    message, _ = wire.response_from_wire(response)
    assert message.provider_fields == {"reasoning_details": details}
    sent = wire.message_to_wire(message)
    assert sent["reasoning_details"] == details and sent["reasoning_content"] == "plan"
    off = wire.message_to_wire(message, DEFAULTS.over(Quirks(reasoning_passback=False)))
    assert "reasoning_details" not in off and "reasoning_content" not in off


def test_empty_reasoning_on_a_tool_call_is_kept_for_the_next_turn() -> None:
    from orchestrator.llm.wire import message_from_wire, messages_to_wire

    call = {"id": "c1", "type": "function", "function": {"name": "read_file", "arguments": "{}"}}
    with_call = message_from_wire(
        {"role": "assistant", "content": None, "reasoning_content": "", "tool_calls": [call]}
    )
    assert with_call.reasoning_content == ""
    assert messages_to_wire([with_call])[0]["reasoning_content"] == ""
    plain = message_from_wire({"role": "assistant", "content": "hi", "reasoning_content": ""})
    assert plain.reasoning_content is None


def test_provider_fields_on_tool_calls_go_back_unchanged() -> None:
    """Gemini 3 answers 400 on the next turn unless a call's thought signature comes back."""
    from orchestrator.llm.wire import message_from_wire, messages_to_wire

    signature = {"google": {"thought_signature": "c2lnbmF0dXJl"}}
    received = message_from_wire(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "index": 0,
                    "extra_content": signature,
                    "function": {"name": "read_file", "arguments": "{}"},
                }
            ],
        }
    )
    sent = messages_to_wire([received])[0]["tool_calls"][0]
    assert sent["extra_content"] == signature
    assert sent["function"] == {"name": "read_file", "arguments": "{}"} and "index" not in sent


def test_thought_signature_survives_the_http_round_trip() -> None:
    from orchestrator.llm.door import Door
    from orchestrator.testing.server import ChatServer, chat_response

    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    call = {
        "id": "c1",
        "type": "function",
        "extra_content": {"google": {"thought_signature": "S"}},
        "function": {"name": "read_file", "arguments": "{}"},
    }
    replies = [
        chat_response("m", {"role": "assistant", "content": None, "tool_calls": [call]}, usage),
        chat_response("m", {"role": "assistant", "content": "done"}, usage),
    ]
    with ChatServer(lambda request: replies.pop(0)) as srv:
        loaded = parse_config(
            {
                "providers": {"p": {"api": "openai", "base_url": srv.base_url}},
                "models": {"m": {"provider": "p", "id": "m", "price": {"input": 0, "output": 0}}},
                "stages": {"planner": {"model": "m"}, "builders": [{"model": "m"}]},
            }
        )
        door = Door(loaded, run_id="r")
        first = asyncio.run(door.complete("m", [Message.user("hi")], stage="s"))
        convo = [Message.user("hi"), first.message, Message.tool("c1", "read_file", "x")]
        asyncio.run(door.complete("m", convo, stage="s"))
        sent = srv.requests[1]["messages"][1]["tool_calls"][0]
    assert sent["extra_content"] == {"google": {"thought_signature": "S"}}
