"""The relay's stall timer (gateway.stages.respond.UpstreamEvents): a committed stream silent for longer
than the route's `stall_s` ends as timed out; the client's own cancellation is never taken for a stall."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gateway.context import RequestContext
from gateway.contracts import UpstreamResponse
from gateway.policy.model import Route, TryTimeouts
from gateway.stages.respond import UpstreamEvents

CONTENT = b'{"choices":[{"index":0,"delta":{"content":"Hi"}}]}'
FINISH = b'{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}'


def _ctx(stall_s: float | None) -> RequestContext:
    ctx = RequestContext(request_id="r1", operation="chat", started=0.0, headers={}, route_name="r")
    ctx.route = Route(name="r", models=("m",), timeouts=TryTimeouts(stall_s=stall_s))
    return ctx


def _silent_after(*batches: list[bytes]) -> tuple[UpstreamResponse, list[str]]:
    closed: list[str] = []

    async def gen() -> AsyncIterator[list[bytes]]:
        for b in batches:
            yield b
        await asyncio.Event().wait()  # connection open, nothing more

    return UpstreamResponse(status=200, batches=gen(), close=lambda: closed.append("closed")), closed


async def test_a_silent_stream_ends_as_timed_out_after_stall_s() -> None:
    response, closed = _silent_after([CONTENT])
    events = UpstreamEvents(_ctx(0.05), response)
    assert await events.next() == [CONTENT]
    assert await events.next() == []  # the timer ended the wait
    end = events.stop()
    assert (end.outcome, end.status, end.partial) == ("timed_out", 504, True)
    assert end.error is not None and end.error.code == "upstream_timeout"
    events.release()
    assert closed == ["closed"]


async def test_silence_after_every_choice_finished_is_a_complete_answer() -> None:
    response, _ = _silent_after([CONTENT, FINISH])
    events = UpstreamEvents(_ctx(0.05), response)
    assert await events.next() == [CONTENT, FINISH]
    assert await events.next() == []
    assert events.stop().outcome == "completed"


async def test_the_clients_cancellation_is_not_a_stall() -> None:
    response, _ = _silent_after([CONTENT])
    events = UpstreamEvents(_ctx(60.0), response)

    async def relay() -> None:
        await events.next()
        await events.next()

    task = asyncio.create_task(relay())
    for _ in range(1000):  # event-loop turns (no time passes) until the relay waits in its second read
        if events._waiting:
            break
        await asyncio.sleep(0)
    assert events._waiting
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert events.stop("client_gone").outcome == "client_gone"
