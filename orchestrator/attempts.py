"""Adaptive N: builders as a budget of attempts (`builders: {max: 6, enough: 2}`).

No more builders are in flight than passes are still needed (`enough` minus those passed):
one that finishes without passing its checks makes room for the next, one that passes keeps
its room, and once `enough` candidates have passed, builders not yet started never start.
Without `enough`, every builder starts at once, as before.
"""

from __future__ import annotations

import asyncio


class Attempts:
    """The gate every builder passes before its first model call."""

    def __init__(self, enough: int | None, passed: int = 0):
        self.enough = enough
        self.passed = passed
        """Candidates that passed so far (on resume: those that passed before the crash)."""
        self.not_started: list[int] = []
        self._room = asyncio.Semaphore(max(enough - passed, 0)) if enough else None
        self._stop = asyncio.Event()
        if enough is not None and passed >= enough:
            self._stop.set()

    async def start(self, index: int) -> bool:
        """Wait for room; False (and the builder never starts) once enough have passed."""
        if self._room is None:
            return True
        if self._stop.is_set():
            self.not_started.append(index)
            return False
        room = asyncio.ensure_future(self._room.acquire())
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({room, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not room.done():
                room.cancel()
        if self._stop.is_set():
            if room.done() and not room.cancelled():
                self._room.release()
            self.not_started.append(index)
            return False
        return True

    def finished(self, passed: bool) -> None:
        """A started builder is done (its checks ran); a failure frees its room."""
        if self._room is None:
            return
        if not passed:
            self._room.release()
            return
        self.passed += 1  # a pass is needed no more: its room is not given back
        if self.enough is not None and self.passed >= self.enough:
            self._stop.set()
