"""Admission by size: requests go in while their sizes fit in an allowance, in arrival order."""

from __future__ import annotations

import asyncio
from collections import deque


class Admission:
    """A weighted, first-come-first-served semaphore for one asyncio event loop.

    A request of ``size`` goes in when the sizes already in, plus its own, fit in
    ``allowance``, and no earlier request is still waiting: a large request is
    never overtaken for ever by a stream of small ones. A size larger than the
    whole allowance counts as the allowance, so such a request goes in alone.
    """

    def __init__(self, allowance: int) -> None:
        self.allowance = allowance
        self.in_flight = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    def share(self, size: int) -> int:
        """What a request of ``size`` takes from the allowance."""
        return min(size, self.allowance)

    async def acquire(self, share: int, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for ``share`` to fit; False if it did not."""
        if not self._waiting and self.in_flight + share <= self.allowance:
            self.in_flight += share
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (share, waiter)
        self._waiting.append(entry)
        try:
            await asyncio.wait((waiter,), timeout=timeout)
        except BaseException:  # cancelled while waiting, or just after going in
            self._give_up(entry)
            raise
        if waiter.done():
            return True
        self._give_up(entry)
        return False

    def release(self, share: int) -> None:
        """Give back a share that :meth:`acquire` let in, and let the next ones in."""
        self.in_flight -= share
        self._admit()

    def _give_up(self, entry: tuple[int, asyncio.Future[None]]) -> None:
        share, waiter = entry
        if waiter.done():
            self.release(share)
            return
        waiter.cancel()
        self._waiting.remove(entry)
        # The request that left may have been the one holding smaller ones back.
        self._admit()

    def _admit(self) -> None:
        while self._waiting and self.in_flight + self._waiting[0][0] <= self.allowance:
            share, waiter = self._waiting.popleft()
            self.in_flight += share
            waiter.set_result(None)
