"""The Anthropic messages dialect both ways, and what litellm's adapter alone gets wrong."""

from __future__ import annotations

import json
from typing import Any

from orchestrator.llm.messages import Completion, Message, ToolCall, Usage
from orchestrator.proxy import DIALECTS, anthropic, dialect_for

SIGNED = {"type": "thinking", "thinking": "plan it", "signature": "sig-abc"}


def request() -> dict[str, Any]:
    return {
        "model": "glm-4.7",
        "max_tokens": 32000,
        "stream": True,
        "thinking": {"type": "adaptive"},
        "system": [
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.197;"},
            {"type": "text", "text": "You are Claude Code."},
            {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
        ],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Fix the bug shown here."},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png"}},
                    {
                        "type": "document",
                        "title": "notes",
                        "source": {"type": "text", "media_type": "text/plain", "data": "x"},
                    },
                ],
            },
            {
                "role": "assistant",
                "content": [
                    SIGNED,
                    {"type": "thinking", "thinking": "unsigned", "signature": ""},
                    {"type": "text", "text": "Looking."},
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "Bash",
                        "input": {"command": "ls"},
                    },
                    {"type": "tool_use", "id": "toolu_2", "name": "Read", "input": {"path": "a"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "a.py"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_2",
                        "is_error": True,
                        "content": [{"type": "text", "text": "no such file"}],
                    },
                    {"type": "text", "text": "Go on."},
                ],
            },
        ],
        "tools": [
            {
                "name": "Bash",
                "description": "Run a command.",
                "input_schema": {
                    "type": "object",
                    "properties": {"command": {"type": "string"}},
                    "required": ["command"],
                },
                "cache_control": {"type": "ephemeral"},
            },
            {"name": "Read", "description": "Read a file.", "input_schema": {"type": "object"}},
            {"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
        ],
        "tool_choice": {"type": "tool", "name": "Bash"},
    }


def test_registered_for_messages_and_count_tokens() -> None:
    assert dialect_for("/v1/messages") is anthropic.DIALECT
    assert dialect_for("/v1/messages/count_tokens") is anthropic.DIALECT
    assert "/v1/messages" in DIALECTS


def test_request_becomes_flows_conversation() -> None:
    messages, tools, choice = anthropic.request_from_wire(request())
    roles = [m.role for m in messages]
    assert roles == ["system", "user", "assistant", "tool", "tool", "user"]
    # Blocks apart, the billing header gone.
    assert messages[0].content == "You are Claude Code.\n\nBe brief."
    user = messages[1].content or ""
    assert user.startswith("Fix the bug shown here.")
    assert "[image (image/png) left out" in user and "[document 'notes' (text/plain)" in user
    assistant = messages[2]
    assert assistant.content == "Looking."
    assert [(c.id, c.name, c.parsed()) for c in assistant.tool_calls] == [
        ("toolu_1", "Bash", {"command": "ls"}),
        ("toolu_2", "Read", {"path": "a"}),
    ]
    # A signed block goes back to an Anthropic upstream verbatim; an unsigned one (flow made
    # it from another provider's reasoning) only as reasoning text.
    assert assistant.provider_fields["thinking_blocks"] == [SIGNED]
    assert "plan it" in (assistant.reasoning_content or "")
    assert "unsigned" in (assistant.reasoning_content or "")
    assert (messages[3].tool_call_id, messages[3].content) == ("toolu_1", "a.py")
    assert messages[4].tool_call_id == "toolu_2"
    assert "error" in (messages[4].content or "") and "no such file" in (messages[4].content or "")
    assert messages[5].content == "Go on."
    assert [t.name for t in tools] == ["Bash", "Read"]  # the hosted web search is left out
    assert tools[0].parameters["required"] == ["command"]
    assert choice == "Bash"


