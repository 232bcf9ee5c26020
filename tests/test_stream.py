"""Long generations stream (issue 8.13): a reply that takes longer than the timeout to
generate is not cut off, charged as a failure and bought again.

Real HTTP through litellm to the local server, which streams chat completions as
server-sent events, keeps its own bill and, with `stream_gap_s`, sends the events apart as
a model generating them would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from orchestrator.config import LoadedConfig, parse_config
from orchestrator.errors import ProviderError
from orchestrator.ledger import Ledger
from orchestrator.llm.door import Door
from orchestrator.llm.messages import Message
from orchestrator.testing import ChatServer, ServerReply

PRICES = (1e-6, 4e-6)
LONG = "def f():\n    return 1\n" * 400  # about 9 kB of generated code


def writes_a_file(request: dict[str, Any]) -> dict[str, Any]:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {
            "name": "write_file",
            "arguments": json.dumps({"path": "big.py", "content": LONG}),
        },
    }
    return {
        "id": "c1",
        "object": "chat.completion",
        "created": 0,
        "model": request["model"],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "writing it", "tool_calls": [call]},
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def config(base_url: str, **provider: Any) -> LoadedConfig:
    return parse_config(
        {
            "providers": {"local": {"api": "openai", "base_url": base_url, **provider}},
            "models": {
                "m": {
                    "provider": "local",
                    "id": "m",
                    "price": {"input": PRICES[0] * 1e6, "output": PRICES[1] * 1e6},
                    "max_output_tokens": 65_536,
                }
            },
            "stages": {"planner": {"model": "m"}, "builders": [{"model": "m"}]},
        }
    )


async def test_a_long_generation_streams_past_the_timeout(tmp_path: Path) -> None:
    """The events arrive 0.05 s apart for ~1 s in all, with a 0.5 s timeout: streamed, the
    reply arrives whole; the ledger books exactly what the server billed."""
    with (
        ChatServer(writes_a_file, own_usage=True, prices=PRICES, stream_gap_s=0.05) as srv,
        Ledger(tmp_path / "l.db") as ledger,
    ):
        door = Door(config(srv.base_url, timeout_s=0.5, retries=0), run_id="r", ledger=ledger)
        result = await door.complete("m", [Message.user("write big.py")], stage="build")
        assert srv.wait_idle()
    assert srv.requests[0]["stream"] is True
    assert len(srv.requests) == 1  # nothing bought twice
    [call] = result.message.tool_calls
    assert json.loads(call.arguments)["content"] == LONG
    assert result.message.content == "writing it"
    assert result.cost_usd == pytest.approx(srv.billed_usd)  # the server's own count


async def test_the_same_generation_unstreamed_times_out_and_is_charged(tmp_path: Path) -> None:
    """`stream: never` is what flow did before: the whole reply after the timeout."""

    def slow(request: dict[str, Any]) -> dict[str, Any]:
        srv.stopping.wait(1.5)  # a model generating for 1.5 s before the first byte
        return writes_a_file(request)

    with (
        ChatServer(slow, own_usage=True, prices=PRICES) as srv,
        Ledger(tmp_path / "l.db") as ledger,
    ):
        cfg = config(srv.base_url, timeout_s=0.5, retries=0, stream="never")
        door = Door(cfg, run_id="r", ledger=ledger)
        with pytest.raises(ProviderError):
            await door.complete("m", [Message.user("write big.py")], stage="build")
        [row] = ledger.rows()
    assert srv.wait_idle()
    assert "stream" not in srv.requests[0]
    assert row.outcome == "error" and "worst case" in (row.error or "")
    assert row.cost_usd >= srv.billed_usd > 0  # paid for, and nothing received


async def test_a_cut_stream_is_a_billed_failure_and_is_retried(tmp_path: Path) -> None:
    attempts: list[int] = []

    def cut_once(request: dict[str, Any]) -> dict[str, Any] | ServerReply:
        attempts.append(1)
        body = writes_a_file(request)
        return ServerReply(200, body, fault="truncate") if len(attempts) == 1 else body

    with (
        ChatServer(cut_once, own_usage=True, prices=PRICES) as srv,
        Ledger(tmp_path / "l.db") as ledger,
    ):
        door = Door(config(srv.base_url, retries=1), run_id="r", ledger=ledger)
        door.backoff_base_s = 0.01
        result = await door.complete("m", [Message.user("write big.py")], stage="build")
        assert srv.wait_idle()
        rows = ledger.rows()
    assert json.loads(result.message.tool_calls[0].arguments)["content"] == LONG
    assert [r.outcome for r in rows] == ["retry", "ok"]
    assert rows[0].cost_usd > 0  # the cut reply was billed: counted at its worst case
    assert sum(r.cost_usd for r in rows) >= srv.billed_usd


async def test_a_stream_without_usage_is_settled_at_its_worst_case(tmp_path: Path) -> None:
    """litellm fills in a count of its own when the stream has no usage; that is not the
    provider's bill, so flow settles at the worst case instead."""

    def no_usage(request: dict[str, Any]) -> dict[str, Any]:
        return {**writes_a_file(request), "usage": None}

    with (
        ChatServer(no_usage, prices=PRICES) as srv,
        Ledger(tmp_path / "l.db") as ledger,
    ):
        door = Door(config(srv.base_url), run_id="r", ledger=ledger)
        messages = [Message.user("write big.py")]
        result = await door.complete("m", messages, stage="build")
        worst = door.worst_case(door.loaded.model("m"), messages, None, "build")
        note = ledger.rows()[0].error or ""
    assert srv.requests[0]["stream"] is True
    assert result.cost_usd == pytest.approx(worst)
    assert result.cost_usd >= srv.billed_usd
    assert "without usage" in note


async def test_short_calls_are_not_streamed(tmp_path: Path) -> None:
    with ChatServer(writes_a_file, own_usage=True) as srv:
        door = Door(config(srv.base_url), run_id="r")
        await door.complete("m", [Message.user("review")], stage="review")
    assert "stream" not in srv.requests[0]
