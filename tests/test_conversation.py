"""flow's own builder loop stays inside its share of the context window and its cache.

Real Builder, real Tools in a real directory, the real door through litellm to the test
server on 127.0.0.1; every assertion is on what the server received or what the ledger kept.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orchestrator.agents.builder import Builder
from orchestrator.agents.tools import TOOL_SPECS, Tools
from orchestrator.config import LoadedConfig, parse_config
from orchestrator.errors import ConfigError
from orchestrator.ledger import Ledger
from orchestrator.llm import wire
from orchestrator.llm.door import Door, cost_of
from orchestrator.llm.messages import Message, ToolSpec, Usage
from orchestrator.llm.scripted import ScriptedModel
from orchestrator.nodes.build import context_window
from orchestrator.redact import Redactor
from orchestrator.report import render_markdown
from orchestrator.report_html import render_run_html
from orchestrator.testing import ChatServer, scripted_handler
from orchestrator.testing.anthropic import messages_handler

KEY = "sk-conversation-test-0123456789"
WINDOW, SHARE = 20_000, 0.5
LIMIT = int(WINDOW * SHARE)
Step = Callable[[int], dict[str, Any]]


def call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"tool_calls": [{"name": name, "arguments": arguments}]}


def scripted(steps: list[dict[str, Any]], usage: Usage | None = None) -> ScriptedModel:
    def brain(messages: list[Message], tools: list[ToolSpec], choice: str | None) -> object:
        turn = sum(1 for m in messages if m.role == "assistant")
        reply = steps[turn] if turn < len(steps) else call("finish", summary="done")
        return reply, usage or Usage(prompt_tokens=100, completion_tokens=10)

    return ScriptedModel("b", brain)


def config(base_url: str, api: str = "openai", window: int | None = WINDOW) -> LoadedConfig:
    model: dict[str, Any] = {
        "provider": "local",
        "id": "m",
        "max_output_tokens": 1000,
        "price": {"input": 3.0, "output": 15.0, "cached_input": 0.3},
    }
    if window:
        model["context_window"] = window
    return parse_config(
        {
            "providers": {
                "local": {"api": api, "base_url": base_url, "api_key": "CONV_KEY", "retries": 0}
            },
            "models": {"b": model},
            "stages": {"planner": {"model": "b"}, "builders": [{"model": "b"}]},
            "builder": {"context_share": SHARE},
        }
    )


@pytest.fixture(autouse=True)
def key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONV_KEY", KEY)


def repo(tmp_path: Path, files: int = 30) -> Path:
    root = tmp_path / "repo"
    for i in range(files):
        body = "".join(f"def f{i}_{n}(x):\n    return x * {n} + {i}\n\n" for n in range(60))
        (root / "src").mkdir(parents=True, exist_ok=True)
        (root / "src" / f"m{i}.py").write_text(f"VALUE = {i}\n\n" + body)
    (root / "big.txt").write_text("".join(f"line {n} of a long log\n" for n in range(8000)))
    return root


async def build(
    loaded: LoadedConfig, root: Path, tmp_path: Path, ledger: Ledger | None = None
) -> Builder:
    builder = Builder(
        Door(loaded, run_id="conv", ledger=ledger),
        "b",
        Tools(root, command_timeout_s=30, output_cap=16_000),
        max_turns=60,
        transcript=tmp_path / "transcript.jsonl",
        redact=Redactor([]),
        window=context_window(loaded, "b", "build"),
    )
    outcome = await builder.run("Read everything, then finish.")
    assert outcome.error is None, outcome.error
    return builder


def received(request: dict[str, Any]) -> tuple[list[Message], list[ToolSpec]]:
    messages = [wire.message_from_wire(m) for m in request["messages"]]
    return messages, wire.tools_from_wire(request.get("tools"))


def tool_texts(request: dict[str, Any]) -> list[str]:
    return [str(m.get("content")) for m in request["messages"] if m.get("role") == "tool"]


def tokens(request: dict[str, Any]) -> int:
    """The request's tokens as the door counts a prompt (litellm's tokenizer, margin in)."""
    messages, tools = received(request)
    return wire.prompt_bound("openai/m", True, messages, tools)


LONG = [call("read_file", path=f"src/m{i}.py") for i in range(30)] + [
    call("read_file", path="big.txt"),
    call("read_file", path="src/m0.py"),  # elided long ago: it must come back whole
]


async def test_a_long_conversation_never_passes_its_share_of_the_window(tmp_path: Path) -> None:
    root = repo(tmp_path)
    with ChatServer(scripted_handler({"m": scripted(LONG)})) as srv:
        builder = await build(config(srv.base_url), root, tmp_path)
    sent = [tokens(r) for r in srv.requests]
    assert len(sent) == len(LONG) + 1
    assert max(sent) <= LIMIT, sent
    # Unbounded, the same conversation would have passed the limit several times over.
    whole = [Message.model_validate_json(line) for line in builder.transcript.open()]
    assert wire.prompt_bound("openai/m", True, whole, TOOL_SPECS) > 3 * LIMIT
    # Elided in blocks, rarely: most requests extend the one before unchanged.
    extends = sum(
        1
        for a, b in zip(srv.requests, srv.requests[1:], strict=False)
        if b["messages"][: len(a["messages"])] == a["messages"]
    )
    assert builder.window is not None and 1 <= builder.window.compactions <= 6
    assert extends >= len(srv.requests) - 1 - builder.window.compactions
    last = srv.requests[-1]
    stubs = [t for t in tool_texts(last) if t.startswith("[elided at turn")]
    assert len(stubs) >= 10 and 'read_file({"path": "src/m0.py"})' in stubs[0]
    # The big file is cut to fit, with how to read on; the elided file comes back whole.
    big = tool_texts(last)[-2]
    assert "bytes cut to fit the context window; read_file(path, offset=" in big
    assert tool_texts(last)[-1] == (root / "src" / "m0.py").read_text()


async def test_an_unchanged_reread_gets_a_stub_and_a_changed_file_comes_again(
    tmp_path: Path,
) -> None:
    root = repo(tmp_path, files=2)
    steps = [
        call("read_file", path="src/m0.py"),
        call("read_file", path="./src/m0.py"),
        call("edit_file", path="src/m0.py", old="VALUE = 0", new="VALUE = 42"),
        call("read_file", path="src/m0.py"),
    ]
    with ChatServer(scripted_handler({"m": scripted(steps)})) as srv:
        await build(config(srv.base_url, window=1_000_000), root, tmp_path)
    results = tool_texts(srv.requests[-1])
    first, again, _, changed = results
    assert first.startswith("VALUE = 0\n")
    assert again.startswith("[unchanged since turn 1: src/m0.py")
    assert changed.startswith("VALUE = 42\n") and len(changed) > 1000


async def test_cache_breakpoints_reach_an_anthropic_server_and_the_ledger_keeps_cached_tokens(
    tmp_path: Path,
) -> None:
    root = repo(tmp_path, files=3)
    steps = [call("read_file", path=f"src/m{i}.py") for i in range(3)]
    usage = Usage(
        prompt_tokens=1000, cached_tokens=700, cache_write_tokens=200, completion_tokens=10
    )
    handler = messages_handler({"m": scripted(steps, usage)})
    with Ledger(tmp_path / "ledger.db") as ledger:
        with ChatServer(handler, protocol="anthropic") as srv:
            await build(config(srv.base_url, api="anthropic"), root, tmp_path, ledger)
        rows = [r for r in ledger.rows() if r.outcome == "ok"]
        shares = ledger.cache_shares()
    assert len(rows) == 4
    assert all((r.cached_tokens, r.cache_write_tokens) == (700, 200) for r in rows)
    # 100 plain, 700 read, 200 written at 1.25 times the input price, 10 out.
    expected = (100 * 3.0 + 700 * 0.3 + 200 * 3.75 + 10 * 15.0) / 1e6
    assert all(r.cost_usd == pytest.approx(expected) for r in rows)
    assert shares == {"b": (4000, 2800, 800)}
    text = render_markdown(
        {"run_id": "conv"},
        title="t",
        spec_path="s.md",
        branch="b",
        base="0" * 40,
        cost=0.0,
        outcome="nothing",
        spend={"model": {"b": 0.1}},
        cache=shares,
    )
    assert "- prompt cache by model: b 70% read of 4,000 prompt tokens (800 written)" in text
    page = render_run_html(
        {"run_id": "conv"},
        title="t",
        spec_path="s.md",
        branch="b",
        base="0" * 40,
        cost=0.0,
        outcome="nothing",
        spend={"model": {"b": 0.1}},
        diffs={},
        cache=shares,
    )
    section = page[page.index('<section id="cache">') :]
    assert 'style="width:70.0%"' in section
    assert "70% read of 4,000 prompt tokens, 800 written" in section

    def marked(block: Any) -> bool:
        return isinstance(block, dict) and block.get("cache_control") == {"type": "ephemeral"}

    last = srv.requests[-1]
    assert marked(last["system"][-1])
    blocks = [(i, b) for i, m in enumerate(last["messages"]) for b in _blocks(m)]
    marks = [i for i, b in blocks if marked(b)]
    # The previous request's last message (read from the cache) and this one's (written).
    n = len(last["messages"])
    assert marks == [n - 3, n - 1]
    assert sum(json.dumps(r).count("cache_control") for r in srv.requests[-1:]) == 3
    # The first request has one message after the system prompt: it is marked once.
    assert json.dumps(srv.requests[0]).count("cache_control") == 2


def _blocks(message: dict[str, Any]) -> list[Any]:
    content = message.get("content")
    if not isinstance(content, list):
        return []
    out: list[Any] = []
    for block in content:
        out.append(block)
        inner = block.get("content") if isinstance(block, dict) else None
        if isinstance(inner, list):
            out += inner
    return out


async def test_no_cache_control_goes_to_an_openai_protocol_server(tmp_path: Path) -> None:
    root = repo(tmp_path, files=2)
    steps = [call("read_file", path="src/m0.py")]
    with ChatServer(scripted_handler({"m": scripted(steps)})) as srv:
        await build(config(srv.base_url), root, tmp_path)
    assert srv.requests and not any("cache_control" in json.dumps(r) for r in srv.requests)


async def test_a_replayed_compacted_conversation_asks_nothing_again(tmp_path: Path) -> None:
    """Compaction rewrites tool output only, which request keys leave out: a second run of
    the same conversation under the same run id is served wholly from the ledger."""
    root = repo(tmp_path)
    with Ledger(tmp_path / "ledger.db") as ledger:
        with ChatServer(scripted_handler({"m": scripted(LONG)})) as srv:
            first = await build(config(srv.base_url), root, tmp_path, ledger)
            asked = len(srv.requests)
            (root / "src" / "m3.py").write_text("changed since the first run\n")
            again = await build(config(srv.base_url), root, tmp_path, ledger)
        outcomes = [r.outcome for r in ledger.rows()]
    assert first.window is not None and first.window.compactions >= 1
    assert len(srv.requests) == asked
    assert outcomes.count("replayed") == asked and again.outcome.turns == first.outcome.turns


def test_an_anthropic_call_reserves_for_a_prompt_written_whole_to_the_cache() -> None:
    """A cache write costs 1.25 times input: the reservation must hold a reply whose whole
    prompt was written, or a hard cap could be passed by a quarter of the prompt's price."""
    loaded = config("http://127.0.0.1:9/v1", api="anthropic")
    door = Door(loaded, run_id="conv")
    rm = loaded.models["b"]
    messages = [Message.system("You build."), Message.user("x" * 5000)]
    worst = door.worst_case(rm, messages, TOOL_SPECS, "build")
    bound = wire.prompt_bound(rm.litellm_model, False, messages, TOOL_SPECS)
    written = Usage(prompt_tokens=bound, cache_write_tokens=bound, completion_tokens=1000)
    assert cost_of(rm, written) <= worst
    plain = Door(config("http://127.0.0.1:9/v1"), run_id="conv")
    assert worst > plain.worst_case(plain.loaded.models["b"], messages, TOOL_SPECS, "build")


