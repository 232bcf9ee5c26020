"""The graph's checkpointer: LangGraph's SQLite saver, its writes made in one hop off the loop.

LangGraph's async saver serializes on the event loop and makes every write several round
trips through aiosqlite's one thread under one asyncio lock, each waiting for a loop all runs
share: in a batch a checkpoint write took 12–148 ms of wall time for ~0.5 ms of SQLite. Here a
write (serialization, insert, commit) is one job on flow's `db` pool through a connection of
its own; reads stay on the async saver's connection (WAL: they see every committed write).

`synchronous=NORMAL` in WAL mode: a commit is in the WAL before `aput` returns, so a killed
process loses nothing it finished; only a power cut may drop the last commits (never corrupt
the file), and a resumed run then repeats those steps, its paid replies replayed from the
ledger.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import ChannelVersions, Checkpoint, CheckpointMetadata
from langgraph.checkpoint.serde.base import SerializerProtocol
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

from orchestrator import pools


class FlowSaver(AsyncSqliteSaver):
    """An AsyncSqliteSaver whose writes go through a synchronous saver on the `db` pool."""

    def __init__(self, conn: aiosqlite.Connection, writer: SqliteSaver, serde: SerializerProtocol):
        super().__init__(conn, serde=serde)
        self.writer = writer

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        return await pools.db(self.writer.put, config, checkpoint, metadata, new_versions)

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        await pools.db(self.writer.put_writes, config, writes, task_id, task_path)


def _writer(path: Path, serde: SerializerProtocol) -> SqliteSaver:
    conn = sqlite3.connect(str(path), check_same_thread=False)  # the saver locks it
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    saver = SqliteSaver(conn, serde=serde)
    saver.setup()
    return saver


@asynccontextmanager
async def open_saver(path: Path, serde: SerializerProtocol) -> AsyncIterator[FlowSaver]:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = await pools.db(_writer, path, serde)
    try:
        async with aiosqlite.connect(str(path)) as conn:
            saver = FlowSaver(conn, writer, serde)
            await saver.setup()
            yield saver
    finally:
        await pools.db(writer.conn.close)
