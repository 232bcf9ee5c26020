"""Runs and batches on disk (beside the ledger): what `status`, `resume` and `report` read."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from orchestrator.errors import FlowError
from orchestrator.ledger import open_db

RunStatus = Literal["running", "applied", "needs-you", "nothing", "failed", "interrupted"]
ItemStatus = Literal["pending", "running", "applied", "needs-you", "nothing", "failed", "skipped"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    batch_id TEXT,
    spec_path TEXT NOT NULL,
    spec_digest TEXT NOT NULL,
    config_path TEXT,
    title TEXT NOT NULL,
    branch TEXT NOT NULL,
    options_json TEXT NOT NULL,
    status TEXT NOT NULL,
    applied_branch TEXT,
    commit_sha TEXT,
    winner_model TEXT,
    cost_usd REAL NOT NULL DEFAULT 0,
    started REAL NOT NULL,
    finished REAL,
    pid INTEGER,
    error TEXT
);
CREATE TABLE IF NOT EXISTS run_caps (
    run_id TEXT PRIMARY KEY,
    caps_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    config_path TEXT,
    options_json TEXT NOT NULL,
    status TEXT NOT NULL,
    started REAL NOT NULL,
    finished REAL,
    pid INTEGER
);
CREATE INDEX IF NOT EXISTS batches_key ON batches (key);
CREATE TABLE IF NOT EXISTS batch_items (
    batch_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    spec_path TEXT NOT NULL,
    spec_digest TEXT NOT NULL,
    run_id TEXT,
    status TEXT NOT NULL,
    reason TEXT,
    PRIMARY KEY (batch_id, position)
);
"""


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunRecord(BaseModel):
    run_id: str
    batch_id: str | None = None
    spec_path: str
    spec_digest: str
    config_path: str | None = None
    title: str
    branch: str
    options: dict[str, Any] = Field(default_factory=dict)
    status: str
    applied_branch: str | None = None
    commit_sha: str | None = None
    winner_model: str | None = None
    cost_usd: float = 0.0
    started: float
    finished: float | None = None
    pid: int | None = None
    error: str | None = None

    @property
    def live_status(self) -> str:
        """`running` only while its process lives; a dead process means `interrupted`."""
        if self.status == "running" and self.pid != os.getpid() and not pid_alive(self.pid):
            return "interrupted"
        return self.status


class BatchItem(BaseModel):
    batch_id: str
    position: int
    spec_path: str
    spec_digest: str
    run_id: str | None = None
    status: str
    reason: str | None = None


class BatchRecord(BaseModel):
    batch_id: str
    key: str
    config_path: str | None
    options: dict[str, Any]
    status: str
    started: float
    finished: float | None = None
    pid: int | None = None

    @property
    def live_status(self) -> str:
        if self.status == "running" and self.pid != os.getpid() and not pid_alive(self.pid):
            return "interrupted"
        return self.status


