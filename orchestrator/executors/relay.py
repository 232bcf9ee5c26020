"""The Ray actor between a run's nodes and the driver: model calls and events in, the
driver's answers out. It holds no key and makes no call itself."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any


class Relay:
    """A mailbox: nodes put calls and events, the driver takes them in order and answers."""

    def __init__(self) -> None:
        self._inbox: asyncio.Queue[tuple[str, int, Any, Any]] = asyncio.Queue()
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count()

    async def call(self, attempt: str, call: Any) -> Any:
        """A node's model call: returns the driver's Completion, or the exception it raised."""
        number = next(self._ids)
        answer = asyncio.get_running_loop().create_future()
        self._waiting[number] = answer
        self._inbox.put_nowait(("call", number, attempt, call))
        return await answer

    def emit(self, event: Any) -> None:
        self._inbox.put_nowait(("event", -1, None, event))

    def ping(self) -> None:
        """Awaited by a node before it returns: the relay then holds all it sent."""

    def barrier(self, token: int) -> None:
        self._inbox.put_nowait(("barrier", token, None, None))

    async def take(self) -> list[tuple[str, int, Any, Any]]:
        """What arrived, oldest first; waits for at least one item."""
        items = [await self._inbox.get()]
        while not self._inbox.empty():
            items.append(self._inbox.get_nowait())
        return items

    def answer(self, number: int, outcome: Any) -> None:
        waiting = self._waiting.pop(number, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(outcome)
