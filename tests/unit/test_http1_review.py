"""plugins/http1.py under the faults of a review: lost wake-ups, resets mid-body, 101 answers, shutdown,
abandoned reads, TLS verification (a CA made here with the openssl CLI)."""

from __future__ import annotations

import asyncio
import gzip
import logging
import socket
import struct
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import ClientError, ClientPayloadError

from gateway.policy.model import Backend
from plugins.http1 import _EXPAND_BYTES, _READER_LIMIT, Http1Pool, _Connection
from plugins.openai_compat import OpenAICompatAdapter
from tests.unit.test_http1_client import Upstream, answer, pool, read_all, serve

__all__ = ["serve"]  # the fixture, used by name


async def test_a_cancelled_waiter_passes_its_wake_up_on(serve) -> None:  # type: ignore[no-untyped-def]
    gate = asyncio.Event()

    async def held(request: bytes, w: asyncio.StreamWriter) -> None:
        await gate.wait()
        w.write(answer(b'{"ok":1}'))

    up: Upstream = await serve(held)
    p = pool(up.url, limit=1)
    first = asyncio.ensure_future(p.post("/chat/completions", b"{}", {}))
    second = asyncio.ensure_future(read_all(p))
    third = asyncio.ensure_future(read_all(p))
    while len(p._waiters) < 2:
        await asyncio.sleep(0)
    gate.set()
    response = await first
    # The connection closes (its slot frees: the oldest waiter is told to connect), and that waiter is
    # cancelled before it ran: the wake-up must go on to the next waiter, not be lost with it.
    response.close()
    second.cancel()
    assert await asyncio.wait_for(third, 10) == (200, b'{"ok":1}')
    assert second.cancelled()
    await p.close()


