"""plugins/http1.py, the openai adapter's HTTP/1.1 client, against scripted upstreams on loopback sockets."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import ClientPayloadError, ServerDisconnectedError

from plugins.http1 import Http1Pool

# A handler gets the request's raw head+body and writes the answer; it may keep the connection or not.
Handler = Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]


class Upstream:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.tasks: list[asyncio.Task[None] | None] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.tasks.append(asyncio.current_task())  # type: ignore[arg-type]
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                await self.handler(request, writer)
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[Upstream]]]:
    started: list[Upstream] = []

    async def start(handler: Handler) -> Upstream:
        up = Upstream(handler)
        up.server = await asyncio.start_server(up._serve, "127.0.0.1", 0)
        started.append(up)
        return up

    yield start
    for up in started:
        assert up.server is not None
        up.server.close()
        for task in up.tasks:
            if task is not None:
                task.cancel()


def pool(url: str, **kw: float) -> Http1Pool:
    return Http1Pool(
        url,
        limit=int(kw.pop("limit", 4)),
        connect_timeout_s=2.0,
        read_timeout_s=kw.pop("read_s", 5.0),
        headers={"content-type": "application/json", "authorization": "Bearer up-key"},
    )


def answer(body: bytes, *extra: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n" % len(body)
    return head + b"".join(h + b"\r\n" for h in extra) + b"\r\n" + body


async def read_all(p: Http1Pool, body: bytes = b"{}") -> tuple[int, bytes]:
    response = await p.post("/chat/completions", body, {"x-request-id": "req-1"})
    data = b""
    while chunk := await response.content.readany():
        data += chunk
    response.release()
    return response.status, data


async def test_the_request_carries_the_path_headers_and_body_and_the_connection_is_kept_alive(serve) -> None:  # type: ignore[no-untyped-def]
    async def ok(request: bytes, w: asyncio.StreamWriter) -> None:
        w.write(answer(b'{"ok":1}', b"x-ratelimit-remaining: 7"))

    up = await serve(ok)
    p = pool(up.url)
    assert await read_all(p, b'{"model":"m"}') == (200, b'{"ok":1}')
    assert await read_all(p) == (200, b'{"ok":1}')
    await p.close()
    assert up.connections == 1  # the second request reused the first's connection
    first = up.requests[0]
    assert first.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"\r\nauthorization: Bearer up-key\r\n" in first and b"\r\nx-request-id: req-1\r\n" in first
    assert b"\r\nContent-Length: 13\r\n" in first and first.endswith(b'\r\n\r\n{"model":"m"}')


async def test_chunked_and_gzip_answers_are_decoded(serve) -> None:  # type: ignore[no-untyped-def]
    payload = b'{"choices":[]}' * 50
    packed = gzip.compress(payload)

    async def chunked_gzip(request: bytes, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-encoding: gzip\r\n\r\n")
        for i in range(0, len(packed), 40):
            part = packed[i : i + 40]
            w.write(b"%x\r\n%b\r\n" % (len(part), part))
            await w.drain()
        w.write(b"0\r\n\r\n")

    up = await serve(chunked_gzip)
    p = pool(up.url)
    assert await read_all(p) == (200, payload)
    await p.close()


async def test_raw_deflate_is_decoded_too(serve) -> None:  # type: ignore[no-untyped-def]
    obj = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    packed = obj.compress(b"hello deflate") + obj.flush()

    async def deflate(request: bytes, w: asyncio.StreamWriter) -> None:
        w.write(answer(packed, b"content-encoding: deflate"))

    up = await serve(deflate)
    p = pool(up.url)
    assert await read_all(p) == (200, b"hello deflate")
    await p.close()


async def test_a_body_without_length_ends_with_the_connection_which_is_not_reused(serve) -> None:  # type: ignore[no-untyped-def]
    async def until_close(request: bytes, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")
        await w.drain()
        w.close()

    up = await serve(until_close)
    p = pool(up.url)
    assert await read_all(p) == (200, b"all of it")
    assert await read_all(p) == (200, b"all of it")
    await p.close()
    assert up.connections == 2


async def test_a_connection_dropped_mid_body_is_a_payload_error(serve) -> None:  # type: ignore[no-untyped-def]
    async def torn(request: bytes, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
        await w.drain()
        w.close()

    up = await serve(torn)
    p = pool(up.url)
    with pytest.raises(ClientPayloadError):
        await read_all(p)
    await p.close()


async def test_a_connection_dropped_before_the_answer_is_server_disconnected(serve) -> None:  # type: ignore[no-untyped-def]
    async def hang_up(request: bytes, w: asyncio.StreamWriter) -> None:
        w.close()

    up = await serve(hang_up)
    p = pool(up.url)
    with pytest.raises(ServerDisconnectedError):
        await read_all(p)
    await p.close()


async def test_the_read_timeout_bounds_the_wait_for_the_head_and_for_each_body_read(serve) -> None:  # type: ignore[no-untyped-def]
    async def silent(request: bytes, w: asyncio.StreamWriter) -> None:
        if request.endswith(b"head"):
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")  # then nothing more
        await asyncio.sleep(30)

    up = await serve(silent)
    p = pool(up.url, read_s=0.2)
    with pytest.raises(TimeoutError):
        await p.post("/chat/completions", b"none", {})
    response = await p.post("/chat/completions", b"head", {})
    assert await response.content.readany() == b"abc"
    with pytest.raises(TimeoutError):
        await response.content.readany()
    response.close()
    await p.close()


async def test_requests_beyond_the_limit_wait_for_a_free_connection(serve) -> None:  # type: ignore[no-untyped-def]
    async def slow(request: bytes, w: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.05)
        w.write(answer(b"{}"))

    up = await serve(slow)
    p = pool(up.url, limit=2)
    results = await asyncio.gather(*(read_all(p) for _ in range(6)))
    await p.close()
    assert results == [(200, b"{}")] * 6
    assert up.connections == 2


async def test_a_header_that_would_break_the_framing_is_refused() -> None:
    p = pool("http://127.0.0.1:9/v1")
    with pytest.raises(ValueError, match="invalid character"):
        await p.post("/chat/completions", b"{}", {"x-request-id": "a\r\nx-evil: 1"})


async def test_an_endless_or_oversized_head_is_refused(serve) -> None:  # type: ignore[no-untyped-def]
    async def endless(request: bytes, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nx-long: ")
        for _ in range(200):  # one header line that never ends: 200 x 1 KiB
            w.write(b"a" * 1024)
            await w.drain()
        await asyncio.sleep(30)

    async def many(request: bytes, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\n" + b"".join(b"x-h%d: %s\r\n" % (i, b"v" * 100) for i in range(2000)))
        await w.drain()
        await asyncio.sleep(30)

    for handler in (endless, many):
        up = await serve(handler)
        p = pool(up.url)
        with pytest.raises(ClientPayloadError):
            await read_all(p)
        await p.close()


async def test_a_small_head_with_a_large_body_in_one_read_is_accepted(serve) -> None:  # type: ignore[no-untyped-def]
    body = b"b" * 300_000

    async def big(request: bytes, w: asyncio.StreamWriter) -> None:
        w.write(answer(body))

    up = await serve(big)
    p = pool(up.url)
    assert await read_all(p) == (200, body)
    await p.close()


async def test_bytes_on_an_idle_connection_retire_it(serve) -> None:  # type: ignore[no-untyped-def]
    async def chatty(request: bytes, w: asyncio.StreamWriter) -> None:
        w.write(answer(b"{}") + b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nstale")  # one answer too many

    up = await serve(chatty)
    p = pool(up.url)
    assert await read_all(p) == (200, b"{}")
    assert await read_all(p) == (200, b"{}")  # not the stale answer: a new connection
    await p.close()
    assert up.connections == 2


async def test_a_compressed_answer_is_decompressed_as_it_is_read_not_all_at_once(serve) -> None:  # type: ignore[no-untyped-def]
    size = 40 * 1024 * 1024
    packed = gzip.compress(b"\0" * size, compresslevel=9)  # ~40 KB that expand a thousandfold

    async def bomb(request: bytes, w: asyncio.StreamWriter) -> None:
        w.write(answer(packed, b"content-encoding: gzip"))

    up = await serve(bomb)
    p = pool(up.url)
    response = await p.post("/chat/completions", b"{}", {})
    await asyncio.sleep(0.05)  # more of the compressed bytes arrive meanwhile (the bound holds either way)
    held = sum(len(c) for c in response.content._buffer)
    assert held <= 1024 * 1024  # the reader's limit plus one step, not 40 MB
    total = 0
    while chunk := await response.content.readany():
        total += len(chunk)
    response.release()
    assert total == size
    await p.close()
    assert up.connections == 1


async def test_a_refused_connection_is_connect_failed_not_a_drop() -> None:
    """Nothing was sent: the dispatcher may fail over at once (a drop after sending is retried instead)."""
    from plugins.http1 import ConnectFailed
    from tests.harness.procs import free_port

    pool = Http1Pool(f"http://127.0.0.1:{free_port()}/v1", limit=2, connect_timeout_s=2, read_timeout_s=2, headers={})
    try:
        with pytest.raises(ConnectFailed):
            await pool.post("/chat/completions", b"{}", {})
    finally:
        await pool.close()


async def test_a_base_urls_query_goes_with_every_request(serve) -> None:  # type: ignore[no-untyped-def]
    # Azure OpenAI puts the API version in the query of every request (`?api-version=`).
    async def ok(request: bytes, w: asyncio.StreamWriter) -> None:
        w.write(answer(b'{"ok":1}'))

    up = await serve(ok)
    p = pool(up.url.removesuffix("/v1") + "/openai/deployments/gpt?api-version=2024-10-21")
    assert await read_all(p) == (200, b'{"ok":1}')
    await p.close()
    assert up.requests[0].startswith(
        b"POST /openai/deployments/gpt/chat/completions?api-version=2024-10-21 HTTP/1.1\r\n"
    )