def test_tool_choice_and_plain_system() -> None:
    body = {"system": "Be terse.", "messages": [{"role": "user", "content": "hi"}]}
    tools = request()["tools"][:1]
    for given, want in [({"type": "any"}, "required"), ({"type": "auto"}, "auto"), (None, None)]:
        messages, _, choice = anthropic.request_from_wire(
            {**body, "tools": tools, "tool_choice": given}
        )
        assert choice == want
        assert [(m.role, m.content) for m in messages] == [("system", "Be terse."), ("user", "hi")]


def test_system_messages_between_turns_join_the_users_turn() -> None:
    body = {
        "system": "Top.",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Task."}]},
            {"role": "system", "content": "Agents you may use: none."},
            {"role": "assistant", "content": "Ok."},
            {"role": "system", "content": [{"type": "text", "text": "Late note."}]},
        ],
    }
    messages, _, _ = anthropic.request_from_wire(body)
    assert [m.role for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[1].content == (
        "Task.\n\n<system-reminder>\nAgents you may use: none.\n</system-reminder>"
    )
    assert "Late note." in (messages[3].content or "")


def completion(**message: Any) -> Completion:
    return Completion(
        message=Message(role="assistant", **message),
        usage=Usage(prompt_tokens=1200, cached_tokens=1000, completion_tokens=30),
        cost_usd=0.01,
        model="glm",
    )


def tool_reply() -> Completion:
    calls = [
        ToolCall(id="call_1", name="Bash", arguments='{"command": "ls -a"}'),
        ToolCall(id="call_2", name="Write", arguments='{"file_path": "/x", "content": "é"}'),
    ]
    return completion(content="Running.", tool_calls=calls, reasoning_content="think")


def test_response_blocks_stop_reason_and_usage() -> None:
    body = anthropic.response(tool_reply(), {})
    assert body["type"] == "message" and body["role"] == "assistant"
    assert body["id"].startswith("msg_")
    assert [b["type"] for b in body["content"]] == ["thinking", "text", "tool_use", "tool_use"]
    assert body["content"][2] == {
        "type": "tool_use",
        "id": "call_1",
        "name": "Bash",
        "input": {"command": "ls -a"},
    }
    assert body["content"][3]["input"] == {"file_path": "/x", "content": "é"}
    assert body["stop_reason"] == "tool_use"
    assert body["usage"] == {
        "input_tokens": 200,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 1000,
        "output_tokens": 30,
    }
    text = anthropic.response(completion(content="Done."), {})
    assert text["stop_reason"] == "end_turn"
    assert text["content"] == [{"type": "text", "text": "Done."}]
    # Signed thinking from an Anthropic upstream is returned as it came.
    signed = anthropic.response(
        completion(content="ok", provider_fields={"thinking_blocks": [SIGNED]})
    )
    assert signed["content"][0] == SIGNED


def events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for chunk in raw.decode().split("\n\n"):
        if not chunk.strip():
            continue
        lines = dict(line.split(": ", 1) for line in chunk.splitlines())
        data = json.loads(lines["data"])
        assert lines["event"] == data["type"]
        out.append((lines["event"], data))
    return out


def accumulate(stream: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """What an Anthropic client rebuilds from the events (as the SDK's stream helper does)."""
    message: dict[str, Any] = {}
    partial: dict[int, str] = {}
    for kind, e in stream:
        if kind == "message_start":
            message = e["message"]
        elif kind == "content_block_start":
            assert e["index"] == len(message["content"])
            message["content"].append(dict(e["content_block"]))
        elif kind == "content_block_delta":
            block, d = message["content"][e["index"]], e["delta"]
            if d["type"] == "text_delta":
                block["text"] += d["text"]
            elif d["type"] == "input_json_delta":
                partial[e["index"]] = partial.get(e["index"], "") + d["partial_json"]
            elif d["type"] == "thinking_delta":
                block["thinking"] += d["thinking"]
            elif d["type"] == "signature_delta":
                block["signature"] = d["signature"]
        elif kind == "content_block_stop" and e["index"] in partial:
            message["content"][e["index"]]["input"] = json.loads(partial[e["index"]])
        elif kind == "message_delta":
            message.update(e["delta"])
            message["usage"] = {**message["usage"], **e["usage"]}
    return message


def test_stream_rebuilds_the_same_message() -> None:
    reply = tool_reply()
    stream = events(anthropic.sse(reply, {"stream": True}))
    kinds = [k for k, _ in stream]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert stream[0][1]["message"]["stop_reason"] is None
    deltas = {e["delta"]["type"] for k, e in stream if k == "content_block_delta"}
    assert {"text_delta", "input_json_delta", "thinking_delta"} <= deltas
    rebuilt = accumulate(stream)
    whole = anthropic.response(reply, {})
    for key in ("content", "stop_reason", "usage", "model", "role"):
        assert rebuilt[key] == whole[key], key
    delta_usage = next(e for k, e in stream if k == "message_delta")["usage"]
    assert delta_usage["output_tokens"] == 30 and delta_usage["cache_read_input_tokens"] == 1000


def test_count_tokens_is_answered_locally() -> None:
    body = request()
    counted = anthropic.DIALECT.local("/v1/messages/count_tokens", body)
    assert counted is not None and counted["input_tokens"] > 100
    bigger = {**body, "messages": [*body["messages"], {"role": "user", "content": "x" * 4000}]}
    more = anthropic.DIALECT.local("/v1/messages/count_tokens", bigger)
    assert more is not None and more["input_tokens"] >= counted["input_tokens"] + 1000
    assert anthropic.DIALECT.local("/v1/messages", body) is None  # a real call


def test_error_shape() -> None:
    assert anthropic.error("budget: run cap", "invalid_request_error") == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "budget: run cap"},
    }