async def test_a_reset_during_a_body_read_to_the_close_is_an_error_not_the_end(serve) -> None:  # type: ignore[no-untyped-def]
    async def reset(request: bytes, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n" + b'{"partial": "')
        await w.drain()
        sock = w.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.transport.abort()  # an RST, not a FIN: the body did not end

    up = await serve(reset)
    p = pool(up.url)
    with pytest.raises(ClientPayloadError):
        await read_all(p)
    await p.close()


async def test_a_compressed_body_read_to_the_close_keeps_what_waits_when_the_close_comes() -> None:
    # The close may be reported while the reader is full (a TLS transport buffers): what was received
    # and not yet decompressed is still part of the body.
    class Transport:
        def __init__(self) -> None:
            self.paused = False

        def write(self, data: bytes) -> None:
            pass

        def pause_reading(self) -> None:
            self.paused = True

        def resume_reading(self) -> None:
            self.paused = False

        def close(self) -> None:
            pass

    plain = bytes(range(256)) * 4096  # 1 MiB, several expansion steps
    packed = gzip.compress(plain)
    p = Http1Pool("http://127.0.0.1:9/v1", limit=1, connect_timeout_s=1, read_timeout_s=None, headers={})
    p._loop = asyncio.get_running_loop()
    p._open = 1
    conn = _Connection(p)
    conn.connection_made(Transport())  # type: ignore[arg-type]
    head = conn.send(b"")
    half = len(packed) // 2
    conn.data_received(b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\n\r\n" + packed[:half])
    response = await head
    assert conn._paused  # the reader is full, the rest waits compressed
    conn.data_received(packed[half:])  # what a buffering transport still delivers
    conn.connection_lost(None)
    # Still a step at a time: the close does not expand all that waits at once.
    assert response.content.total_bytes <= 2 * _READER_LIMIT + _EXPAND_BYTES
    data = b""
    while chunk := await response.content.readany():
        data += chunk
    assert len(data) == len(plain) and data == plain
    assert len(plain) > _READER_LIMIT


async def test_a_101_answer_is_a_clear_error_not_a_protocol_crash(serve, caplog) -> None:  # type: ignore[no-untyped-def]
    async def upgrade(request: bytes, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\nconnection: upgrade\r\n\r\nxx")
        await w.drain()

    up = await serve(upgrade)
    p = pool(up.url)
    with caplog.at_level(logging.ERROR), pytest.raises(ClientError) as info:
        await p.post("/chat/completions", b"{}", {})
    assert "101" in str(info.value) or "upgrade" in str(info.value).lower()
    assert not [r for r in caplog.records if "Fatal error" in r.getMessage()]
    assert p._open == 0
    await p.close()


async def test_closing_the_pool_closes_the_connections_in_use(serve) -> None:  # type: ignore[no-untyped-def]
    async def half(request: bytes, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n12345")

    up = await serve(half)
    p = pool(up.url)
    response = await p.post("/chat/completions", b"{}", {})
    assert await response.content.readany() == b"12345"
    await p.close()
    with pytest.raises(ClientPayloadError):
        await response.content.readany()
    assert p._open == 0


async def test_a_caller_cancelled_while_reading_the_body_frees_its_connection(serve) -> None:  # type: ignore[no-untyped-def]
    async def half(request: bytes, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 10\r\n\r\n12345")

    up = await serve(half)
    backend = Backend(name="b", adapter="openai", base_url=up.url, max_connections=1)
    adapter = OpenAICompatAdapter(backend)
    task = asyncio.ensure_future(adapter.send(_chat_call()))
    while not up.requests:
        await asyncio.sleep(0.01)
    for _ in range(20):  # let the head and the first bytes arrive
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert adapter._pool._open == 0  # the slot is free, the connection closed
    await adapter.aclose()


def _chat_call() -> Any:
    # What the adapter reads of an UpstreamCall (its passthrough body: the client spoke OpenAI's protocol).
    return SimpleNamespace(
        operation="chat", stream=False, request_id="req_1", headers=None, passthrough=lambda _: b"{}"
    )


async def test_trailers_never_change_the_answers_headers(serve) -> None:  # type: ignore[no-untyped-def]
    async def trailer(request: bytes, w: asyncio.StreamWriter) -> None:
        w.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
            b"2\r\n{}\r\n0\r\ncontent-type: text/html\r\nretry-after: 999\r\n\r\n"
        )

    up = await serve(trailer)
    p = pool(up.url)
    response = await p.post("/chat/completions", b"{}", {})
    assert await response.content.read() == b"{}"
    assert response.headers["content-type"] == "application/json" and "retry-after" not in response.headers
    response.release()
    assert p._idle  # a complete answer: kept alive
    await p.close()


async def test_a_connection_lost_while_handed_to_a_waiter_is_not_used(serve) -> None:  # type: ignore[no-untyped-def]
    async def ok(request: bytes, w: asyncio.StreamWriter) -> None:
        w.write(answer(b'{"ok":1}'))

    up = await serve(ok)
    p = Http1Pool(up.url, limit=1, connect_timeout_s=5.0, read_timeout_s=60.0, headers={})
    response = await p.post("/chat/completions", b"{}", {})
    assert await response.content.read() == b'{"ok":1}'
    waiting = asyncio.ensure_future(read_all(p))
    while not p._waiters:
        await asyncio.sleep(0)
    conn = response._conn
    assert conn is not None and conn.transport is not None
    # The upstream's close is processed after the connection was handed over, before the waiter runs.
    conn.transport.abort()
    response.release()
    assert await asyncio.wait_for(waiting, 10) == (200, b'{"ok":1}')
    await p.close()


def test_header_names_and_values_that_are_not_http_are_refused() -> None:
    for headers in ({"x-a": "a\x00b"}, {"bad name": "v"}, {"": "v"}, {"x-a\x7f": "v"}, {"x-a": "caf\u00e9\u2603"}):
        with pytest.raises(ValueError, match="upstream request header"):
            Http1Pool("http://127.0.0.1:9/v1", limit=1, connect_timeout_s=1, read_timeout_s=1, headers=headers)
    # A tab inside a value and latin-1 text are legal.
    Http1Pool("http://127.0.0.1:9/v1", limit=1, connect_timeout_s=1, read_timeout_s=1, headers={"x-a": "a\tb é"})


async def test_an_endless_trailer_is_refused_not_buffered(serve) -> None:  # type: ignore[no-untyped-def]
    async def endless(request: bytes, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nx-trailer: ")
        for _ in range(40):
            w.write(b"a" * 8192)
            await w.drain()

    up = await serve(endless)
    p = pool(up.url, read_s=60.0)
    response = await p.post("/chat/completions", b"{}", {})
    with pytest.raises(ClientPayloadError, match="exceed"):
        await response.content.read()
    response.close()
    await p.close()


async def test_interim_answers_bodiless_statuses_and_ambiguous_framing(serve) -> None:  # type: ignore[no-untyped-def]
    answers = iter(
        [
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" + answer(b'{"ok":1}'),
            b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        ]
    )

    async def scripted(request: bytes, w: asyncio.StreamWriter) -> None:
        w.write(next(answers))

    up = await serve(scripted)
    p = pool(up.url, limit=1)
    status, body = await read_all(p)
    assert (status, body) == (200, b'{"ok":1}')
    assert await read_all(p) == (204, b"")
    assert await read_all(p) == (304, b"")
    assert up.connections == 1  # each complete: the one connection kept alive
    with pytest.raises(ClientPayloadError, match="Content-Length"):
        await read_all(p)  # both lengths: refused, never guessed
    assert p._open == 0
    await p.close()