class Store:
    """Run and batch records in `.flow/ledger.sqlite` (its own connection; WAL)."""

    def __init__(self, path: Path):
        self._lock = threading.Lock()
        self._db = open_db(path, _SCHEMA)
        self._db.row_factory = sqlite3.Row

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _exec(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # runs
    def keep_caps(self, run_id: str, caps: dict[str, Any]) -> dict[str, Any]:
        """The caps a run started under: written at its first start, returned ever after
        (a resume, however it is started, is held to them)."""
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO run_caps (run_id, caps_json) VALUES (?, ?)",
                (run_id, json.dumps(caps)),
            )
            row = self._db.execute(
                "SELECT caps_json FROM run_caps WHERE run_id=?", (run_id,)
            ).fetchone()
        stored: dict[str, Any] = json.loads(row[0])
        return stored

    def start_run(self, rec: RunRecord) -> None:
        self._exec(
            "INSERT INTO runs (run_id, batch_id, spec_path, spec_digest, config_path, title, "
            "branch, options_json, status, started, pid) VALUES (?,?,?,?,?,?,?,?,?,?,?) "
            "ON CONFLICT(run_id) DO UPDATE SET status='running', pid=excluded.pid, "
            "finished=NULL, error=NULL",
            (
                rec.run_id,
                rec.batch_id,
                rec.spec_path,
                rec.spec_digest,
                rec.config_path,
                rec.title,
                rec.branch,
                json.dumps(rec.options),
                "running",
                rec.started,
                rec.pid,
            ),
        )

    def finish_run(
        self,
        run_id: str,
        *,
        status: str,
        cost: float,
        branch: str | None = None,
        commit: str | None = None,
        winner: str | None = None,
        error: str | None = None,
    ) -> None:
        self._exec(
            "UPDATE runs SET status=?, cost_usd=?, applied_branch=?, commit_sha=?, "
            "winner_model=?, error=?, finished=? WHERE run_id=?",
            (status, cost, branch, commit, winner, error, time.time(), run_id),
        )

    def run(self, run_id: str) -> RunRecord | None:
        rows = self._exec("SELECT * FROM runs WHERE run_id=?", (run_id,))
        return _run(rows[0]) if rows else None

    def resolve(self, text: str, *, batches: bool = True) -> str:
        """A full run (or batch) id from an id, a unique prefix of one, or `last` (the newest
        run); raises FlowError naming the choices when it is unknown or ambiguous."""
        if text == "last":
            rows = self._exec("SELECT run_id FROM runs ORDER BY started DESC LIMIT 1")
            if not rows:
                raise FlowError("no runs yet, so `last` names nothing; see `flow status`")
            return str(rows[0][0])
        args = (len(text), text)
        found = [
            str(r[0])
            for r in self._exec("SELECT run_id FROM runs WHERE substr(run_id,1,?)=?", args)
        ]
        if batches:
            sql = "SELECT batch_id FROM batches WHERE substr(batch_id,1,?)=?"
            found += [str(r[0]) for r in self._exec(sql, args)]
        if text in found:
            return text
        if len(found) == 1:
            return found[0]
        if not found:
            raise FlowError(f"no run or batch {text!r}; see `flow status`")
        shown = ", ".join(sorted(found)[:5]) + (", …" if len(found) > 5 else "")
        raise FlowError(f"{text!r} is the start of several ids ({shown}); give more of it")

    def runs(self, limit: int = 50, batch_id: str | None = None) -> list[RunRecord]:
        if batch_id is None:
            rows = self._exec("SELECT * FROM runs ORDER BY started DESC LIMIT ?", (limit,))
        else:
            rows = self._exec("SELECT * FROM runs WHERE batch_id=? ORDER BY started", (batch_id,))
        return [_run(r) for r in rows]

    # batches
    def open_or_claim_batch(
        self,
        fresh: BatchRecord,
        items: list[BatchItem],
        *,
        resume_id: str | None,
        new: bool,
    ) -> tuple[BatchRecord, bool]:
        """The batch to resume (by id, else the latest of `fresh.key` unless `new`), claimed
        for this process, or `fresh` with its items created; True when resumed.

        One write transaction from the lookup to the claim or insert: two `flow batch`
        processes started together are serialized, so they cannot both open a batch for the
        same specs nor both claim an interrupted one; the second finds the first running."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if resume_id:
                    rows = self._db.execute(
                        "SELECT * FROM batches WHERE batch_id=?", (resume_id,)
                    ).fetchall()
                    if not rows:
                        raise FlowError(
                            f"no batch {resume_id!r} in this repository; see `flow status`"
                        )
                elif new:
                    rows = []
                else:
                    rows = self._db.execute(
                        "SELECT * FROM batches WHERE key=? ORDER BY started DESC LIMIT 1",
                        (fresh.key,),
                    ).fetchall()
                if rows:
                    existing = _batch(rows[0])
                    mine = os.getpid()
                    busy = existing.status == "running" and existing.pid != mine
                    if busy and pid_alive(existing.pid):
                        raise FlowError(
                            f"batch {existing.batch_id} is running in process {existing.pid}"
                        )
                    if existing.status != "done":  # done: reported as is; --new starts over
                        options = dict(fresh.options)
                        budgets = [
                            b
                            for b in (existing.options.get("budget_usd"), options.get("budget_usd"))
                            if b is not None
                        ]
                        if budgets:  # a batch's cap never rises when it is resumed
                            options["budget_usd"] = min(budgets)
                        self._db.execute(
                            "UPDATE batches SET status='running', pid=?, finished=NULL, "
                            "options_json=? WHERE batch_id=?",
                            (mine, json.dumps(options), existing.batch_id),
                        )
                        existing = existing.model_copy(
                            update={"status": "running", "pid": mine, "options": options}
                        )
                    self._db.execute("COMMIT")
                    return existing, True
                self._db.execute(
                    "INSERT INTO batches (batch_id, key, config_path, options_json, status, "
                    "started, pid) VALUES (?,?,?,?,?,?,?)",
                    (
                        fresh.batch_id,
                        fresh.key,
                        fresh.config_path,
                        json.dumps(fresh.options),
                        "running",
                        fresh.started,
                        fresh.pid,
                    ),
                )
                self._db.executemany(
                    "INSERT INTO batch_items (batch_id, position, spec_path, spec_digest, "
                    "status) VALUES (?,?,?,?,?)",
                    [
                        (fresh.batch_id, i.position, i.spec_path, i.spec_digest, "pending")
                        for i in items
                    ],
                )
                self._db.execute("COMMIT")
                return fresh, False
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def finish_batch(self, batch_id: str, status: str) -> None:
        self._exec(
            "UPDATE batches SET status=?, finished=? WHERE batch_id=?",
            (status, time.time(), batch_id),
        )

    def batch(self, batch_id: str) -> BatchRecord | None:
        rows = self._exec("SELECT * FROM batches WHERE batch_id=?", (batch_id,))
        return _batch(rows[0]) if rows else None

    def latest_batch(self, key: str) -> BatchRecord | None:
        rows = self._exec("SELECT * FROM batches WHERE key=? ORDER BY started DESC LIMIT 1", (key,))
        return _batch(rows[0]) if rows else None

    def batches(self, limit: int = 20) -> list[BatchRecord]:
        rows = self._exec("SELECT * FROM batches ORDER BY started DESC LIMIT ?", (limit,))
        return [_batch(r) for r in rows]

    def items(self, batch_id: str) -> list[BatchItem]:
        rows = self._exec(
            "SELECT * FROM batch_items WHERE batch_id=? ORDER BY position", (batch_id,)
        )
        return [BatchItem(**dict(r)) for r in rows]

    def update_item(
        self,
        batch_id: str,
        position: int,
        *,
        status: str,
        run_id: str | None = None,
        reason: str | None = None,
    ) -> None:
        self._exec(
            "UPDATE batch_items SET status=?, run_id=COALESCE(?, run_id), reason=? "
            "WHERE batch_id=? AND position=?",
            (status, run_id, reason, batch_id, position),
        )


def _run(row: sqlite3.Row) -> RunRecord:
    data = dict(row)
    data["options"] = json.loads(data.pop("options_json") or "{}")
    return RunRecord(**data)


def _batch(row: sqlite3.Row) -> BatchRecord:
    data = dict(row)
    data["options"] = json.loads(data.pop("options_json") or "{}")
    return BatchRecord(**data)
