"""uvicorn's httptools protocol with the inbound limits it lacks: the size and number of request headers
and a deadline for the header block (slowloris). Passed to uvicorn as `http=LimitedHttpToolsProtocol`.

Written against uvicorn 0.54 / httptools 0.9 and relying on these of `HttpToolsProtocol`'s internals:
the parser callbacks (`on_message_begin`, `on_url`, `on_header`, `on_headers_complete`,
`on_message_complete`), `data_received`, `connection_made`/`connection_lost`, `send_400_response` (called
when the parser raises, which it does when a callback raises), `transport`, `cycle` and `loop`.
tests/unit/test_server_limits.py drives the class over a fake transport and fails if any of that changes.

- Header bytes (request line + header lines) are counted twice: exactly as the parser completes the URL
  and each header line, and coarsely as raw bytes arrive while a header block is awaited, so one endless
  unfinished header line is refused after at most one extra read, never buffered whole.
- Refusals are written here (the application never sees the request), in OpenAI's error envelope, with
  `connection: close`: 431 for too many or too large headers, 408 when the header block is not complete
  `header_timeout_s` after the connection opened or the request's first byte arrived. The body has its
  own timeouts in the ASGI layer (gateway/api/asgi_send.py `body_chunks`); here a backstop closes a
  connection whose request body is still incomplete that long after the application could have read it.
"""

from __future__ import annotations

import asyncio
import functools
import http
import logging
import time
from typing import Any

import msgspec
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.errors import ErrorBody, ErrorEnvelope
from gateway.settings import Settings

log = logging.getLogger("strait.server")


class ServerLimits(msgspec.Struct, frozen=True, kw_only=True):
    max_header_bytes: int = 32 * 1024
    max_header_count: int = 100
    header_timeout_s: float = 10.0
    # The backstop: body_idle/body_timeout_s are enforced (with a 408) by the application.
    body_timeout_s: float = 120.0


@functools.cache
def limits_from_env() -> ServerLimits:
    """Read once per worker process: `strait serve` passes its settings to workers as STRAIT_* variables."""
    s = Settings.from_env()
    return ServerLimits(
        max_header_bytes=s.max_header_bytes,
        max_header_count=s.max_header_count,
        header_timeout_s=s.header_timeout_s,
        body_timeout_s=s.body_timeout_s,
    )


class _Refused(Exception):
    """Raised from a parser callback to stop parsing; httptools re-raises it wrapped as a parser error."""


