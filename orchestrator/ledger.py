"""The spend ledger: one SQLite row per model call attempt, and a cache of received replies.

The response cache makes a resumed run free for replies it already paid for: the door looks a
request up by its key before calling and stores each reply before returning it.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import BaseModel

from orchestrator.llm.messages import Completion, Usage

GroupField = Literal["stage", "model", "provider"]
_GROUP_FIELDS = ("stage", "model", "provider")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    run_id TEXT NOT NULL,
    spec TEXT NOT NULL DEFAULT '',
    stage TEXT NOT NULL,
    model TEXT NOT NULL,
    provider TEXT NOT NULL DEFAULT '',
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens INTEGER NOT NULL DEFAULT 0,
    cache_write_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0,
    outcome TEXT NOT NULL,
    error TEXT,
    request_key TEXT
);
CREATE INDEX IF NOT EXISTS calls_run ON calls (run_id);
CREATE TABLE IF NOT EXISTS responses (
    request_key TEXT PRIMARY KEY,
    completion_json TEXT NOT NULL
);
"""

_COLUMNS = (
    "id, ts, run_id, spec, stage, model, provider, prompt_tokens, cached_tokens, "
    "cache_write_tokens, completion_tokens, cost_usd, outcome, error, request_key"
)


class CacheShare(NamedTuple):
    """One model's prompt tokens, and how many of them its provider's prompt cache read or wrote."""

    prompt: int
    read: int
    written: int


class CallRow(BaseModel):
    id: int
    ts: float
    run_id: str
    spec: str
    stage: str
    model: str
    provider: str
    prompt_tokens: int
    cached_tokens: int
    cache_write_tokens: int
    completion_tokens: int
    cost_usd: float
    outcome: str
    """ok | retry | error | cancelled | replayed"""
    error: str | None
    request_key: str | None


def open_db(path: Path, schema: str) -> sqlite3.Connection:
    """A WAL-mode connection shared across threads (callers hold their own lock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA busy_timeout = 5000")
    db.execute("PRAGMA journal_mode = WAL")
    db.executescript(schema)
    return db


class Ledger:
    """SQLite spend ledger, safe to share across threads and asyncio tasks of one process."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = open_db(self.path, _SCHEMA)
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """A ledger written by an older flow gains the columns added since, with zeros."""
        have = {row[1] for row in self._db.execute("PRAGMA table_info(calls)")}
        if "cache_write_tokens" not in have:
            self._db.execute(
                "ALTER TABLE calls ADD COLUMN cache_write_tokens INTEGER NOT NULL DEFAULT 0"
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def record(
        self,
        *,
        run_id: str,
        stage: str,
        model: str,
        outcome: str,
        spec: str = "",
        provider: str | None = None,
        usage: Usage | None = None,
        cost_usd: float = 0.0,
        error: str | None = None,
        request_key: str | None = None,
        ts: float | None = None,
        response: Completion | None = None,
    ) -> int:
        """Append one call attempt; returns its row id.

        With `response` (and `request_key`), the reply is cached in the same transaction, so a
        crash can neither lose the spend of a cached reply nor cache a reply without its row.
        """
        u = usage or Usage()
        values = (
            time.time() if ts is None else ts,
            run_id,
            spec,
            stage,
            model,
            provider or "",
            u.prompt_tokens,
            u.cached_tokens,
            u.cache_write_tokens,
            u.completion_tokens,
            cost_usd,
            outcome,
            error,
            request_key,
        )
        with self._lock, self._transaction():
            cur = self._db.execute(
                "INSERT INTO calls (ts, run_id, spec, stage, model, provider, prompt_tokens, "
                "cached_tokens, cache_write_tokens, completion_tokens, cost_usd, outcome, "
                "error, request_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                values,
            )
            if response is not None and request_key is not None:
                self._store(request_key, response)
            return int(cur.lastrowid or 0)

    def total(self, run_id: str | None = None) -> float:
        """USD spent, in total or by one run."""
        where, args = _run_filter(run_id)
        with self._lock:
            row = self._db.execute(
                f"SELECT COALESCE(SUM(cost_usd), 0) FROM calls{where}", args
            ).fetchone()
        return float(row[0])

    def rows(self, run_id: str | None = None) -> list[CallRow]:
        where, args = _run_filter(run_id)
        with self._lock:
            found = self._db.execute(
                f"SELECT {_COLUMNS} FROM calls{where} ORDER BY id", args
            ).fetchall()
        names = [c.strip() for c in _COLUMNS.split(",")]
        return [CallRow.model_validate(dict(zip(names, r, strict=True))) for r in found]

    def by(self, field: GroupField, run_id: str | None = None) -> dict[str, float]:
        """USD spent grouped by stage, model or provider."""
        if field not in _GROUP_FIELDS:
            raise ValueError(f"cannot group spend by {field!r}; use one of {_GROUP_FIELDS}")
        where, args = _run_filter(run_id)
        with self._lock:
            found = self._db.execute(
                f"SELECT {field}, SUM(cost_usd) FROM calls{where} "
                f"GROUP BY {field} ORDER BY {field}",
                args,
            ).fetchall()
        return {str(k): float(v) for k, v in found}

    def cache_shares(self, run_id: str | None = None) -> dict[str, CacheShare]:
        """Per model: its prompt tokens, and of them those read from / written to its cache."""
        where, args = _run_filter(run_id)
        with self._lock:
            found = self._db.execute(
                "SELECT model, SUM(prompt_tokens), SUM(cached_tokens), SUM(cache_write_tokens) "
                f"FROM calls{where} GROUP BY model ORDER BY model",
                args,
            ).fetchall()
        return {
            str(m): CacheShare(int(p or 0), int(c or 0), int(w or 0)) for m, p, c, w in found if p
        }

    def cached(self, request_key: str) -> Completion | None:
        """The reply already received for this request, if any."""
        with self._lock:
            row = self._db.execute(
                "SELECT completion_json FROM responses WHERE request_key = ?", (request_key,)
            ).fetchone()
        return None if row is None else Completion.model_validate_json(row[0])

    def store(self, request_key: str, completion: Completion) -> None:
        with self._lock:
            self._store(request_key, completion)

    def _store(self, request_key: str, completion: Completion) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO responses (request_key, completion_json) VALUES (?, ?)",
            (request_key, completion.model_dump_json()),
        )

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")


def _run_filter(run_id: str | None) -> tuple[str, tuple[str, ...]]:
    return ("", ()) if run_id is None else (" WHERE run_id = ?", (run_id,))