def test_what_litellms_adapter_alone_gets_wrong() -> None:
    """The repairs above exist because the adapter, unaided, loses these (litellm 1.102)."""
    from litellm.llms.anthropic.experimental_pass_through.adapters.transformation import (
        LiteLLMAnthropicMessagesAdapter,
    )
    from litellm.types.utils import ModelResponse

    from orchestrator.proxy import chat

    adapter = LiteLLMAnthropicMessagesAdapter()
    openai, _ = adapter.translate_anthropic_to_openai(request())
    messages, _, _ = chat.request_from_wire(openai)
    # The system blocks run together and the billing header reaches the model.
    assert messages[0].content is not None and "x-anthropic-billing-header" in messages[0].content
    assert "Claude Code.Be brief." in messages[0].content
    # The image becomes an image_url part (flow's text messages drop it without a word) and
    # the text document vanishes.
    assert messages[1].content == "Fix the bug shown here."
    # A tool result's is_error is lost.
    assert messages[4].content == "no such file"
    # The hosted web search tool turns into `web_search_options`.
    assert "web_search_options" in openai
    # Back the other way an empty text answer becomes an empty text block (the Anthropic API
    # refuses one when the client sends it back) and reasoning a thinking block whose
    # signature is null.
    response = ModelResponse(
        choices=[
            {
                "message": {
                    "role": "assistant",
                    "content": "",
                    "reasoning_content": "think",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "Bash", "arguments": '{"command":"ls"}'},
                        }
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        usage={"prompt_tokens": 10, "completion_tokens": 2},
    )
    theirs = adapter.translate_openai_response_to_anthropic(response)
    kinds = [(b["type"], b.get("text"), b.get("signature", "-")) for b in theirs["content"]]
    assert ("text", "", "-") in kinds and ("thinking", None, None) in kinds
    ours = anthropic.response(
        completion(
            content="",
            reasoning_content="think",
            tool_calls=[ToolCall(id="call_1", name="Bash", arguments='{"command":"ls"}')],
        )
    )
    assert [b["type"] for b in ours["content"]] == ["thinking", "tool_use"]
    assert ours["content"][0]["signature"] == ""
    # Where both are right they agree: the tool call and the stop reason.
    assert theirs["content"][-1]["input"] == ours["content"][-1]["input"] == {"command": "ls"}
    assert theirs["stop_reason"] == ours["stop_reason"] == "tool_use"
