"""The SQLite ledger: rows, totals, grouping, the response cache, and reopening."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from orchestrator.ledger import Ledger
from orchestrator.llm.messages import Completion, Message, ToolCall, Usage


def fill(ledger: Ledger) -> None:
    ledger.record(
        run_id="r1",
        spec="a.md",
        stage="plan",
        model="flash",
        provider="google",
        usage=Usage(prompt_tokens=100, completion_tokens=20),
        cost_usd=0.01,
        outcome="ok",
        request_key="k1",
    )
    ledger.record(
        run_id="r1",
        stage="build.1",
        model="glm",
        provider="zhipu",
        usage=Usage(prompt_tokens=900, cached_tokens=500, completion_tokens=80),
        cost_usd=0.02,
        outcome="ok",
    )
    ledger.record(
        run_id="r1",
        stage="build.1",
        model="glm",
        provider="zhipu",
        outcome="retry",
        error="HTTP 429",
    )
    ledger.record(
        run_id="r2", stage="plan", model="flash", provider="google", cost_usd=0.5, outcome="ok"
    )


def test_rows_totals_and_grouping(tmp_path: Path) -> None:
    with Ledger(tmp_path / "flow.db") as ledger:
        fill(ledger)
        rows = ledger.rows("r1")
        assert [r.outcome for r in rows] == ["ok", "ok", "retry"]
        assert rows[0].spec == "a.md" and rows[0].request_key == "k1"
        assert (rows[1].prompt_tokens, rows[1].cached_tokens, rows[1].completion_tokens) == (
            900,
            500,
            80,
        )
        assert rows[2].error == "HTTP 429" and rows[2].cost_usd == 0
        assert ledger.total("r1") == pytest.approx(0.03)
        assert ledger.total() == pytest.approx(0.53)
        assert ledger.total("nope") == 0
        assert ledger.by("stage", "r1") == pytest.approx({"plan": 0.01, "build.1": 0.02})
        assert ledger.by("provider") == pytest.approx({"google": 0.51, "zhipu": 0.02})
        assert ledger.by("model", "r2") == pytest.approx({"flash": 0.5})
        with pytest.raises(ValueError):
            ledger.by("error")  # type: ignore[arg-type]


def test_response_cache_round_trip_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "flow.db"
    done = Completion(
        message=Message(
            role="assistant",
            content=None,
            reasoning_content="hmm",
            tool_calls=[ToolCall(id="c1", name="finish", arguments='{"a": 1}')],
            provider_fields={"thinking_blocks": [{"type": "thinking", "x": 1}]},
        ),
        usage=Usage(prompt_tokens=3, cached_tokens=1, completion_tokens=2),
        cost_usd=0.25,
        model="glm",
    )
    with Ledger(path) as ledger:
        fill(ledger)
        assert ledger.cached("key") is None
        ledger.store("key", done)
        assert ledger.cached("key") == done
    with Ledger(path) as again:
        assert again.cached("key") == done
        assert again.total() == pytest.approx(0.53)
        assert len(again.rows()) == 4


def test_concurrent_writers(tmp_path: Path) -> None:
    with Ledger(tmp_path / "flow.db") as ledger:

        def write(i: int) -> None:
            for _ in range(25):
                ledger.record(run_id="r", stage=f"s{i}", model="m", outcome="ok", cost_usd=0.01)

        threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(ledger.rows("r")) == 200
        assert ledger.total("r") == pytest.approx(2.0)


def test_record_with_response_caches_it_in_the_same_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    done = Completion(
        message=Message(role="assistant", content="hi"), usage=Usage(), cost_usd=0.1, model="m"
    )
    with Ledger(tmp_path / "flow.db") as ledger:
        ledger.record(
            run_id="r",
            stage="s",
            model="m",
            outcome="ok",
            cost_usd=0.1,
            request_key="k",
            response=done,
        )
        assert ledger.cached("k") == done
        assert ledger.rows()[0].request_key == "k"

        def broken(key: str, completion: Completion) -> None:
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(ledger, "_store", broken)
        with pytest.raises(sqlite3.OperationalError):  # a failed write leaves no row behind
            ledger.record(
                run_id="r", stage="s", model="m", outcome="ok", request_key="k2", response=done
            )
        assert len(ledger.rows()) == 1 and ledger.total() == pytest.approx(0.1)