def refusal(status: int, message: str, code: str) -> bytes:
    body = msgspec.json.encode(
        ErrorEnvelope(ErrorBody(message=message, type="invalid_request_error", param=None, code=code))
    )
    head = (
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


_last_log = 0.0
_suppressed = 0


def _warn(reason: str, client: object) -> None:
    """Client-caused, so a WARNING without a traceback, at most one a second (an attack is many)."""
    global _last_log, _suppressed
    now = time.monotonic()
    if now - _last_log < 1.0:
        _suppressed += 1
        return
    extra = f" ({_suppressed} more since the last line)" if _suppressed else ""
    _last_log, _suppressed = now, 0
    log.warning("connection from %s refused: %s%s", client, reason, extra)


class _HeadHoldingTransport:
    """The response cycle's view of the connection: the first write of each response (its status line and
    headers, written by uvicorn on `http.response.start`) is held until the next write, so a whole JSON
    answer leaves in one send instead of two (uvloop writes each `write` at once), or until the end of
    the event loop's current turn (a stream's head does not wait for its first event). Everything else
    is the connection's transport."""

    __slots__ = ("_first", "_held", "_loop", "_transport")

    _COALESCE_LIMIT = 64 * 1024  # a larger body goes in its own write, not copied behind the head

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._first = False

    def next_response(self) -> None:
        self.flush()
        self._first = True

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if len(data) <= self._COALESCE_LIMIT:
                self._transport.write(held + data)
                return
            self._transport.write(held)
        elif self._first:
            self._first = False
            self._held = data
            self._loop.call_soon(self.flush)
            return
        self._transport.write(data)

    def flush(self) -> None:
        """Write the held head now (before anything the protocol itself writes)."""
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, limits: ServerLimits | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits if limits is not None else limits_from_env()
        self._awaiting_head = True  # between requests (or before the first): a header block is awaited
        self._raw_head_bytes = 0  # bytes received while awaiting it
        self._head_bytes = 0  # URL + completed header lines of the current request
        self._head_count = 0
        self._refusal: bytes | None = None
        # When the awaited header block, and the current request's unfinished body, started (loop time);
        # None when not pending. One watchdog timer per connection checks both: a timer armed and
        # cancelled per request costs ~3 us each on the hot path, an attribute write ~0.05 us.
        self._head_since: float | None = None
        self._body_since: float | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._cycle_transport: _HeadHoldingTransport | None = None

    # -- connection --

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._cycle_transport = _HeadHoldingTransport(transport, self.loop)
        self._head_since = self.loop.time()
        self._arm_watchdog(self._head_since + self.limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_watchdog()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._awaiting_head:
            self._raw_head_bytes += len(data)
        super().data_received(data)
        if (
            self._awaiting_head
            and self._raw_head_bytes > self.limits.max_header_bytes
            and not self.transport.is_closing()
        ):
            self._close_with(self._too_large(f"a header block of over {self.limits.max_header_bytes} bytes"))

    def send_400_response(self, msg: str) -> None:
        if self._cycle_transport is not None:
            self._cycle_transport.flush()
        if self._refusal is None:
            if self.cycle is None or self.cycle.response_complete:
                # A request the parser refused before any application saw it (a malformed request line or
                # header): OpenAI's envelope, not uvicorn's plain text. One refused mid-body, while the
                # application runs, keeps uvicorn's own answer.
                self._close_with(
                    refusal(400, "Invalid HTTP request: the request could not be parsed.", "invalid_http_request")
                )
                return
            super().send_400_response(msg)
            return
        self._close_with(self._refusal)

    # -- parser callbacks --

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = self._head_count = 0
        self._head_since = now = self.loop.time()
        self._arm_watchdog(now + self.limits.header_timeout_s)

    def on_url(self, url: bytes) -> None:
        self._head_bytes += len(url)
        if self._head_bytes > self.limits.max_header_bytes:
            self._stop_parsing(f"a request line of over {self.limits.max_header_bytes} bytes")
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4  # ": " and CRLF
        self._head_count += 1
        if self._head_count > self.limits.max_header_count:
            self._stop_parsing(f"more than {self.limits.max_header_count} headers")
        if self._head_bytes > self.limits.max_header_bytes:
            self._stop_parsing(f"headers of over {self.limits.max_header_bytes} bytes")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._awaiting_head = False
        self._raw_head_bytes = 0
        self._head_since = None
        super().on_headers_complete()
        if self.cycle is not None and self._cycle_transport is not None:
            self._cycle_transport.next_response()
            self.cycle.transport = self._cycle_transport  # type: ignore[assignment]
        if self.cycle is not None and self.cycle.more_body:
            # Backstop for a body nobody reads (the application answered without it, or never reads it).
            self._body_since = now = self.loop.time()
            self._arm_watchdog(now + self.limits.body_timeout_s + 1.0)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._body_since = None
        self._awaiting_head = True
        self._raw_head_bytes = 0

    # -- refusals --

    def _too_large(self, reason: str) -> bytes:
        _warn(reason, self.client)
        return refusal(
            431,
            f"Request header fields too large: {reason} (the limits are {self.limits.max_header_bytes} bytes "
            f"and {self.limits.max_header_count} headers).",
            "request_header_fields_too_large",
        )

    def _stop_parsing(self, reason: str) -> None:
        """From a parser callback: uvicorn catches the parser error and calls `send_400_response`."""
        self._refusal = self._too_large(reason)
        raise _Refused(reason)

    def _close_with(self, response: bytes) -> None:
        self._cancel_watchdog()
        if self._cycle_transport is not None:
            self._cycle_transport.flush()
        if not self.transport.is_closing():
            # Only when no earlier (pipelined) response is still being written on this connection.
            if self.cycle is None or self.cycle.response_complete:
                self.transport.write(response)
            self.transport.close()

    def _on_head_timeout(self) -> None:
        if not self._awaiting_head or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request waits behind a response still being written (a long stream): its
            # headers are not late yet, and closing now would cut that response.
            self._head_since = now = self.loop.time()
            self._arm_watchdog(now + self.limits.header_timeout_s)
            return
        timeout = self.limits.header_timeout_s
        _warn(f"header block not complete after {timeout:g} s", self.client)
        self._close_with(
            refusal(
                408,
                f"Request timeout: the request headers did not arrive within {timeout:g} s.",
                "request_timeout",
            )
        )

    def _on_body_timeout(self) -> None:
        if self._awaiting_head or self.transport.is_closing():
            return
        _warn(f"request body not complete after {self.limits.body_timeout_s:g} s", self.client)
        if self.cycle is not None and not self.cycle.response_started:
            self.transport.write(
                refusal(408, "Request timeout: the request body arrived too slowly.", "request_timeout")
            )
        self.transport.close()

    # -- the watchdog --

    def _arm_watchdog(self, due: float) -> None:
        """Make sure the watchdog fires by `due`; on firing it re-arms itself for the next pending
        deadline. With the defaults (header 10 s, body 121 s) a new deadline is never earlier than the
        armed one, so this is one comparison per request; a shorter body timeout moves the timer."""
        watchdog = self._watchdog
        if watchdog is not None:
            if watchdog.when() <= due:
                return
            watchdog.cancel()
        self._watchdog = self.loop.call_at(due, self._on_watchdog)

    def _on_watchdog(self) -> None:
        self._watchdog = None
        if self.transport.is_closing():
            return
        now = self.loop.time()
        head_due = self._head_due()
        if head_due is not None and now >= head_due:
            self._on_head_timeout()
        body_due = self._body_due()
        if body_due is not None and now >= body_due:
            self._on_body_timeout()
        if self.transport.is_closing():
            return
        pending = [d for d in (self._head_due(), self._body_due()) if d is not None]
        if pending:
            self._watchdog = self.loop.call_at(min(pending), self._on_watchdog)

    def _head_due(self) -> float | None:
        return None if self._head_since is None else self._head_since + self.limits.header_timeout_s

    def _body_due(self) -> float | None:
        return None if self._body_since is None else self._body_since + self.limits.body_timeout_s + 1.0

    def _cancel_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
