"""A hard deadline for one store call: `asyncio.timeout` that re-issues its cancellation until it lands.

Why not plain `asyncio.timeout`: on Python 3.11, `asyncio.wait_for` (which redis-py uses around socket
writes) can swallow a cancellation that arrives as its inner operation completes (fixed in 3.12). The
call then runs on until the next socket timeout, and a request pays twice the configured timeout
(seen under load: 0.2 s for a 0.1 s deadline). Re-cancelling every `_RETRY_S` after expiry makes the
deadline hold whatever the library does with one cancellation.

And never early: the loop's timers may fire before their time (uvloop's have millisecond resolution and
a cached "now", late by as much as the loop iteration that armed them), and a caller that gave up must
have waited its whole deadline: the admission script refuses to run past that deadline (by Redis TIME),
which only protects a caller that was still waiting until then.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from types import TracebackType

_RETRY_S = 0.002


class Deadline:
    __slots__ = ("_base", "_delay", "_end", "_fired", "_handle", "_loop", "_task")

    def __init__(self, delay_s: float) -> None:
        self._delay = delay_s
        self._fired = 0

    async def __aenter__(self) -> Deadline:
        self.arm()
        return self

    def arm(self) -> None:
        """Start the clock (what `async with` does on entry): for a hot caller, without the two
        coroutines of the async context manager protocol (about 1 us a call)."""
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("Deadline must be used inside a task")
        self._task = task
        self._loop = loop = task.get_loop()
        self._base = task.cancelling()
        self._end = time.monotonic() + self._delay
        self._handle = loop.call_later(self._delay, self._fire)

    def _fire(self) -> None:
        if not self._fired:
            left = self._end - time.monotonic()
            if left > 0:  # the timer fired early: wait out the rest
                self._handle = self._loop.call_later(left, self._fire)
                return
        self._fired += 1
        self._task.cancel()
        self._handle = self._loop.call_later(_RETRY_S, self._fire)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.disarm(exc_type, exc)

    def disarm(self, exc_type: type[BaseException] | None, exc: BaseException | None) -> None:
        """Stop the clock (what `async with` does on exit, given the exception leaving the block): raises
        TimeoutError, from `exc`, if the deadline's own cancellation is what ended the block."""
        self._handle.cancel()
        if not self._fired:
            return
        # Withdraw every cancellation we issued (landed or swallowed) so an outer cancel still counts.
        for _ in range(self._fired):
            self._task.uncancel()
        if exc_type is asyncio.CancelledError and self._task.cancelling() <= self._base:
            raise TimeoutError(f"store call exceeded {self._delay:.3f}s") from exc


class Gate:
    """At most `size` calls in flight; the others wait their turn, first come first served (what
    `asyncio.Semaphore` does, without its coroutines and its scan of the waiters on every acquire: the
    store's calls go through it twice per request). `enter_now()` takes a place if one is free and nobody
    waits; else `await enter()`. Every entry is paired with one `leave()`."""

    __slots__ = ("_free", "_waiters")

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiters: deque[asyncio.Future[None]] = deque()

    def enter_now(self) -> bool:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return True
        return False

    async def enter(self) -> None:
        """Wait for a place: handed over by a `leave()`, never taken from under an earlier waiter."""
        if self.enter_now():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.leave()  # handed a place as we were cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):  # already passed over by a leave()
                    self._waiters.remove(waiter)
            raise

    def leave(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the place goes straight to the next waiter
                return
        self._free += 1
