"""Scripted models: YAML and callable scripts, deterministic replies, clear script errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from orchestrator.errors import ConfigError
from orchestrator.llm.messages import Message, ToolCall, ToolSpec, Usage
from orchestrator.llm.scripted import EXHAUSTED, ScriptedModel

SCRIPT = """
replies:
  - content: "planning"
  - tool_calls: [{name: write_file, arguments: {path: a.py, content: "x = 1\\n"}}]
  - tool_calls: [{name: finish, arguments: {summary: done}}]
    usage: {prompt: 1200, completion: 300}
"""

FINISH = ToolSpec(name="finish", description="done", parameters={"type": "object"})


def assistant(text: str) -> Message:
    return Message(role="assistant", content=text)


def write(tmp_path: Path, text: str, name: str = "script.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_reply_index_is_the_number_of_assistant_messages(tmp_path: Path) -> None:
    model = ScriptedModel("s", write(tmp_path, SCRIPT))
    convo = [Message.system("sys"), Message.user("go")]
    first, _ = model.reply(convo)
    assert first.role == "assistant" and first.content == "planning" and not first.tool_calls

    convo.append(first)
    second, _ = model.reply(convo)
    assert second.tool_calls == [
        ToolCall(
            id="call_1_0",
            name="write_file",
            arguments=json.dumps({"path": "a.py", "content": "x = 1\n"}),
        )
    ]
    assert second.tool_calls[0].parsed() == {"path": "a.py", "content": "x = 1\n"}

    convo += [second, Message.tool("call_1_0", "write_file", "ok")]
    third, usage = model.reply(convo)
    assert third.tool_calls[0].name == "finish" and third.tool_calls[0].id == "call_2_0"
    assert usage == Usage(prompt_tokens=1200, completion_tokens=300)


def test_same_conversation_gives_the_same_reply(tmp_path: Path) -> None:
    path = write(tmp_path, SCRIPT)
    convo = [Message.user("go"), assistant("planning")]
    a = ScriptedModel("s", path).reply(convo)
    b = ScriptedModel("s", path).reply(convo)
    assert a == b
    assert a[0].tool_calls[0].id == "call_1_0"


def test_default_usage_is_characters_over_four(tmp_path: Path) -> None:
    model = ScriptedModel("s", write(tmp_path, SCRIPT))
    convo = [Message.user("x" * 41)]
    reply, usage = model.reply(convo)
    assert usage.prompt_tokens == math.ceil(41 / 4)
    assert usage.completion_tokens == math.ceil(len("planning") / 4)
    assert reply.content == "planning"


def test_exhausted_script_uses_fallback_or_default(tmp_path: Path) -> None:
    plain = ScriptedModel("s", write(tmp_path, "replies: [{content: one}]\n", "a.yaml"))
    reply, _ = plain.reply([Message.user("go"), assistant("one")])
    assert reply.content == EXHAUSTED and not reply.tool_calls

    text = (
        "replies: []\nfallback: {tool_calls: "
        "[{name: finish, arguments: {summary: script exhausted}}]}\n"
    )
    with_fallback = ScriptedModel("s", write(tmp_path, text, "b.yaml"))
    for turns in (0, 3):
        convo = [Message.user("go")] + [assistant("x")] * turns
        reply, _ = with_fallback.reply(convo)
        assert reply.tool_calls[0].parsed() == {"summary": "script exhausted"}
        assert reply.tool_calls[0].id == f"call_{turns}_0"


def test_callable_receives_conversation_and_may_return_dict_or_tuple() -> None:
    seen: list[tuple[int, list[str], str | None]] = []

    def script(messages: list[Message], tools: list[ToolSpec], choice: str | None) -> object:
        seen.append((len(messages), [t.name for t in tools], choice))
        if len(messages) == 1:
            return {"tool_calls": [{"name": "finish", "arguments": {"summary": "ok"}}]}
        return Message(role="assistant", content="later"), Usage(
            prompt_tokens=7, completion_tokens=3
        )

    model = ScriptedModel("f", script)
    first, usage = model.reply([Message.user("hi")], [FINISH], "finish")
    expected = ToolCall(id="call_0_0", name="finish", arguments='{"summary": "ok"}')
    assert first.tool_calls == [expected]
    assert usage.prompt_tokens == 1  # "hi" → ceil(2 / 4)
    second, usage = model.reply([Message.user("hi"), first], [FINISH], None)
    assert second.content == "later" and usage == Usage(prompt_tokens=7, completion_tokens=3)
    assert seen == [(1, ["finish"], "finish"), (2, ["finish"], None)]


def test_callable_from_file_path(tmp_path: Path) -> None:
    code = (
        "from orchestrator.llm.messages import Message\n"
        "def reply(messages, tools, tool_choice):\n"
        "    return Message(role='assistant', content=f'{len(messages)} messages')\n"
    )
    path = write(tmp_path, code, "brain.py")
    model = ScriptedModel("f", f"{path}:reply")
    reply, _ = model.reply([Message.user("a"), Message.user("b")])
    assert reply.content == "2 messages"


def test_callable_from_module_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = "def reply(messages, tools, tool_choice):\n    return f'choice={tool_choice}'\n"
    write(tmp_path, code, "flow_test_brain.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = ScriptedModel("f", "flow_test_brain:reply")
    reply, _ = model.reply([], [FINISH], "finish")
    assert reply.role == "assistant" and reply.content == "choice=finish"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, "not found"),
        ("replies: [content: x\n", "not valid YAML"),
        ("replies: [{contnet: x}]\n", "replies.0.contnet"),
    ],
)
def test_bad_yaml_scripts_raise_config_error_naming_the_path(
    tmp_path: Path, text: str | None, expected: str
) -> None:
    path = tmp_path / "bad.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError) as err:
        ScriptedModel("s", path)
    assert str(path) in str(err.value) and expected in str(err.value)


@pytest.mark.parametrize(
    "script", ["/nowhere/brain.py:reply", "no_such_module_xyz:reply", "json:no_such_function"]
)
def test_bad_callable_scripts_raise_config_error(script: str) -> None:
    with pytest.raises(ConfigError) as err:
        ScriptedModel("s", script)
    assert script in str(err.value)