@pytest.mark.parametrize("share", [0, 1.5, "most"])
def test_a_context_share_outside_0_to_1_is_refused(share: object) -> None:
    raw = {
        "models": {"b": {"id": "scripted/b", "script": "s.yaml"}},
        "stages": {"planner": {"model": "b"}, "builders": [{"model": "b"}]},
        "builder": {"context_share": share},
    }
    with pytest.raises(ConfigError, match="context_share"):
        parse_config(raw)


def test_a_ledger_written_before_cache_writes_were_kept_opens_and_counts_them(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.db"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE calls (id INTEGER PRIMARY KEY, ts REAL NOT NULL, run_id TEXT NOT NULL, "
        "spec TEXT NOT NULL DEFAULT '', stage TEXT NOT NULL, model TEXT NOT NULL, "
        "provider TEXT NOT NULL DEFAULT '', prompt_tokens INTEGER NOT NULL DEFAULT 0, "
        "cached_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0, "
        "cost_usd REAL NOT NULL DEFAULT 0, outcome TEXT NOT NULL, error TEXT, request_key TEXT);"
        "INSERT INTO calls (ts, run_id, stage, model, prompt_tokens, cached_tokens, cost_usd, "
        "outcome) VALUES (1.0, 'old', 'build', 'm', 100, 40, 0.5, 'ok');"
    )
    old.commit()
    old.close()
    with Ledger(path) as ledger:
        ledger.record(
            run_id="new",
            stage="build",
            model="m",
            outcome="ok",
            usage=Usage(prompt_tokens=100, cached_tokens=10, cache_write_tokens=50),
            cost_usd=0.25,
        )
        assert [(r.run_id, r.cache_write_tokens) for r in ledger.rows()] == [
            ("old", 0),
            ("new", 50),
        ]
        assert ledger.cache_shares() == {"m": (200, 50, 50)}
        assert ledger.total() == pytest.approx(0.75)


