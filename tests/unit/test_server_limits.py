"""The uvicorn protocol subclass over a fake transport: header count/size refused with 431, a header
block that does not complete in time closed with 408, normal requests untouched. These also fail loudly
if uvicorn's HttpToolsProtocol internals the subclass relies on change (written against uvicorn 0.54)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from gateway.api.server_limits import LimitedHttpToolsProtocol, ServerLimits

LIMITS = ServerLimits(max_header_bytes=4096, max_header_count=10, header_timeout_s=0.2, body_timeout_s=5)


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = asyncio.Event()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed.is_set(), "write after close"
        self.written += data

    def close(self) -> None:
        self.closed.set()

    def is_closing(self) -> bool:
        return self.closed.is_set()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8080), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Harness:
    def __init__(self, limits: ServerLimits = LIMITS, *, read_body: bool = True) -> None:
        self.calls: list[str] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            self.calls.append(scope["path"])
            while read_body and (await receive()).get("more_body"):
                pass
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})

        config = Config(app=app, http=LimitedHttpToolsProtocol, log_level="warning")
        self.transport = FakeTransport()
        self.protocol = LimitedHttpToolsProtocol(config=config, server_state=ServerState(), app_state={}, limits=limits)
        self.protocol.connection_made(self.transport)

    def status(self) -> int:
        return int(bytes(self.transport.written).split(b" ", 2)[1])

    def error(self) -> dict[str, Any]:
        body = bytes(self.transport.written).split(b"\r\n\r\n", 1)[1]
        error: dict[str, Any] = json.loads(body)["error"]
        return error


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_the_uvicorn_internals_the_subclass_relies_on_exist() -> None:
    for name in (
        "data_received",
        "connection_made",
        "connection_lost",
        "send_400_response",
        "on_message_begin",
        "on_url",
        "on_header",
        "on_headers_complete",
        "on_message_complete",
    ):
        assert callable(getattr(HttpToolsProtocol, name, None)), f"uvicorn's HttpToolsProtocol lost {name}"


def test_a_normal_request_is_served() -> None:
    async def go() -> None:
        h = Harness()
        h.protocol.data_received(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc")
        await asyncio.wait_for(_until(lambda: b"ok" in h.transport.written), 5)
        assert h.calls == ["/x"] and h.status() == 200 and not h.transport.is_closing()
        h.protocol.connection_lost(None)

    run(go())


@pytest.mark.parametrize("count", [11, 10_000])
def test_too_many_headers_get_431_and_the_app_never_runs(count: int) -> None:
    async def go() -> None:
        h = Harness()
        headers = b"".join(b"x-%d: v\r\n" % i for i in range(count))
        h.protocol.data_received(b"GET /x HTTP/1.1\r\n" + headers + b"\r\n")
        assert h.transport.is_closing()
        assert h.status() == 431 and h.calls == []
        assert "more than 10 headers" in h.error()["message"]
        assert h.error()["code"] == "request_header_fields_too_large"

    run(go())


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n",
    ],
)
def test_a_request_the_parser_refuses_gets_400_in_openais_envelope(raw: bytes) -> None:
    async def go() -> None:
        h = Harness()
        h.protocol.data_received(raw)
        await asyncio.wait_for(h.transport.closed.wait(), 5)
        assert h.status() == 400 and b"connection: close" in bytes(h.transport.written)
        assert h.error()["code"] == "invalid_http_request" and h.error()["type"] == "invalid_request_error"
        h.protocol.connection_lost(None)

    run(go())


def test_a_complete_oversize_header_block_gets_431() -> None:
    async def go() -> None:
        h = Harness()
        h.protocol.data_received(b"GET /x HTTP/1.1\r\nx-big: " + b"a" * 5000 + b"\r\n\r\n")
        assert h.status() == 431 and h.calls == [] and h.transport.is_closing()

    run(go())


def test_an_unfinished_header_line_is_refused_before_it_is_buffered_whole() -> None:
    async def go() -> None:
        h = Harness()
        h.protocol.data_received(b"GET /x HTTP/1.1\r\nx-big: ")
        fed = 0
        while not h.transport.is_closing():
            assert fed < 16 * 1024 * 1024, "16 MiB of one header line were accepted"
            h.protocol.data_received(b"a" * 1024)
            fed += 1024
        assert fed <= LIMITS.max_header_bytes + 1024
        assert h.status() == 431 and h.calls == []

    run(go())


def test_a_header_block_not_complete_in_time_gets_408() -> None:
    async def go() -> None:
        h = Harness()
        h.protocol.data_received(b"GET /x HTTP/1.1\r\nHost: a\r\n")
        await asyncio.wait_for(h.transport.closed.wait(), 5)  # the server's timer closes it
        assert h.status() == 408 and h.calls == []
        assert h.error()["code"] == "request_timeout"

    run(go())


def test_a_silent_connection_is_closed_in_time() -> None:
    async def go() -> None:
        h = Harness()
        await asyncio.wait_for(h.transport.closed.wait(), 5)
        assert h.status() == 408

    run(go())


def test_a_timely_header_block_cancels_the_deadline() -> None:
    async def go() -> None:
        h = Harness(ServerLimits(max_header_bytes=4096, max_header_count=10, header_timeout_s=0.05))
        h.protocol.data_received(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        await asyncio.wait_for(_until(lambda: b"ok" in h.transport.written), 5)
        # Past the header deadline, the connection is still open: only the keep-alive timer may close it.
        assert h.protocol._head_since is None
        assert not h.transport.is_closing()
        h.protocol.connection_lost(None)

    run(go())


def test_a_body_nobody_reads_cannot_keep_the_connection_open() -> None:
    async def go() -> None:
        limits = ServerLimits(max_header_bytes=4096, max_header_count=10, header_timeout_s=5, body_timeout_s=0.1)
        h = Harness(limits, read_body=False)  # answers without reading the body (like a 401 before the body)
        h.protocol.data_received(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\nabc")
        await asyncio.wait_for(h.transport.closed.wait(), 5)  # the backstop, 1.1 s later
        assert h.status() == 200 and h.calls == ["/x"]

    run(go())


async def _until(predicate: Any) -> None:
    while not predicate():
        await asyncio.sleep(0)  # yield to the loop so the ASGI task runs (not a timed wait)
