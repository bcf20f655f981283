"""The state store's in-flight gate (gateway.state.deadline.Gate) and the Deadline's arm/disarm pair:
what `asyncio.Semaphore` and `async with Deadline(...)` did on the store's call path, without their
coroutines (the store's calls pass both twice per request)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.state.deadline import Deadline, Gate


async def test_the_gate_admits_its_size_then_serves_waiters_in_order() -> None:
    gate = Gate(2)
    assert gate.enter_now() and gate.enter_now()
    assert not gate.enter_now()
    order: list[int] = []

    async def waiter(n: int) -> None:
        await gate.enter()
        order.append(n)

    tasks = [asyncio.ensure_future(waiter(n)) for n in range(3)]
    await asyncio.sleep(0)
    assert order == []
    gate.leave()
    await asyncio.sleep(0)
    assert order == [0]
    # A newcomer never jumps the queue, even when a place is free at that instant.
    gate.leave()
    assert not gate.enter_now()
    await asyncio.sleep(0)
    assert order == [0, 1]
    gate.leave()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]
    # Three leaves handed the two places on to 0, 1, then 2: 1 and 2 hold them now. Both given back:
    gate.leave()
    gate.leave()
    assert gate.enter_now() and gate.enter_now() and not gate.enter_now()


async def test_a_cancelled_waiter_neither_holds_nor_loses_a_place() -> None:
    gate = Gate(1)
    assert gate.enter_now()
    cancelled = asyncio.ensure_future(gate.enter())
    served = asyncio.ensure_future(gate.enter())
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    gate.leave()
    await asyncio.wait_for(served, 1)
    gate.leave()
    assert gate.enter_now() and not gate.enter_now()


async def test_a_waiter_cancelled_as_it_is_handed_a_place_passes_it_on() -> None:
    gate = Gate(1)
    assert gate.enter_now()
    first = asyncio.ensure_future(gate.enter())
    second = asyncio.ensure_future(gate.enter())
    await asyncio.sleep(0)
    gate.leave()  # hands the place to `first`...
    first.cancel()  # ...which is cancelled before it resumes
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 1)  # the place went on to `second`
    gate.leave()
    assert gate.enter_now() and not gate.enter_now()


async def test_arm_and_disarm_bound_a_call_like_the_context_manager() -> None:
    deadline = Deadline(0.01)
    deadline.arm()
    try:
        await asyncio.sleep(5)
    except asyncio.CancelledError as exc:  # the deadline's own cancellation
        with pytest.raises(TimeoutError):
            deadline.disarm(type(exc), exc)
    else:
        raise AssertionError("the deadline did not cut the call")
    # A call that ends in time: nothing raised, and the task carries no cancellation afterwards.
    deadline = Deadline(5)
    deadline.arm()
    await asyncio.sleep(0)
    deadline.disarm(None, None)
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
