"""Timing a call, and waiting for an observable condition with a deadline (never a fixed sleep)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def timed(fn: Callable[[], Awaitable[T]]) -> tuple[T, float]:
    started = time.monotonic()
    result = await fn()
    return result, time.monotonic() - started


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Poll with a deadline (no fixed sleeps as synchronisation)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout}s")


def poll(check: Callable[[], T | None], timeout: float = 15.0) -> T | None:
    """`check()` until it returns something truthy (returned), or its last result at the deadline (the
    caller's assertion says what never came). For a blocking test polling a process's observable state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)  # polling an observable condition, with a deadline
    return check()
