"""Sending an answer straight over ASGI: the three model endpoints skip Litestar's per-request
signature parsing and response machinery (measured: about a fifth of the gateway's CPU per request).

A `Reply` is either a whole JSON body or a stream of events (the pipeline's relay). A stream's events
are framed by the OpenAI codec (gateway.api.openai.sse_encode), or by the `StreamCodec` of another
protocol's endpoint (Anthropic Messages: gateway.api.anthropic.sse_encode), each batch the upstream delivered in
one read as one ASGI message; the last bytes (`[DONE]` or an error event) go in the message that ends
the body, with the last batch when the upstream's end came in the same read. A task
watches for the client's disconnect and cancels the sending when it comes; the stream is then closed
in a `finally` that runs whatever happened, even if not one event was pulled yet (the client left, a
send failed, the handler was cancelled): the relay ends the request through its taps exactly once
(upstream closed, accounting, live signals), promptly, not at garbage collection. When a shutdown's
grace period runs out (gateway.inflight cancels the request, marked), the stream is stopped the same way
and ends with the `shutting_down` error event instead of just stopping.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol

from gateway.api.openai.sse_encode import encode_batch, encode_end, error_event
from gateway.context import RequestContext
from gateway.contracts import End
from gateway.errors import ClientClosedRequest, ErrorBody, PayloadTooLarge, RequestTimeout
from gateway.reply import EventStream, Reply, close_stream

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
WasCut = Callable[["asyncio.Task[Any]"], bool]
# The last event of a stream the shutdown's grace period cut short (OpenAI's envelope: the SDKs raise).
SHUTDOWN_EVENT = error_event(
    ErrorBody(
        message="The gateway shut down before the answer was complete (its grace period ran out); retry.",
        type="server_error",
        code="shutting_down",
    )
)
__all__ = ["BodyChunks", "Message", "Receive", "Reply", "Scope", "Send", "StreamCodec", "body_chunks", "send_reply"]


class StreamCodec(Protocol):
    """Frames a stream for a client of another protocol than OpenAI's (one per request: it may hold
    state). Without one, the OpenAI codec's functions frame it."""

    def batch(self, payloads: list[bytes]) -> bytes: ...

    def end(self, ctx: RequestContext, end: End) -> bytes: ...

    def cut(self, ctx: RequestContext) -> bytes:
        """The last bytes of a stream the shutdown's grace period cut short."""
        ...

    async def settle(self, ctx: RequestContext) -> None:
        """What must be done before the stream's last byte, after `end` (the Responses codec stores the
        response there, so that the client's next request finds it)."""
        ...


def _raw_headers(reply: Reply) -> list[tuple[bytes, bytes]]:
    raw = [(b"content-type", reply.media_type.encode("latin-1"))]
    if reply.stream is None:
        raw.append((b"content-length", str(len(reply.body)).encode("latin-1")))
    raw += [(k.encode("latin-1"), v.encode("latin-1", "replace")) for k, v in reply.headers.items()]
    raw += reply.extra  # already encoded (once per policy)
    return raw


async def send_reply(
    reply: Reply,
    receive: Receive,
    send: Send,
    ctx: RequestContext,
    was_cut: WasCut | None = None,
    codec: StreamCodec | None = None,
) -> None:
    """`was_cut`: tells whether a cancellation of the sending task is the shutdown's (its grace period
    ran out, gateway.inflight): a stream then ends with an in-band error event instead of a cut.
    `codec`: frames a stream for a non-OpenAI client (None: the OpenAI codec)."""
    stream = reply.stream
    if stream is None:
        await send({"type": "http.response.start", "status": reply.status, "headers": _raw_headers(reply)})
        await send({"type": "http.response.body", "body": reply.body})
        return
    try:
        await _send_stream(reply, stream, ctx, receive, send, was_cut, codec)
    finally:
        # Whatever happened above (even before the first event): the stream ends here if it did not by
        # itself (idempotent; the upstream's release shielded).
        await close_stream(stream, "client_gone")


class _Watch:
    """The disconnect watcher's state: whether the client left, and whether it still matters."""

    __slots__ = ("gone", "over")

    def __init__(self) -> None:
        self.gone = False
        self.over = False


async def _watch_disconnect(receive: Receive, sender: asyncio.Task[Any], watch: _Watch) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if not watch.over:
                watch.gone = True
                sender.cancel()
            return


async def _send_stream(
    reply: Reply,
    stream: EventStream,
    ctx: RequestContext,
    receive: Receive,
    send: Send,
    was_cut: WasCut | None,
    codec: StreamCodec | None,
) -> None:
    frame, finish = (encode_batch, encode_end) if codec is None else (codec.batch, codec.end)
    sender = asyncio.current_task()
    assert sender is not None
    start = {"type": "http.response.start", "status": reply.status, "headers": _raw_headers(reply)}
    try:
        await send(start)
    except asyncio.CancelledError:
        if was_cut is None or not was_cut(sender):
            raise
        # The grace period ran out while the server held the head back (uvicorn: a paused transport, before
        # it writes anything): the head goes out with the shutdown's error event, as for a cut mid-stream.
        sender.uncancel()
        with contextlib.suppress(OSError):
            await send(start)
            tail = _cut_tail(ctx, stream, b"", finish, codec)
            await send({"type": "http.response.body", "body": tail, "more_body": False})
        return
    watch = _Watch()
    watcher = sender.get_loop().create_task(_watch_disconnect(receive, sender, watch))
    last = b""
    try:
        while batch := await stream.next():
            if stream.finished:
                last = frame(batch)  # the upstream's end came with it: sent with the end, one write
            else:
                await send({"type": "http.response.body", "body": frame(batch), "more_body": True})
        end = stream.stop()
        watch.over = True  # the answer is complete from here: a disconnect now changes nothing
        tail = finish(ctx, end)
        if codec is not None:
            await codec.settle(ctx)
        await send({"type": "http.response.body", "body": last + tail, "more_body": False})
    except asyncio.CancelledError:
        if not watch.gone and was_cut is not None and was_cut(sender):
            # The shutdown's grace period ran out mid-stream: the answer stops here, charged for what
            # the upstream produced (partial), and the client is told so, never left with a stream that
            # just stops.
            sender.uncancel()
            watch.over = True
            tail = _cut_tail(ctx, stream, last, finish, codec)
            with contextlib.suppress(OSError):  # the client went away meanwhile
                await send({"type": "http.response.body", "body": tail, "more_body": False})
            return
        # Our own cancel (the client left) ends the sending quietly; anyone else's goes on.
        if not watch.gone or sender.uncancel() > 0:
            raise
    except OSError:
        pass  # the client went away while we were writing
    finally:
        watch.over = True
        watcher.cancel()


