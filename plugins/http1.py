"""A lean pooled HTTP/1.1 client for the `openai` adapter: one POST at a time per kept-alive connection.

Why not `aiohttp.ClientSession.post`: measured on this machine against the fast upstream at 32 concurrent,
aiohttp's client costs about 65 us of CPU per request (URL and header objects, its request and
response classes, the connector's bookkeeping, the writer), a raw asyncio protocol with httptools'
parser about 7 us. That was the largest single part of the gateway's CPU per request (loadtest/README.md,
"Issue 8 cost, second pass").

What it keeps of aiohttp's behaviour (what the adapter relied on):
- the body arrives in an `aiohttp.StreamReader` (`content`; a subclass with a leaner `readany`), with its flow control, so the adapter's
  body and stream reading (and the tests that pin it) are unchanged; errors are aiohttp's classes:
  `ServerTimeoutError` (a TimeoutError) for the read timeout, `ServerDisconnectedError` when the
  connection drops before the answer's head, `ClientPayloadError` when it drops mid-body;
- a per-backend connection limit (callers wait for a free connection), keep-alive (an idle connection
  is dropped after `keepalive_s` or when the upstream closes it, never reused after an incomplete answer
  or `Connection: close`), the connect timeout on the TCP (and TLS) handshake, the read timeout on every
  wait for the upstream's bytes (head included; paused while the reader's buffer is full);
- `Accept-Encoding: gzip, deflate`, and such answers decompressed; no cookies, no redirects followed,
  no proxies from the environment.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
import zlib
from collections import deque
from collections.abc import Mapping
from typing import Final
from urllib.parse import quote, urlsplit

import httptools
from aiohttp import ClientPayloadError, InvalidURL, ServerDisconnectedError, ServerTimeoutError, StreamReader

_READER_LIMIT: Final = 2**16  # aiohttp's default: reading pauses past twice this much buffered
# The answer's status line and headers, all together (aiohttp allowed 8190 bytes per line): an upstream
# that sends more, or never ends its header block, is refused before it is buffered.
MAX_HEAD_BYTES: Final = 64 * 1024
_EXPAND_BYTES: Final = 256 * 1024  # decompressed per step (then the reader's flow control decides)
_USER_AGENT: Final = b"strait"
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE: Final = re.compile(r"[\t\x20-\x7e\x80-\xff]*")


class _Decoder:
    """gzip or deflate (zlib-wrapped or raw, as aiohttp accepts both), at most _EXPAND_BYTES out per call:
    what a compressed read expands to beyond that waits in `tail` until the reader wants more (a small
    body may expand a thousandfold; it is never decompressed all at once)."""

    __slots__ = ("_obj", "_raw_tried", "_started")

    def __init__(self, encoding: str) -> None:
        self._raw_tried = encoding != "deflate"
        self._started = False
        self._obj = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)

    @property
    def tail(self) -> bool:
        return bool(self._obj.unconsumed_tail)

    def more(self) -> bytes:
        return self._obj.decompress(self._obj.unconsumed_tail, _EXPAND_BYTES)

    def feed(self, data: bytes) -> bytes:
        try:
            out = self._obj.decompress(data, _EXPAND_BYTES)
        except zlib.error:
            if self._raw_tried or self._started:
                raise
            # `deflate` sent without its zlib header (common): raw deflate, from the start.
            self._raw_tried = True
            self._obj = zlib.decompressobj(-zlib.MAX_WBITS)
            out = self._obj.decompress(data, _EXPAND_BYTES)
        self._started = True
        return out

    def flush(self) -> bytes:
        return self._obj.flush()


class _Reader(StreamReader):
    """aiohttp's StreamReader with a leaner `readany`, the only read the adapters use: what it does per
    read of a stream (an SSE event each, when the upstream paces them) without the `_wait` coroutine
    and the no-op timer's context around it. Same checks, same order, same flow control (`_read_nowait`)."""

    __slots__ = ()

    async def readany(self) -> bytes:
        while True:
            if self._exception is not None:
                raise self._exception
            buffer = self._buffer
            if buffer:
                if len(buffer) > 1 or self._buffer_offset:
                    return self._read_nowait(-1)
                # One whole chunk (a paced stream's every read): aiohttp's `_read_nowait_chunk` for it,
                # without its calls (the no-op timer's check; no HTTP chunk splits are kept here).
                data = buffer.popleft()
                size = self._size = self._size - len(data)
                self._cursor += len(data)
                if size < self._low_water:
                    self._protocol.resume_reading()
                return data
            if self._eof:
                return b""
            if not self._protocol.connected:
                raise RuntimeError("Connection closed.")
            if self._waiter is not None:
                raise RuntimeError("readany() called while another coroutine is already waiting for incoming data")
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None


