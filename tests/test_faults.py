"""Every provider fault has a defined outcome: retried where a retry can help, a clean failure
where not, and never a traceback. Driven through litellm against the local server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import flow_in

from orchestrator.agents.builder import Builder
from orchestrator.agents.tools import Tools
from orchestrator.config import LoadedConfig, parse_config
from orchestrator.demo import prepare_demo
from orchestrator.errors import AuthenticationFailed, ProviderError
from orchestrator.ledger import Ledger
from orchestrator.llm.door import Door
from orchestrator.llm.messages import Message
from orchestrator.redact import Redactor
from orchestrator.testing.demo_http import demo_scripts, http_config
from orchestrator.testing.server import ChatServer, ServerReply, chat_response, scripted_handler

OK_MESSAGE = {"role": "assistant", "content": "fine"}
USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


class Faults:
    """Replies the server gives in order; after them, a normal answer."""

    def __init__(self, *replies: ServerReply | dict[str, Any]):
        self.replies = list(replies)

    def __call__(self, request: dict[str, Any]) -> dict[str, Any] | ServerReply:
        if self.replies:
            return self.replies.pop(0)
        return chat_response(request["model"], OK_MESSAGE, USAGE)


@pytest.fixture
def env_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("FAULT_TEST_KEY", "sk-fault-test-key-0001")
    return "FAULT_TEST_KEY"


def config(
    base_url: str, *, retries: int = 2, timeout: float = 2.0, fallbacks: list[str] | None = None
) -> LoadedConfig:
    return parse_config(
        {
            "providers": {
                "p": {
                    "api": "openai",
                    "base_url": base_url,
                    "api_key": "FAULT_TEST_KEY",
                    "retries": retries,
                    "timeout_s": timeout,
                }
            },
            "models": {
                "m": {
                    "provider": "p",
                    "id": "m",
                    "family": "a",
                    "price": {"input": 1, "output": 1},
                },
                "big": {
                    "provider": "p",
                    "id": "big",
                    "family": "a",
                    "price": {"input": 1, "output": 1},
                },
            },
            "stages": {
                "planner": {"model": "m", "fallbacks": fallbacks or []},
                "builders": [{"model": "m"}],
            },
        }
    )


def door(loaded: LoadedConfig, tmp_path: Path) -> tuple[Door, Ledger]:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    d = Door(loaded, run_id="r", ledger=ledger)
    d.backoff_base_s = 0.05
    return d, ledger


def ask(d: Door, fallbacks: list[str] | None = None) -> Any:
    return asyncio.run(d.complete("m", [Message.user("hi")], stage="plan", fallbacks=fallbacks))


CONTEXT = ServerReply(
    400,
    {
        "error": {
            "message": "This model's maximum context length is 8192 tokens. However, your messages "
            "resulted in 9000 tokens.",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    },
)


@pytest.mark.parametrize(
    ("name", "first"),
    [
        (
            "429 with Retry-After",
            ServerReply(429, {"error": {"message": "slow down"}}, {"Retry-After": "1"}),
        ),
        ("429 without Retry-After", ServerReply(429, {"error": {"message": "slow down"}})),
        ("500", ServerReply(500, {"error": {"message": "boom"}})),
        ("502", ServerReply(502, "<html>bad gateway</html>")),
        ("503", ServerReply(503, {"error": {"message": "overloaded"}})),
        ("hung connection", ServerReply(200, fault="hang")),
        ("connection reset", ServerReply(200, fault="reset")),
        (
            "truncated body",
            ServerReply(200, chat_response("m", OK_MESSAGE, USAGE), fault="truncate"),
        ),
        ("malformed JSON body", ServerReply(200, b'{"id": "x", "choices": [')),
    ],
)
def test_transient_faults_are_retried(
    tmp_path: Path, env_key: str, name: str, first: ServerReply
) -> None:
    # The server bills as a provider would, by its own count (and reports that count as the
    # usage): flow's ledger must book at least what it billed, fault by fault.
    with ChatServer(Faults(first), prices=(1e-6, 1e-6), own_usage=True) as srv:
        d, ledger = door(config(srv.base_url, timeout=1.0), tmp_path)
        started = time.monotonic()
        reply = ask(d)
        waited = time.monotonic() - started
        count = len(srv.requests)
        assert srv.wait_idle()
    assert reply.message.content == "fine", name
    assert count == 2  # the fault, then the retry
    rows = ledger.rows()
    assert [r.outcome for r in rows] == ["retry", "ok"]
    assert rows[1].cost_usd == pytest.approx(srv.bills[-1])  # the reply, at the server's count
    assert sum(r.cost_usd for r in rows) >= srv.billed_usd - 1e-12
    if name in ("hung connection", "connection reset", "truncated body", "malformed JSON body"):
        # No reply, but the provider may have done and billed the work: counted at the
        # attempt's worst case, so no cap can be overrun by it.
        assert rows[0].cost_usd > 0 and "worst case" in (rows[0].error or "")
    else:
        assert rows[0].cost_usd == 0
    if name == "429 with Retry-After":
        assert waited >= 0.95


def test_retries_run_out_into_a_clean_failure(tmp_path: Path, env_key: str) -> None:
    down = ServerReply(503, {"error": {"message": "overloaded"}})
    with ChatServer(Faults(down, down, down)) as srv:
        d, ledger = door(config(srv.base_url, retries=2), tmp_path)
        with pytest.raises(ProviderError, match="HTTP 503") as err:
            ask(d)
        assert len(srv.requests) == 3
    assert err.value.retryable
    assert [r.outcome for r in ledger.rows()] == ["retry", "retry", "error"]
    assert ledger.total() == 0


def test_context_window_exceeded_is_not_retried_but_falls_back(
    tmp_path: Path, env_key: str
) -> None:
    with ChatServer(Faults(CONTEXT)) as srv:
        d, _ = door(config(srv.base_url), tmp_path)
        with pytest.raises(ProviderError, match="context length") as err:
            ask(d)
        assert len(srv.requests) == 1 and not err.value.retryable
    with ChatServer(Faults(CONTEXT)) as srv:
        d, ledger = door(config(srv.base_url, fallbacks=["big"]), tmp_path / "b")
        reply = ask(d, fallbacks=["big"])
        assert [r["model"] for r in srv.requests] == ["m", "big"]
    assert reply.model == "big"
    assert "fallback" in [r.outcome for r in ledger.rows()]


def test_resume_replays_the_fallbacks_answer_without_asking_the_first_model(
    tmp_path: Path, env_key: str
) -> None:
    """A turn a fallback answered is replayed on resume; the first model, healthy again,
    is not asked (it would be paid and would send the conversation another way)."""
    with ChatServer(Faults(CONTEXT), prices=(1e-6, 1e-6)) as srv:
        d, _ = door(config(srv.base_url, fallbacks=["big"]), tmp_path)
        first = ask(d, fallbacks=["big"])
    assert first.model == "big"
    with ChatServer(Faults(), prices=(1e-6, 1e-6)) as srv:
        d, ledger = door(config(srv.base_url, fallbacks=["big"]), tmp_path)
        again = ask(d, fallbacks=["big"])
        assert srv.requests == [] and srv.billed_usd == 0
    assert again.model == "big" and again.message == first.message and again.cost_usd == 0
    assert [r.outcome for r in ledger.rows()][-1] == "replayed"


def test_authentication_error_fails_fast_and_names_the_variable(
    tmp_path: Path, env_key: str
) -> None:
    refused = ServerReply(401, {"error": {"message": "Incorrect API key provided: sk-fa***01"}})
    with ChatServer(Faults(refused)) as srv:
        d, _ = door(config(srv.base_url), tmp_path)
        with pytest.raises(AuthenticationFailed) as err:
            ask(d, fallbacks=["big"])  # no fallback for a refused key either
        assert len(srv.requests) == 1
    assert "FAULT_TEST_KEY" in str(err.value)
    assert "sk-fault-test-key-0001" not in str(err.value)


def tool_reply(calls: list[tuple[str, str]] | None, content: str | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [
            {"id": f"c{i}", "type": "function", "function": {"name": n, "arguments": a}}
            for i, (n, a) in enumerate(calls)
        ]
    return chat_response("m", message, USAGE)


def test_builder_survives_bad_tool_calls_and_empty_replies(tmp_path: Path, env_key: str) -> None:
    script = Faults(
        tool_reply([("write_file", '{"path": "a.txt", "content": ')]),  # invalid JSON arguments
        tool_reply([("delete_everything", "{}")]),  # unknown tool
        tool_reply(None, content=None),  # empty reply
        tool_reply([("write_file", json.dumps({"path": "a.txt", "content": "ok\n"}))]),
        tool_reply([("finish", json.dumps({"summary": "done"}))]),
    )
    (tmp_path / "wt").mkdir()
    with ChatServer(script) as srv:
        d, _ = door(config(srv.base_url), tmp_path)
        builder = Builder(
            d,
            "m",
            Tools(tmp_path / "wt", command_timeout_s=5, output_cap=2000),
            max_turns=10,
            transcript=tmp_path / "t.jsonl",
            redact=Redactor(),
        )
        outcome = asyncio.run(builder.run("write a.txt"))
        sent = list(srv.requests)
    assert outcome.error is None and outcome.summary == "done" and outcome.turns == 5
    assert (tmp_path / "wt" / "a.txt").read_text() == "ok\n"
    tool_texts = [m.get("content") or "" for m in sent[1]["messages"] if m["role"] == "tool"]
    assert any("not a valid JSON object" in t for t in tool_texts)
    later = [m.get("content") or "" for m in sent[2]["messages"] if m["role"] == "tool"]
    assert any("unknown tool 'delete_everything'" in t for t in later)
    nudges = [m["content"] for m in sent[3]["messages"] if m["role"] == "user"]
    assert any("call finish when the work is done" in t for t in nudges)


# ---- through `flow run` --------------------------------------------------------------------


def run_demo_over_http(
    tmp_path: Path, broken: dict[str, ServerReply], retries: int = 1
) -> tuple[subprocess.CompletedProcess[str], Path]:
    demo = prepare_demo(tmp_path)
    inner = scripted_handler(demo_scripts(demo))

    def handler(request: dict[str, Any]) -> dict[str, Any] | ServerReply:
        return broken.get(request["model"]) or inner(request)

    with ChatServer(handler) as srv:
        path = tmp_path / "http.yaml"
        path.write_text(
            yaml.safe_dump(
                http_config(demo, srv.base_url, api_key="FAULT_TEST_KEY", retries=retries)
            )
        )
        out = flow_in(
            demo.repo,
            "run",
            str(demo.spec),
            "--config",
            str(path),
            "--json",
            env={"FAULT_TEST_KEY": "sk-fault-test-key-0001"},
        )
    return out, demo.repo


def test_a_builder_whose_provider_is_down_fails_cleanly(tmp_path: Path) -> None:
    out, repo = run_demo_over_http(
        tmp_path, {"minimax-sim": ServerReply(500, {"error": {"message": "internal error"}})}
    )
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    summary = json.loads(next((repo / ".flow" / "runs").glob("*/run.json")).read_text())
    broken = next(c for c in summary["candidates"] if c["model"] == "minimax-sim")
    assert broken["status"] == "failed" and "HTTP 500" in broken["error"]
    assert summary["applied"]["branch"] == "flow/add-median"


def test_a_refused_key_stops_the_run_with_a_clear_error(tmp_path: Path) -> None:
    out, repo = run_demo_over_http(
        tmp_path, {"glm-sim": ServerReply(401, {"error": {"message": "invalid api key"}})}
    )
    assert out.returncode == 3  # resumable once the key is fixed (tests/test_key_refused.py)
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) <= 2
    assert "FAULT_TEST_KEY" in out.stderr and "sk-fault-test-key-0001" not in out.stderr
    assert (
        "flow/add-median"
        not in subprocess.run(["git", "branch"], cwd=repo, capture_output=True, text=True).stdout
    )