async def test_openais_own_models_get_one_prompt_cache_key_per_conversation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenAI routes requests sharing a `prompt_cache_key` to one prefix cache: each agent's
    conversation keeps one key, siblings differ, a resumed run keeps it; OpenAI-compatible
    servers (which may refuse an unknown field) get none."""
    root = repo(tmp_path, files=3)
    steps = [call("read_file", path=f"src/m{i}.py") for i in range(3)]
    loaded = parse_config(
        {
            "models": {"g": {"id": "gpt-4o-mini"}},
            "stages": {"planner": {"model": "g"}, "builders": [{"model": "g"}]},
        }
    )
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    # litellm's own OpenAI route, sent to the local server by its base-URL variable; the
    # requests counted below prove they went there.
    monkeypatch.setenv("FLOW_ALLOW_MODEL_REQUESTS", "1")

    async def agent(door: Door, scope: str, model: str = "g") -> None:
        tools = Tools(root, command_timeout_s=30, output_cap=16_000)
        builder = Builder(
            door,
            model,
            tools,
            max_turns=10,
            transcript=tmp_path / f"{scope}.jsonl",
            redact=Redactor([]),
            scope=scope,
        )
        outcome = await builder.run("Read three files, then finish.")
        assert outcome.error is None, outcome.error

    keys: dict[str, set[str]] = {}
    with ChatServer(scripted_handler({"gpt-4o-mini": scripted(steps)})) as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
        for run, scope in (("r1", "build-0"), ("r1", "build-1"), ("r1", "build-0")):
            before = len(srv.requests)
            await agent(Door(loaded, run_id=run), scope)
            sent = {str(r.get("prompt_cache_key")) for r in srv.requests[before:]}
            assert len(srv.requests) - before == 4 and len(sent) == 1
            keys.setdefault(scope, set()).update(sent)
    assert len(keys["build-0"]) == 1, "a resumed conversation keeps its key"
    assert keys["build-0"] != keys["build-1"]
    assert all(k.startswith("flow-") and "r1" not in k for k in keys["build-0"] | keys["build-1"])

    with ChatServer(scripted_handler({"m": scripted(steps)})) as srv:
        await agent(Door(config(srv.base_url), run_id="r1"), "build-0", "b")
    assert srv.requests and not any("prompt_cache_key" in r for r in srv.requests)