class Response:
    """The upstream's answer: status, headers (names lower-cased), and the body as it arrives."""

    __slots__ = ("_conn", "content", "content_length", "headers", "status")

    def __init__(self, conn: _Connection, status: int, headers: dict[str, str], content: StreamReader) -> None:
        self._conn: _Connection | None = conn
        self.status = status
        self.headers = headers
        self.content = content
        length = headers.get("content-length")
        self.content_length = int(length) if length is not None and length.isdigit() else None

    def release(self) -> None:
        """Done with the answer: the connection goes back to the pool if the answer was read to its end
        (and may be kept alive), else it is closed."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.finish()

    def close(self) -> None:
        """Drop the connection (the upstream sees it close: a stream stops generating)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.drop()


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection and the answer being read on it."""

    def __init__(self, pool: Http1Pool) -> None:
        self._pool = pool
        self._loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.connected = False
        self.idle_since = 0.0
        self.counted = True  # in the pool's count of open connections until forgotten
        self._parser = httptools.HttpResponseParser(self)
        self._head: asyncio.Future[Response] | None = None
        self._reader: StreamReader | None = None
        self._headers: dict[str, str] = {}
        self._decoder: _Decoder | None = None
        # A compressed answer: its bytes not decompressed yet (the reader is full), and whether its end
        # has arrived meanwhile (the end goes to the reader once all of it is decompressed).
        self._stash: deque[bytes] = deque()
        self._ended = False
        self._complete = False
        self._keep_alive = False
        self._paused = False
        # The read timeout, lazily: moved by arrivals only when it fires (no timer churn per read), and
        # left armed when an answer is complete (`_timing` off): it then fires once, finds nothing to
        # time, and is gone; the next request on the connection usually finds it still armed, so a
        # request costs no timer of its own (arming and cancelling one: ~1.6 us).
        self._timer: asyncio.TimerHandle | None = None
        self._timing = False
        self._last_read = 0.0
        self._head_bytes = 0  # received while the answer's head is awaited
        self._header_bytes = 0  # of the header lines parsed (exact)
        self._framing_bytes = 0  # received after the head with no body byte in between
        self._body_fed = False  # the current read held body bytes

    # -- asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport (TCP or TLS)
        self.connected = True

    def data_received(self, data: bytes) -> None:
        self._last_read = self._loop.time()
        if self._reader is None and self._head is None:
            self.drop()  # bytes nobody asked for (on an idle connection): it is out of step, never reused
            return
        awaiting_head = self._reader is None
        self._body_fed = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ClientPayloadError(f"Invalid HTTP response from the upstream: {exc}"))
            self.drop()
            return
        except httptools.HttpParserUpgrade:
            # A 101 (or CONNECT-like) switch: not an answer to a POST; the connection is no longer HTTP.
            self._fail(ClientPayloadError("The upstream switched protocols (101): not an answer to the request"))
            self.drop()
            return
        if awaiting_head and self._reader is None:
            # Still no complete head: all that arrived is head, so a header block that never ends (one
            # endless line included, which the parser buffers) is refused as soon as it is too long.
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._fail(ClientPayloadError(f"The upstream's answer head exceeds {MAX_HEAD_BYTES} bytes"))
                self.drop()
        elif not awaiting_head and not self._complete:
            # Bytes after the head that carried no body (chunk framing, trailers): the parser buffers a
            # trailer line until it ends, so as many without a body byte in between are bounded too.
            self._framing_bytes = 0 if self._body_fed else self._framing_bytes + len(data)
            if self._framing_bytes > MAX_HEAD_BYTES:
                self._fail(
                    ClientPayloadError(f"The upstream's chunk framing or trailers exceed {MAX_HEAD_BYTES} bytes")
                )
                self.drop()

    def eof_received(self) -> bool | None:
        return None  # close our side too (connection_lost follows)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connected = False
        self._cancel_timer()
        head, reader = self._head, self._reader
        if head is not None and not head.done():
            head.set_exception(ServerDisconnectedError())
        elif reader is not None and not self._complete and not self._ended and reader.exception() is None:
            # A body delimited by the connection's end (no length, not chunked) ends with a clean close
            # only: a reset (exc) cut it short.
            if exc is None and self._reads_to_close():
                if self._decoder is not None:
                    self._ended = True  # what waits compressed still goes out, a step at a time
                    self._pump()
                else:
                    self._end_body()
            else:
                reader.set_exception(ClientPayloadError("Response payload is not completed"))
        self._pool.forget(self)

    def pause_reading(self) -> None:
        # Called by the StreamReader when its buffer is full; the read timeout waits with it (aiohttp's).
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
            self._stop_timer()

    def resume_reading(self, resume_parser: bool = True) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
            if self._decoder is not None and self._reader is not None:
                self._pump()
            if not self._complete and not self._ended:
                self._last_read = self._loop.time()
                self._start_timer()

    # -- httptools callbacks -----------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4  # exact: ": " and CRLF
        if self._header_bytes > MAX_HEAD_BYTES:
            raise ClientPayloadError(f"The upstream's answer head exceeds {MAX_HEAD_BYTES} bytes")
        if self._reader is not None:
            return  # a trailer (after a chunked body): bounded above, never mixed into the answer's headers
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        prior = self._headers.get(key)
        self._headers[key] = text if prior is None else f"{prior}, {text}"

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            self._headers = {}  # an interim answer: the real one follows
            return
        head = self._head
        if head is None:
            # A second answer behind the one asked for: the connection is out of step (stops the parse;
            # data_received closes it; the answer already handed over keeps what it had received).
            raise ClientPayloadError("The upstream sent an answer nobody asked for")
        self._head = None
        self._keep_alive = self._parser.should_keep_alive()
        encoding = self._headers.get("content-encoding", "").strip().lower()
        if encoding in ("gzip", "x-gzip", "deflate"):
            self._decoder = _Decoder("deflate" if encoding == "deflate" else "gzip")
        reader = self._reader = _Reader(self, _READER_LIMIT, loop=self._loop)  # type: ignore[arg-type]
        if not head.done():
            head.set_result(Response(self, status, self._headers, reader))

    def on_body(self, body: bytes) -> None:
        self._body_fed = True
        reader = self._reader
        if reader is None:
            return
        if self._decoder is not None:
            self._stash.append(body)
            self._pump()
        elif body:
            reader.feed_data(body)

    def on_message_complete(self) -> None:
        if self._reader is None:
            return  # the end of an interim (1xx) answer
        if self._decoder is not None:
            self._ended = True
            self._stop_timer()  # everything has arrived
            self._pump()
        else:
            self._end_body()

    def _pump(self) -> None:
        """Decompress what waits, a step at a time, while the reader wants more (it pauses us when full:
        resume_reading comes back here); then the end, if it has arrived."""
        decoder, reader = self._decoder, self._reader
        assert decoder is not None and reader is not None
        try:
            while not self._paused:
                if decoder.tail:
                    out = decoder.more()
                elif self._stash:
                    out = decoder.feed(self._stash.popleft())
                else:
                    break
                if out:
                    reader.feed_data(out)
        except zlib.error as exc:
            self._ended = False
            self._stash.clear()
            reader.set_exception(ClientPayloadError(f"Can not decode the upstream's content-encoding: {exc}"))
            self.drop()
            return
        if self._ended and not self._paused and not self._stash and not decoder.tail:
            self._ended = False
            self._end_body()

    # -- the request -------------------------------------------------------------------------------

    def send(self, request: bytes) -> asyncio.Future[Response]:
        assert self.transport is not None
        self._complete = False
        self._reader = None
        self._decoder = None
        self._stash.clear()
        self._ended = False
        self._headers = {}
        self._head_bytes = self._header_bytes = self._framing_bytes = 0
        head: asyncio.Future[Response] = self._loop.create_future()
        self._head = head
        self.transport.write(request)
        self._last_read = self._loop.time()
        self._start_timer()
        return head

    def finish(self) -> None:
        """The caller is done: back to the pool only after a complete answer that may be kept alive."""
        self._stop_timer()
        if self._complete and self._keep_alive and self.connected and not self._paused:
            self._reader = None
            self._pool.put_back(self)
        else:
            self.drop()

    def drop(self) -> None:
        self._cancel_timer()
        reader = self._reader
        if reader is not None and not self._complete and reader.exception() is None:
            # A reader still waiting must fail now: aiohttp's reader raises a bare RuntimeError when it
            # finds its protocol disconnected before connection_lost has told it why.
            reader.set_exception(ClientPayloadError("Response payload is not completed"))
        if self.transport is not None:
            self.transport.close()
        self.connected = False
        self._pool.forget(self)

    # -- internals ---------------------------------------------------------------------------------

    def _end_body(self) -> None:
        self._complete = True
        self._stop_timer()
        reader = self._reader
        if reader is None:
            return
        if self._decoder is not None:
            try:
                rest = self._decoder.flush()
            except zlib.error as exc:
                reader.set_exception(ClientPayloadError(f"Can not decode the upstream's content-encoding: {exc}"))
                return
            if rest:
                reader.feed_data(rest)
        reader.feed_eof()

    def _reads_to_close(self) -> bool:
        h = self._headers
        return "content-length" not in h and "chunked" not in h.get("transfer-encoding", "").lower()

    def _fail(self, exc: BaseException) -> None:
        head, reader = self._head, self._reader
        if head is not None and not head.done():
            head.set_exception(exc)
        elif reader is not None and not self._complete:
            reader.set_exception(exc)

    def _start_timer(self) -> None:
        timeout = self._pool.read_timeout_s
        if timeout is not None:
            self._timing = True
            if self._timer is None:
                self._timer = self._loop.call_at(self._last_read + timeout, self._on_timer)
            # else: armed for an earlier time (an earlier read's due): it moves itself on when it fires

    def _stop_timer(self) -> None:
        """Nothing to time any more (the answer is complete, or reading paused): the armed timer stays
        and does nothing when it fires."""
        self._timing = False

    def _cancel_timer(self) -> None:
        """The connection is closed: its timer goes."""
        self._timing = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if not self._timing:
            return
        timeout = self._pool.read_timeout_s
        assert timeout is not None
        due = self._last_read + timeout
        if self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._on_timer)  # bytes arrived meanwhile
            return
        self._fail(ServerTimeoutError("Timeout on reading data from socket"))
        self.drop()


class ConnectFailed(OSError):
    """No connection could be made (refused, unreachable, name not resolved, TLS handshake failed): the
    request was never sent, unlike a connection dropped after it was (ServerDisconnectedError)."""


class Http1Pool:
    """Connections to one upstream (scheme, host, port), at most `limit` open; requests wait for one."""

    def __init__(
        self,
        base_url: str,
        *,
        limit: int,
        connect_timeout_s: float | None,
        read_timeout_s: float | None,
        headers: Mapping[str, str],
        keepalive_s: float = 15.0,
    ) -> None:
        parts = urlsplit(base_url)
        # A URL it cannot use fails each request (as aiohttp's InvalidURL did), not the policy's load.
        self._invalid = parts.scheme not in ("http", "https") or not parts.hostname
        self.base_url = base_url
        self.host = parts.hostname or ""
        self.tls = parts.scheme == "https"
        try:
            port = parts.port
        except ValueError:  # a port that is not a number
            port, self._invalid = None, True
        self.port = port or (443 if self.tls else 80)
        # Encoded once, as aiohttp would send it (a space or a non-ASCII letter percent-encoded).
        self.prefix = quote(parts.path.rstrip("/"), safe="/%:@!$&'()*+,;=-._~")
        # A base URL's query (Azure's `?api-version=`) goes with every request, after the path.
        self.query = b"?" + quote(parts.query, safe="/%:@!$&'()*+,;=-._~?").encode("ascii") if parts.query else b""
        host = f"[{self.host}]" if ":" in self.host else self.host
        authority = host if port is None else f"{host}:{self.port}"
        self._fixed = b"Host: %b\r\nUser-Agent: %b\r\nAccept-Encoding: gzip, deflate\r\n%b" % (
            authority.encode("idna"),
            _USER_AGENT,
            _header_lines(headers),
        )
        self.limit = max(1, limit)
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.keepalive_s = keepalive_s
        self._idle: list[_Connection] = []
        self._conns: set[_Connection] = set()  # every connection counted in _open (closed by close())
        self._open = 0
        self._waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self._ssl: ssl.SSLContext | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    async def post(self, path: str, body: bytes, headers: Mapping[str, str]) -> Response:
        """POST `body` to the base URL's path + `path` with the pool's headers and `headers`; returns
        once the answer's head arrived (its body arrives in `content`)."""
        if self.closed:
            raise ServerDisconnectedError("the upstream client is closed")
        if self._invalid:
            raise InvalidURL(self.base_url)
        request = b"POST %b%b HTTP/1.1\r\n%b%bContent-Length: %d\r\n\r\n%b" % (
            (self.prefix + path).encode("ascii"),
            self.query,
            self._fixed,
            _header_lines(headers),
            len(body),
            body,
        )
        conn = self._idle_one() if self._idle else None
        if conn is None:
            conn = await self._acquire()
        try:
            return await conn.send(request)
        except BaseException:
            conn.drop()
            raise

    async def close(self) -> None:
        self.closed = True
        self._idle = []
        # In use or idle: every transport is closed (an answer still being read fails as cut short).
        for conn in list(self._conns):
            conn.drop()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    # -- the pool ----------------------------------------------------------------------------------

    def _idle_one(self) -> _Connection | None:
        """A kept-alive connection still fit for use (the most recently used), or None."""
        idle = self._idle
        oldest = time.monotonic() - self.keepalive_s
        while idle:
            conn = idle.pop()
            if conn.connected and conn.idle_since >= oldest:
                return conn
            conn.drop()
        return None

    async def _acquire(self) -> _Connection:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if self._idle:
            conn = self._idle_one()
            if conn is not None:
                return conn
        while self._open >= self.limit:
            waiter: asyncio.Future[_Connection | None] = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                handed = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    if (conn_ := waiter.result()) is not None:
                        self.put_back(conn_)  # handed over as we were cancelled: not lost
                    else:
                        self._wake()  # told a slot is free as we were cancelled: the next waiter takes it
                raise
            if handed is not None:
                if handed.connected:
                    return handed
                continue  # lost between the hand-over and now (its slot went to the next waiter)
            if self.closed:
                raise ServerDisconnectedError("the upstream client is closed")
        self._open += 1
        conn = _Connection(self)
        self._conns.add(conn)
        try:
            await self._connect(conn)
        except BaseException:
            # Once only, whether or not the transport was made (and lost) before the failure.
            self.forget(conn)
            raise
        return conn

    async def _connect(self, conn: _Connection) -> None:
        if self.tls and self._ssl is None:
            self._ssl = ssl.create_default_context()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                await self.loop.create_connection(
                    lambda: conn, self.host, self.port, ssl=self._ssl, server_hostname=self.host if self.tls else None
                )
        except OSError as exc:  # refused, unreachable, DNS, TLS handshake: nothing was sent
            raise ConnectFailed(str(exc) or type(exc).__name__) from exc

    def put_back(self, conn: _Connection) -> None:
        if self.closed or not conn.connected:
            conn.drop()
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    def forget(self, conn: _Connection) -> None:
        """`conn` is closed: it no longer counts against the limit (once), and a waiter may connect."""
        if conn.counted:
            conn.counted = False
            self._open -= 1
            self._conns.discard(conn)
            if conn in self._idle:
                self._idle.remove(conn)
            self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # go and open a connection
                return


# Header names already found to be tokens (a request's are the same few every time), as bytes.
_NAMES: dict[str, bytes] = {}
_MAX_NAMES: Final = 256


def _header_lines(headers: Mapping[str, str]) -> bytes:
    out = []
    for name, value in headers.items():
        # A name is an RFC 9110 token; a value is latin-1 text without controls but tab (CR, LF and NUL
        # would break or smuggle the request's framing). Printable ASCII (a request id) needs no regex.
        raw = _NAMES.get(name)
        if raw is None:
            if not _TOKEN.fullmatch(name):
                raise ValueError(f"invalid character in the upstream request header {name!r}")
            raw = name.encode("latin-1")
            if len(_NAMES) < _MAX_NAMES:
                _NAMES[name] = raw
        if not (value.isascii() and value.isprintable()) and not _FIELD_VALUE.fullmatch(value):
            raise ValueError(f"invalid character in the upstream request header {name!r}")
        out.append(b"%b: %b\r\n" % (raw, value.encode("latin-1")))
    return out[0] if len(out) == 1 else b"".join(out)
