"""The streamed attempt's deadline (gateway.upstream.commit.AttemptTimer): what an `asyncio.timeout_at`
block did for the dispatcher, told apart from anyone else's cancellation."""

from __future__ import annotations

import asyncio

import pytest

from gateway.upstream.commit import AttemptTimer


async def _wait_under(timer_at: float | None, reschedule: float | None = None) -> tuple[bool, bool]:
    """Waits forever under a timer; (whether the wait was cancelled by it, whether stop() says so)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    timer = AttemptTimer(loop, task, loop.time() + (timer_at if timer_at is not None else 3600))
    if reschedule is not None:
        timer.reschedule(loop.time() + reschedule)
    try:
        await loop.create_future()
    except asyncio.CancelledError:
        return True, timer.stop()
    finally:
        timer.stop()
    raise AssertionError("not reached")


async def test_its_own_expiry_is_told_apart_and_withdrawn() -> None:
    cancelled, own = await _wait_under(0.01)
    assert cancelled and own
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # withdrawn: nothing left pending


async def test_a_rescheduled_deadline_fires_at_its_new_time() -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    cancelled, own = await _wait_under(3600, reschedule=0.02)
    assert cancelled and own
    assert loop.time() - start >= 0.015  # uvloop timers may fire up to a millisecond early


async def test_another_cancellation_is_not_its_own() -> None:
    task = asyncio.ensure_future(_wait_under(3600))
    await asyncio.sleep(0)
    task.cancel()  # the client left: _wait_under catches it and reports what stop() said
    assert await task == (True, False)


async def test_an_outer_cancellation_on_top_of_its_expiry_still_counts() -> None:
    loop = asyncio.get_running_loop()
    outcome: list[bool] = []

    async def attempt() -> None:
        task = asyncio.current_task()
        assert task is not None
        timer = AttemptTimer(loop, task, loop.time() + 0.01)
        try:
            await loop.create_future()
        except asyncio.CancelledError:
            task.cancel()  # someone else's cancellation arrives too
            outcome.append(timer.stop())
            raise

    runner = asyncio.ensure_future(attempt())
    with pytest.raises(asyncio.CancelledError):
        await runner
    assert outcome == [False]


async def test_stopped_before_its_time_it_never_fires() -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    timer = AttemptTimer(loop, task, loop.time() + 0.005)
    assert timer.stop() is False
    await asyncio.sleep(0.02)  # past the deadline: nothing cancels this task
    assert task.cancelling() == 0
