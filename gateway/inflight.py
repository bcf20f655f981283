"""The model requests this replica is serving right now: how many, and which.

How many: load shedding (gateway.stages.priority) compares the count with its class's cap. Which: when
a shutdown's grace period runs out, every request still running is cancelled with a mark, so the edge
ends it with an error the client can see (a stream: an in-band error event, never a silent cut; one
not yet answered: 503) instead of leaving it to the server's own hard stop.

The edge (gateway.api.routes) enters each request on arrival and leaves it after its last byte: an
integer and a set, O(1), no task or timer per request. Only the event loop's thread touches it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("strait.shutdown")

CUT_MESSAGE = "strait: shutdown grace period over"


def is_shutdown_cut(exc: BaseException) -> bool:
    """Whether a CancelledError is the end of the grace period's (its message, which asyncio carries to
    whatever the task was awaiting): code far from the edge (the pipeline) then records the 503 the
    client gets instead of a client that left (499)."""
    return exc.args[:1] == (CUT_MESSAGE,)


class InFlight:
    __slots__ = ("_cut", "_grace_timer", "_tasks", "count", "draining", "grace_s")

    def __init__(self) -> None:
        self.count = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        # Set from the first moment of a shutdown (SIGTERM): /readyz answers 503 from then on.
        self.draining = False
        self.grace_s: float | None = None
        self._grace_timer: asyncio.TimerHandle | None = None
        # The requests the end of the grace period cancelled (so their handlers know why).
        self._cut: set[asyncio.Task[Any]] = set()

    def enter(self, task: asyncio.Task[Any]) -> None:
        self.count += 1
        self._tasks.add(task)

    def leave(self, task: asyncio.Task[Any]) -> None:
        self.count -= 1
        self._tasks.discard(task)
        if self._cut:
            self._cut.discard(task)

    def announce(self, delay_s: float) -> None:
        """A shutdown is coming in `delay_s` (STRAIT_DRAIN_DELAY_S): not ready from now on, while new
        requests are still served, so load balancers stop sending any before the listener closes."""
        if self.draining:
            return
        self.draining = True
        log.warning("shutting down in %g s: /readyz answers draining, new requests still served until then", delay_s)

    def drain(self, grace_s: float) -> None:
        """The replica is shutting down: not ready from now on; in `grace_s` every request still running
        is cut. Idempotent (a second signal does not move the deadline)."""
        if self.grace_s is not None:
            return
        self.draining = True
        self.grace_s = grace_s
        log.warning(
            "shutting down: %d request(s) in flight get up to %g s to finish (STRAIT_SHUTDOWN_GRACE_S)",
            self.count,
            grace_s,
        )
        self._grace_timer = asyncio.get_running_loop().call_later(grace_s, self.cut_all)

    def cut_all(self) -> int:
        """Cancel every request still running, marked as cut by the shutdown; returns how many."""
        self._grace_timer = None
        running = [t for t in self._tasks if not t.done()]
        for task in running:
            self._cut.add(task)
            task.cancel(CUT_MESSAGE)
        if running:
            log.warning("shutdown grace period over: ending %d request(s) still running with an error", len(running))
        return len(running)

    def was_cut(self, task: asyncio.Task[Any]) -> bool:
        """Whether `task` was cancelled by the end of the grace period (not by its client leaving)."""
        return task in self._cut

    def close(self) -> None:
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None
