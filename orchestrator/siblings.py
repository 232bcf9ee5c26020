"""A refused key ends its own tasks, not their siblings (issue 8.11).

LangGraph cancels every task of a step once one raises, and keeps the results of those that
had finished. So a builder (or reviewer) whose provider refused its key does not raise at
once: it waits until every sibling task of the run has finished, then raises, and the run
stops with every other candidate kept for `flow resume`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from orchestrator.errors import AuthenticationFailed

T = TypeVar("T")


class Siblings:
    """Counts the run's fanned-out tasks still working; refused ones wait for the rest."""

    def __init__(self) -> None:
        self._working = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def run(self, job: Awaitable[T]) -> T:
        """Await `job`; when its key is refused, raise only once no sibling is working."""
        self._working += 1
        self._idle.clear()
        try:
            result = await job
        except AuthenticationFailed:
            self._leave()
            await self._idle.wait()
            raise
        except BaseException:
            self._leave()
            raise
        self._leave()
        return result

    def _leave(self) -> None:
        self._working -= 1
        if self._working == 0:
            self._idle.set()
