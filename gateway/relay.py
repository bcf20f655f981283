"""The relay: one streamed answer with every tap, composed by the pipeline (gateway.pipeline).

The upstream stage answers a stream with an event source (gateway.stages.respond.UpstreamEvents); the
pipeline wraps it in a `Relay` with the taps its stages contributed. The edge pulls batches of events
with `next` and frames them for the client; a tap's `on_event` sees each event (only taps that define
one: the others cost nothing per event).

The stream ends exactly once, whichever way it ends: by itself (completed, upstream failed, timed out:
`next` returns []), or by the edge's `close(client_gone)` in its `finally` (the client left, a send
failed, the handler was cancelled; also before the first event was ever pulled, when no generator
`finally` would have run). Ending = the source tells how it ended (`stop`: drains what was received
but not relayed, builds the `End`), every tap's `on_end` runs, in order, then the upstream connection
is released. The first two are plain functions: nothing can interrupt them halfway, and they cost no
task. The release is awaited (in a task of its own, through `asyncio.shield`) only when the adapter's
close has to wait. After an end of its own, `next` also waits until the request's concurrency slots
are given back (`ctx.settling`), so the client's last byte comes after it and its next request finds
them free.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from gateway.context import RequestContext
from gateway.contracts import End, Outcome, Tap
from gateway.reply import EventStream, close_stream

log = logging.getLogger("strait.relay")


class EndTap:
    """Base of taps that only need the end: the relay never calls their `on_start` or `on_event`."""

    def on_start(self, ctx: RequestContext) -> None:
        return None

    def on_event(self, ctx: RequestContext, event: bytes) -> None:
        return None

    def on_end(self, ctx: RequestContext, end: End) -> None:
        raise NotImplementedError


def overrides(tap: Tap, method: str) -> bool:
    """Whether `tap` does something in `method` (not EndTap's no-op): decided once per policy."""
    return getattr(type(tap), method, None) is not getattr(EndTap, method)


def end_taps(ctx: RequestContext, taps: Sequence[Tap], end: End) -> None:
    """Every tap's `on_end`, in order; one that fails is logged and does not stop the others."""
    for tap in taps:
        try:
            tap.on_end(ctx, end)
        except Exception:
            log.exception("request %s: tap %s failed at the end of the answer", ctx.request_id, type(tap).__name__)


async def settled(ctx: RequestContext) -> None:
    """Wait until the request's concurrency slots are given back (before the answer's last byte)."""
    if ctx.settling is not None:
        await asyncio.shield(ctx.settling)


class Relay:
    """An `EventStream` around the upstream stage's: the same events, with the taps."""

    __slots__ = ("_ctx", "_end", "_event_taps", "_released", "_releasing", "_source", "_taps")

    def __init__(
        self,
        ctx: RequestContext,
        source: EventStream,
        taps: Sequence[Tap],
        start_taps: Sequence[Tap] = (),
        event_taps: Sequence[Tap] = (),
    ) -> None:
        self._ctx = ctx
        self._source = source
        self._taps = taps
        self._event_taps = event_taps
        self._end: End | None = None
        self._released = False
        self._releasing: asyncio.Future[None] | None = None
        for tap in start_taps:
            tap.on_start(ctx)

    async def next(self) -> list[bytes]:
        if self._end is not None:
            return []
        batch = await self._source.next()
        if batch:
            if self._event_taps:
                ctx = self._ctx
                for tap in self._event_taps:
                    for event in batch:
                        tap.on_event(ctx, event)
            return batch
        await close_stream(self)
        await settled(self._ctx)
        return []

    @property
    def finished(self) -> bool:
        return self._end is not None or self._source.finished

    def stop(self, outcome: Outcome | None = None) -> End:
        """The source's End, then every tap's on_end: once, in one go (nothing here awaits, so no
        cancellation can land halfway)."""
        end = self._end
        if end is None:
            try:
                end = self._source.stop(outcome)
            except Exception:
                # A bug in the source must not skip accounting: the request is recorded as failed.
                log.exception("request %s: ending the upstream stream failed", self._ctx.request_id)
                end = End(outcome or "upstream_failed", 502, partial=True, stream=True)
            self._end = end
            end_taps(self._ctx, self._taps, end)
        return end

    def release(self) -> asyncio.Future[None] | None:
        if not self._released:
            self._released = True
            try:
                releasing = self._source.release()
            except Exception:
                log.exception("request %s: releasing the upstream failed", self._ctx.request_id)
                return None
            if releasing is not None:
                # A task of its own: it finishes even if whoever awaits it is cancelled.
                self._releasing = asyncio.ensure_future(releasing)
        return self._releasing
