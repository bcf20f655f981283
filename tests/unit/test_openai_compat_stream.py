"""The openai adapter's stream and body reading on a real aiohttp StreamReader fed by the test (no sockets).

Pins the aiohttp behaviour the adapter works around: once a connection error is set on the reader,
every read raises it first, although the bytes received before it are still in the buffer.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from aiohttp.streams import StreamReader

from gateway.contracts import UpstreamResponseTooLarge, UpstreamStreamBroken
from gateway.policy.model import Backend, UpstreamLimits
from plugins.openai_compat import OpenAICompatAdapter, _drainer, _StreamState


class _Protocol:
    """What StreamReader asks of its protocol."""

    connected = True
    _reading_paused = False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self, resume_parser: bool = True) -> None:
        pass


class _Response:
    def __init__(self, reader: StreamReader, content_length: int | None = None) -> None:
        self.content = reader
        self.content_length = content_length
        self.closed = 0

    def close(self) -> None:
        self.closed += 1

    def release(self) -> None:
        pass


def sse(n: int) -> bytes:
    return b'data: {"choices":[{"index":0,"delta":{"content":" e%d"}}]}\n\n' % n


def event(n: int) -> bytes:
    return sse(n)[6:-2]


def adapter(**limits: int) -> OpenAICompatAdapter:
    backend = Backend(
        name="b", adapter="openai", base_url="http://upstream.invalid/v1", limits=UpstreamLimits(**limits)
    )
    return OpenAICompatAdapter(backend)


def reader() -> StreamReader:
    return StreamReader(_Protocol(), 2**16, loop=asyncio.get_running_loop())  # type: ignore[arg-type]


def stream(a: OpenAICompatAdapter, r: StreamReader) -> tuple[Any, Any]:
    response = _Response(r)
    state = _StreamState(a._max_event)
    return a._batches(response, state), _drainer(response, state)  # type: ignore[arg-type]


async def test_aiohttp_hides_buffered_bytes_once_the_connection_failed() -> None:
    r = reader()
    r.feed_data(sse(1))
    r.set_exception(aiohttp.ClientPayloadError("reset"))
    with pytest.raises(aiohttp.ClientPayloadError):
        await r.readany()
    with pytest.raises(aiohttp.ClientPayloadError):
        r.read_nowait()


async def test_events_received_before_a_reset_are_salvaged_for_the_drain() -> None:
    a = adapter()
    r = reader()
    events, drain = stream(a, r)
    r.feed_data(sse(1))
    assert await events.__anext__() == [event(1)]
    # While the relay is busy with event 1, two more events and half of a third arrive, then a reset.
    r.feed_data(sse(2) + sse(3) + sse(4)[:20])
    r.set_exception(aiohttp.ClientPayloadError("Response payload is not completed"))
    with pytest.raises(UpstreamStreamBroken) as broken:
        await events.__anext__()
    assert broken.value.code == "upstream_stream_broken"
    assert drain() == [event(2), event(3)]  # charged; the torn fourth is not an event


async def test_a_read_is_handed_over_whole_and_the_drain_gives_what_is_buffered_behind_it() -> None:
    a = adapter()
    r = reader()
    events, drain = stream(a, r)
    r.feed_data(sse(1) + sse(2) + sse(3))  # one read, three events: one batch (the relay charges all three)
    assert await events.__anext__() == [event(1), event(2), event(3)]
    r.feed_data(sse(4))  # buffered, not read yet
    # The client leaves while the batch is being relayed: 4 was received, and is charged too.
    assert drain() == [event(4)]


async def test_done_ends_the_stream_and_the_events_before_it_in_the_same_read_are_relayed() -> None:
    a = adapter()
    r = reader()
    events, drain = stream(a, r)
    r.feed_data(sse(1) + sse(2) + b"data: [DONE]\n\n" + sse(3))
    assert await events.__anext__() == [event(1), event(2), b"[DONE]"]  # the end, last: nothing after it
    with pytest.raises(StopAsyncIteration):
        await events.__anext__()
    assert drain() == []


async def test_a_stream_that_goes_silent_past_the_read_timeout_is_timed_out() -> None:
    a = adapter()
    r = reader()
    events, _ = stream(a, r)
    r.set_exception(aiohttp.ServerTimeoutError("Timeout on reading data from socket"))
    with pytest.raises(UpstreamStreamBroken) as broken:
        await events.__anext__()
    assert broken.value.timeout and broken.value.code == "upstream_timeout"


async def test_an_event_over_the_cap_breaks_the_stream_and_what_came_before_is_charged() -> None:
    a = adapter(max_event_bytes=200)
    r = reader()
    events, drain = stream(a, r)
    r.feed_data(sse(1))
    assert await events.__anext__() == [event(1)]
    r.feed_data(sse(2) + b'data: {"pad":"' + b"x" * 300)  # no line end needed: refused at the cap
    with pytest.raises(UpstreamStreamBroken) as broken:
        await events.__anext__()
    assert broken.value.code == "upstream_event_too_large"
    assert "200 bytes" in broken.value.client_message
    assert drain() == [event(2)]


async def test_the_body_read_stops_at_the_cap_without_waiting_for_the_rest() -> None:
    a = adapter(max_body_bytes=100)
    r = reader()
    for _ in range(3):
        r.feed_data(b"x" * 40)  # 120 bytes so far; the body goes on (no EOF)
    with pytest.raises(UpstreamResponseTooLarge) as refused:
        await a._read_body(_Response(r))  # type: ignore[arg-type]
    error = json.loads(refused.value.body())["error"]
    assert refused.value.status == 502 and error["code"] == "upstream_response_too_large"
    assert "100 bytes" in error["message"]
    # A declared length over the cap is refused before reading anything.
    r2 = reader()
    with pytest.raises(UpstreamResponseTooLarge):
        await a._read_body(_Response(r2, content_length=101))  # type: ignore[arg-type]
    r3 = reader()
    r3.feed_data(b"y" * 60)
    r3.feed_data(b"z" * 40)
    r3.feed_eof()
    assert await a._read_body(_Response(r3, content_length=100)) == b"y" * 60 + b"z" * 40  # type: ignore[arg-type]