def _cut_tail(
    ctx: RequestContext,
    stream: EventStream,
    last: bytes,
    finish: Callable[[RequestContext, End], bytes],
    codec: StreamCodec | None,
) -> bytes:
    """A stream the shutdown's grace period cut: stopped (charged for what the upstream produced), and
    its last bytes. One that had ended by itself (waiting only for its slots to be given back) ends as
    it would have; any other with the shutdown's error event."""
    end = stream.stop("client_gone")
    if end.outcome != "client_gone":
        return last + finish(ctx, end)
    return SHUTDOWN_EVENT if codec is None else codec.cut(ctx)


def body_chunks(
    receive: Receive, idle_timeout_s: float | None = None, total_timeout_s: float | None = None
) -> BodyChunks:
    """The request body as it arrives; a client that pauses longer than `idle_timeout_s` between chunks
    or takes longer than `total_timeout_s` for the whole body gets 408 and the connection is closed."""
    return BodyChunks(receive, idle_timeout_s, total_timeout_s)


class BodyChunks:
    """The request body's chunks (an async iterator, `aclose` included), and `read_all` for a reader that
    wants them joined (gateway.api.decode.read_body): one coroutine for the whole body, where iterating
    costs a coroutine per chunk and one for the end. Not an async generator: the event loop tracks each
    of those in a WeakSet (its first iteration and its collection), on every request's path.

    One timer handle per request (armed at the first read, moved only between chunks of a multi-chunk
    body) cancels the waiting task: half the cost of an `asyncio.timeout` block per chunk."""

    __slots__ = ("_deadline", "_done", "_expired", "_idle_s", "_loop", "_receive", "_task", "_timer", "_total_s")

    def __init__(self, receive: Receive, idle_timeout_s: float | None, total_timeout_s: float | None) -> None:
        self._receive = receive
        self._idle_s = idle_timeout_s
        self._total_s = total_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[Any] | None = None
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._expired = False
        self._done = False

    def __aiter__(self) -> BodyChunks:
        return self

    async def __anext__(self) -> bytes:
        while not self._done:
            chunk = await self._next()
            if chunk:
                return chunk
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self._finish()

    async def read_all(self, limit: int) -> bytes:
        """The whole body; PayloadTooLarge as soon as more than `limit` bytes arrived. Closed after."""
        try:
            chunk = await self._next()
            if self._done:
                if len(chunk) > limit:
                    raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
                return chunk
            parts = [chunk]
            total = len(chunk)
            while not self._done:
                chunk = await self._next()
                total += len(chunk)
                if total > limit:
                    raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
                parts.append(chunk)
            return b"".join(parts)
        finally:
            self._finish()

    def _due(self, now: float) -> float | None:
        idle = None if self._idle_s is None else now + self._idle_s
        deadline = self._deadline
        if deadline is None:
            return idle
        return deadline if idle is None else min(idle, deadline)

    def _expire(self) -> None:
        self._expired = True
        if self._task is not None:
            self._task.cancel()

    def _finish(self) -> None:
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _next(self) -> bytes:
        """The next message's bytes (maybe empty); `_done` once the body is over."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
            self._task = asyncio.current_task()
            start = loop.time()
            self._deadline = None if self._total_s is None else start + self._total_s
            first = self._due(start)
            if first is not None and self._task is not None:
                self._timer = loop.call_at(first, self._expire)
        try:
            message = await self._receive()
        except asyncio.CancelledError:
            task = self._task
            if not self._expired or task is None or task.uncancel() > 0:
                self._finish()
                raise  # cancelled by someone else too (the client left, shutdown)
            self._finish()
            total = self._deadline is not None and loop.time() >= self._deadline
            limit = f"{self._total_s:g} s for the whole body" if total else f"{self._idle_s:g} s between chunks"
            raise RequestTimeout(
                f"The request body arrived too slowly (the limit is {limit}).", headers={"connection": "close"}
            ) from None
        except BaseException:
            self._finish()
            raise
        if message["type"] == "http.disconnect":
            self._finish()
            raise ClientClosedRequest("The client closed the connection before sending the whole body.")
        chunk: bytes = message.get("body", b"")
        if message.get("more_body", False):
            if self._timer is not None:
                self._timer.cancel()
                nxt = self._due(loop.time())
                self._timer = None if nxt is None else loop.call_at(nxt, self._expire)
        else:
            self._finish()
        return chunk
