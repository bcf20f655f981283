"""Turns an upstream's answer into the pipeline's Reply: a whole JSON body with how it ended (`End`), or
the upstream's stream as an event source (`UpstreamEvents`) the pipeline wraps with the taps.

A stream is read batch by batch (the events one upstream read completed go to the client in one write),
never buffered: every event is checked (one small msgspec decode: valid JSON, an error, a usage block),
the usage chunk Strait always asks for is dropped when the client did not ask for it, and a mid-stream
upstream failure ends the stream with an error (redacted) that the edge sends instead of `[DONE]`, so
the SDK raises instead of returning a silently truncated answer. A stream silent for longer than the
route's `timeouts.stall_s` ends the same way, as timed out (one timer per stream, woken at most once
per `stall_s`, which cancels the waiting read: no timeout block per read). With the route's
`resume: continue`, a broken stream is first offered to the dispatcher for a mid-stream rescue
(gateway.upstream.rescue): its continuation goes on in the same stream, and the End describes the
continuing attempt (the broken one is recorded in `ctx.continued`). Stopping (always, exactly once, through
the relay) charges what the upstream had already sent (drain) and tells how it ended; then the upstream
connection is released. Framing the events for the client is the edge's job (gateway.api.openai.sse_encode).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec

from gateway.accounting.counts import TokenCounts, counts_of, usage_of
from gateway.accounting.meter import StreamMeter
from gateway.context import ContinuedAttempt, RequestContext
from gateway.contracts import End, Outcome, UpstreamResponse, UpstreamStreamBroken
from gateway.errors import ErrorBody
from gateway.policy.model import TryTimeouts
from gateway.reply import Reply, id_headers
from gateway.telemetry import Metrics
from gateway.tokens import FALLBACK_ENCODING
from gateway.upstream.normalize import upstream_error
from gateway.upstream.rescue import Stitch, add_usage, compacted, what_was_sent
from gateway.upstream.sse import DONE
from gateway.upstream.wire import UpstreamErrorBody, Usage, UsageProbe

log = logging.getLogger("strait.relay")

_probe_usage = msgspec.json.Decoder(UsageProbe).decode
# For a stream without a policy route (tests driving the relay alone): the documented defaults.
DEFAULT_TIMEOUTS = TryTimeouts()


def response_headers(ctx: RequestContext) -> dict[str, str]:
    headers = {**id_headers(ctx.request_id, ctx.client_request_id), **ctx.extra_headers}
    if ctx.route is not None:
        headers["x-strait-route"] = ctx.route.name
    if ctx.decision_id:
        headers["x-strait-decision"] = ctx.decision_id
    return headers


def header_blocks(ctx: RequestContext) -> list[tuple[bytes, bytes]]:
    """Headers encoded once per policy: `x-strait-deployment` (`Target.header`, gateway.policy.compile)."""
    return [ctx.target.header] if ctx.target is not None else []


# Mid-stream rescue: the dispatcher's `resume` (the context, the text the client has, the tokens spent).
Rescue = Callable[[RequestContext, str, int], Awaitable[UpstreamResponse | None]]


def respond(ctx: RequestContext, upstream: UpstreamResponse, metrics: Metrics, rescue: Rescue | None = None) -> Reply:
    route = ctx.route_name
    headers = response_headers(ctx)
    if not 200 <= upstream.status < 300:
        error = upstream_error(upstream.status, upstream.body, upstream.headers, ctx.redact)
        metrics.child(metrics.requests, route, str(error.status)).inc()
        # A 3xx is recorded as the 502 the client got: nothing was produced, nothing is charged.
        status = upstream.status if upstream.status >= 400 else error.status
        return Reply(
            status=error.status,
            headers={**headers, **error.headers},
            body=error.body(),
            end=End("upstream_failed", status),
            extra=header_blocks(ctx),
        )
    elapsed = time.perf_counter() - ctx.started
    metrics.child(metrics.latency, route).observe(elapsed)
    if ctx.target is not None:
        metrics.child(metrics.deployment_latency, route, ctx.target.label).observe(elapsed)
    # The upstream's own answer for the edge, unless a rescue may stitch another attempt into the stream
    # (what the client sees is then the translation, one consistent stream).
    native = upstream.native
    ctx.native = native if native is not None and native.protocol == ctx.protocol and rescue is None else None
    if not upstream.streaming:
        metrics.child(metrics.requests, route, str(upstream.status)).inc()
        usage: Usage | None = None
        try:
            usage = _probe_usage(upstream.body).usage
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.warning("upstream %s returned a body without readable usage", ctx.target.label if ctx.target else "?")
        produced = (upstream.body,) if usage is None and ctx.operation != "embeddings" else ()
        end = End("completed", upstream.status, usage=usage, produced=produced)
        return Reply(status=upstream.status, headers=headers, body=upstream.body, end=end, extra=header_blocks(ctx))
    metrics.child(metrics.requests, route, "200").inc()
    headers["cache-control"] = "no-cache"
    headers["x-accel-buffering"] = "no"
    return Reply(
        status=200,
        headers=headers,
        stream=UpstreamEvents(ctx, upstream, metrics, rescue),
        media_type="text/event-stream",
        extra=header_blocks(ctx),
    )


class _Choice(msgspec.Struct, gc=False):
    """A choice of an event: only whether (and which) finished."""

    index: int = 0
    finish_reason: str | None = None


class _EventProbe(msgspec.Struct, gc=False):
    """What the relay reads of every event, in one decode that also checks it is JSON."""

    choices: list[_Choice] | None = None
    usage: Usage | None = None
    error: UpstreamErrorBody | str | None = None


_probe_event = msgspec.json.Decoder(_EventProbe).decode
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError)
_BROKEN = ErrorBody(message="The upstream stream failed.", type="server_error", code="upstream_stream_broken")
_STALLED = ErrorBody(
    message="The upstream stopped sending before the answer was complete.", type="server_error", code="upstream_timeout"
)
# Mid-stream rescue: past this many bytes of relayed events, what the relay keeps of them is compacted to
# their text (gateway.upstream.rescue.compacted), then again each time what it keeps doubles.
RELAYED_COMPACT_BYTES = 64 * 1024
# A prefix longer than this is not kept at all (the stream is then not continued): no context holds it.
MAX_PREFIX_BYTES = 4 * 1024 * 1024
# Malformed events a stream may skip before it is called broken.
MAX_MALFORMED_EVENTS = 8
_BAD_EVENT = ErrorBody(
    message="The upstream kept sending invalid stream events.", type="server_error", code="upstream_bad_event"
)


def _one_at_a_time(events: AsyncIterator[bytes]) -> Callable[[], Awaitable[list[bytes]]]:
    """A batch source over an adapter that yields single events."""

    async def pull() -> list[bytes]:
        return [await events.__anext__()]

    return pull


def _head_then(
    head: list[bytes], rest: Callable[[], Awaitable[list[bytes]]], events: UpstreamEvents
) -> Callable[[], Awaitable[list[bytes]]]:
    """A pull that returns `head` once, then hands the stream's own pull back (no cost after that)."""

    async def pull() -> list[bytes]:
        events._pull = rest
        return head

    return pull


class UpstreamEvents:
    """The upstream's stream as the relay pulls it (a gateway.reply.EventStream)."""

    __slots__ = (
        "_broken",
        "_choices",
        "_clock",
        "_compact_at",
        "_ctx",
        "_done_choices",
        "_earlier",
        "_error",
        "_finished",
        "_loop",
        "_malformed",
        "_meter",
        "_metrics",
        "_outcome",
        "_pull",
        "_relayed",
        "_relayed_bytes",
        "_rescue",
        "_stall_s",
        "_stalled",
        "_status",
        "_stitch",
        "_strip",
        "_task",
        "_timer",
        "_ttft",
        "_upstream",
        "_usage",
        "_waiting",
    )

    def __init__(
        self,
        ctx: RequestContext,
        upstream: UpstreamResponse,
        metrics: Metrics | None = None,
        rescue: Rescue | None = None,
    ) -> None:
        self._ctx = ctx
        self._metrics = metrics
        self._upstream = upstream
        self._pull = self._puller(upstream)
        # Mid-stream rescue (`resume: continue`): the events relayed so far (what the client has, decoded
        # only if the stream breaks), the failure waiting for a rescue, the continuation's rewriting and
        # the billed usage of the attempts it continued.
        self._rescue = rescue
        self._relayed: list[bytes] | None = [] if rescue is not None else None
        # Bounded: compacted to the text past `_compact_at` bytes (an answer's events are ~10x its text).
        self._relayed_bytes = 0
        self._compact_at = RELAYED_COMPACT_BYTES
        self._broken: tuple[Outcome, int, ErrorBody] | None = None
        self._stitch: Stitch | None = None
        self._earlier: Usage | None = None
        # The usage chunk Strait always asks for is the client's only if it asked for it too.
        self._strip = not ctx.include_usage
        self._usage: Usage | None = None
        # What the upstream produced, held or counted as it goes (O(1)); used only if no usage arrives.
        self._meter = StreamMeter(ctx.target.model.tokenizer if ctx.target is not None else FALLBACK_ENCODING)
        self._ttft: float | None = None
        # Set when the stream ended by itself (completed, failed, timed out): `next` returns [] from then.
        self._outcome: Outcome | None = None
        self._status = 200
        self._error: ErrorBody | None = None
        self._malformed = 0
        # Choices that sent their finish_reason, and how many the answer has (`n`).
        self._done_choices: set[int] = set()
        self._finished = 0
        request = ctx.request
        self._choices = max(1, request.n or 1) if request is not None else 1
        # Stall detection: one timer per stream, armed at the first `next`, woken at most once per
        # `stall_s`; it checks how long the current read has been waiting (`_waiting`, the loop time
        # the read began, 0 between reads) and re-arms itself, or cancels the read. Per read: two stores.
        route = ctx.route
        self._stall_s = (route.timeouts if route is not None else DEFAULT_TIMEOUTS).stall_s
        self._timer: asyncio.TimerHandle | None = None
        self._waiting = 0.0
        self._stalled = False
        self._task: asyncio.Task[object] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # The loop's clock while the timer is armed (None before, and after it ended a read).
        self._clock: Callable[[], float] | None = None

    def _puller(self, upstream: UpstreamResponse) -> Callable[[], Awaitable[list[bytes]]]:
        if upstream.batches is not None:
            pull: Callable[[], Awaitable[list[bytes]]] = upstream.batches.__anext__
        else:
            assert upstream.events is not None
            pull = _one_at_a_time(upstream.events)
        if upstream.head:
            # What the dispatcher held until the commit point goes first, in one batch.
            pull = _head_then(upstream.head, pull, self)
        return pull

    def _arm(self) -> Callable[[], float]:
        loop = self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        assert self._stall_s is not None
        self._timer = loop.call_at(loop.time() + self._stall_s, self._check_stall)
        clock = self._clock = loop.time
        return clock

    def _check_stall(self) -> None:
        """The timer: cancel the read if it has waited `stall_s`, else wake again when it would have."""
        self._timer = None
        loop, task, stall = self._loop, self._task, self._stall_s
        if self._outcome is not None or loop is None or task is None or stall is None:
            return
        now = loop.time()
        since = self._waiting
        if since and now - since >= stall:
            self._stalled = True
            self._clock = None  # re-armed if the stream goes on (a rescue)
            task.cancel()
            return
        self._timer = loop.call_at((since or now) + stall, self._check_stall)

    async def next(self) -> list[bytes]:
        while self._outcome is None:
            if self._broken is not None:
                await self._resume()
                continue
            if self._stall_s is not None:
                self._waiting = (self._clock or self._arm())()
            try:
                batch = await self._pull()
            except asyncio.CancelledError:
                task = self._task
                if not self._stalled or task is None or task.uncancel() > 0:
                    raise  # the client left (or the request was cancelled): not ours to handle
                self._waiting = 0.0
                self._stalled = False
                if self._finished >= self._choices:
                    # Every choice had finished; only the end was missing: complete, as without [DONE].
                    self._outcome = "completed"
                    return []
                log.warning("request %s: the upstream stream stalled past stall_s", self._ctx.request_id)
                self._fail("timed_out", 504, _STALLED)
                continue
            except StopAsyncIteration:
                self._outcome = "completed"
                return []
            except UpstreamStreamBroken as exc:
                if exc.clean_end and self._finished >= self._choices:
                    # Every choice had finished and the connection ended cleanly: only `[DONE]` was
                    # missing (some engines omit it). Complete: the edge sends `[DONE]` itself.
                    log.info("request %s: %s after every choice finished: complete", self._ctx.request_id, exc)
                    self._outcome = "completed"
                    return []
                log.warning("request %s: %s", self._ctx.request_id, exc)
                error = ErrorBody(message=exc.client_message, type="server_error", code=exc.code)
                if exc.timeout:
                    self._fail("timed_out", 504, error)
                else:
                    self._fail("upstream_failed", 502, error)
                continue
            except Exception:
                # An adapter bug: the client is told the stream failed (not left with a truncated one).
                log.exception("request %s: the upstream stream failed", self._ctx.request_id)
                self._fail("upstream_failed", 502, _BROKEN)
                continue
            self._waiting = 0.0
            if batch[-1] == DONE:
                # The upstream's end came with this read: the stream completed (the relay sends this
                # batch together with the end).
                self._outcome = "completed"
                batch.pop()
                if not batch:
                    return []
            if self._ttft is None:
                self._ttft = time.perf_counter() - self._ctx.started
            # Received is charged (when no usage arrives), relayed or not.
            self._meter.add(batch)
            out = self._inspect(batch)
            if out:
                if self._stitch is not None:
                    out = self._stitch.events(out)
                if self._relayed is not None:
                    self._relayed += out
                    self._relayed_bytes += sum(map(len, out))
                    if self._relayed_bytes > self._compact_at:
                        self._compact()
                if out:
                    return out
        return []

    def _compact(self) -> None:
        """Keep only what a rescue reads of the relayed events (their text and ids), or nothing when the
        stream can never be continued or its text outgrew MAX_PREFIX_BYTES."""
        kept = compacted(self._relayed or ())
        size = sum(map(len, kept)) if kept is not None else 0
        if kept is None or size > MAX_PREFIX_BYTES:
            self._relayed = None
            return
        self._relayed = kept
        self._relayed_bytes = size
        self._compact_at = max(RELAYED_COMPACT_BYTES, 2 * size)

    async def _resume(self) -> None:
        """The committed stream broke and the route continues broken streams: ask the dispatcher for a
        continuation of what the client already has, and go on with it; else end with the original
        failure (never the fallback's own error)."""
        broken = self._broken
        assert broken is not None
        self._broken = None
        # No read is waiting: the timer must not take the wait for a continuation for a stall.
        self._waiting = 0.0
        ctx = self._ctx
        rescue = self._rescue
        failed_target = ctx.target
        sent = (
            what_was_sent(self._relayed or ())
            if rescue is not None and failed_target is not None and self._choices == 1 and ctx.operation == "chat"
            else None
        )
        if sent is None or rescue is None or failed_target is None:
            self._end_broken(broken)
            return
        # What the broken upstream sent but was not relayed is charged too; then it is let go.
        old = self._upstream
        drain, old.drain = old.drain, None
        if drain is not None:
            self._drain(drain())
        close, old.close = old.close, None
        if close is not None:
            closing = close()
            if closing is not None:
                await asyncio.shield(closing)
        usage = self._usage
        produced, thinking = self._meter.counts() if usage is None else (usage.completion_tokens, 0)
        # The continuation may spend what is left of the client's max_tokens after every attempt so far
        # (a second rescue continues the first one's text too).
        spent = produced + (self._earlier.completion_tokens if self._earlier is not None else 0)
        try:
            response = await rescue(ctx, sent.text, spent)
        except Exception:
            # A bug on the rescue's path: the stream ends with its original failure all the same (the
            # dispatcher gave back what it started), never cut without an error.
            log.exception("request %s: the rescue of a broken stream failed", ctx.request_id)
            response = None
        if response is None:
            log.warning("request %s: no deployment could continue the broken stream", ctx.request_id)
            self._rescue = None
            self._end_broken(broken)
            return
        log.info("request %s: broken stream continued on %s", ctx.request_id, ctx.target.label if ctx.target else "?")
        # Every kind of token the broken attempt reported (cache reads and writes, reasoning) is billed
        # and shown in the stitched usage; without usage, the prompt and what it relayed are counted.
        tokens = (
            counts_of(usage)
            if usage is not None
            else TokenCounts(prompt=ctx.prompt_tokens.count_now(), completion=produced, reasoning=thinking)
        )
        ctx.continued.append(
            ContinuedAttempt(
                target=failed_target,
                status=broken[1],
                seconds=time.perf_counter() - ctx.started,
                tokens=tokens,
                estimated=usage is None,
            )
        )
        self._earlier = add_usage(self._earlier, usage_of(tokens))
        self._stitch = Stitch(sent.identity, self._earlier)
        # The continuation is an attempt of its own: its usage, its meter, its upstream.
        self._upstream = response
        self._pull = self._puller(response)
        self._usage = None
        self._malformed = 0  # its own tolerance for malformed events, not what the broken one left
        target = ctx.target
        self._meter = StreamMeter(target.model.tokenizer if target is not None else FALLBACK_ENCODING)

    def _end_broken(self, broken: tuple[Outcome, int, ErrorBody]) -> None:
        self._outcome, self._status, self._error = broken

    @property
    def finished(self) -> bool:
        """The stream ended by itself with the last batch: the next `next` returns [] without waiting."""
        return self._outcome is not None

    def _inspect(self, batch: list[bytes]) -> list[bytes]:
        """The batch's events for the client: all of them, unless one is the usage chunk the client did
        not ask for or a malformed event (dropped), or an error (the stream ends there)."""
        out = batch
        for i, payload in enumerate(batch):
            try:
                probe = _probe_event(payload)
            except _DECODE_ERRORS:
                # A malformed event (not JSON, not UTF-8) is skipped, counted and logged: the answer goes on.
                # Only a stream that keeps sending them cannot continue: it ends with an error.
                self._malformed += 1
                self._on_malformed()
                if self._malformed > MAX_MALFORMED_EVENTS:
                    self._fail("upstream_failed", 502, _BAD_EVENT)
                    return out if out is not batch else batch[:i]
                if out is batch:
                    out = batch[:i]
                continue
            if probe.error is not None:
                self._fail("upstream_failed", 502, self._redacted(probe.error))
                return out if out is not batch else batch[:i]
            choices = probe.choices
            if choices:
                for choice in choices:
                    if choice.finish_reason is not None and choice.index not in self._done_choices:
                        self._done_choices.add(choice.index)
                        self._finished += 1
            if probe.usage is not None:
                self._usage = probe.usage
                if self._strip and probe.choices is not None and not probe.choices:
                    if out is batch:
                        out = batch[:i]
                    continue
            if out is not batch:
                out.append(payload)
        return out

    def _on_malformed(self) -> None:
        target = self._ctx.target
        backend = target.backend.name if target is not None else "?"
        log.warning("request %s: upstream %s sent a malformed stream event (skipped)", self._ctx.request_id, backend)
        metrics = self._metrics
        if metrics is not None:
            metrics.child(metrics.malformed_events, backend).inc()

    def _redacted(self, error: UpstreamErrorBody | str) -> ErrorBody:
        """The upstream's error, redacted like any upstream error text: no secret, host, address or path
        reaches the client."""
        err = error if isinstance(error, UpstreamErrorBody) else UpstreamErrorBody(message=error)
        redact = self._ctx.redact
        message, type_ = redact(err.message or ""), redact(err.type or "")
        code = redact.optional(err.code if isinstance(err.code, str) else None)
        return ErrorBody(message=message or "The upstream failed mid-stream.", type=type_ or "server_error", code=code)

    def _fail(self, outcome: Outcome, status: int, error: ErrorBody) -> None:
        if self._rescue is not None:
            # `resume: continue`: `next` tries a rescue before the stream ends with this failure.
            self._broken = (outcome, status, error)
            self._outcome = None
            return
        self._outcome = outcome
        self._status = status
        self._error = error

    def stop(self, outcome: Outcome | None = None) -> End:
        """Stop reading (the relay calls this once): charge what was received but not relayed, and tell
        how it ended. `outcome` (client_gone) applies unless it had ended by itself."""
        own = self._outcome
        if own is None:
            own = self._outcome = outcome or "client_gone"
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        drain = self._upstream.drain
        if own != "completed" and drain is not None:
            # Left early or failed: what the upstream already sent is charged too, not only what was
            # relayed (a usage chunk among it wins, as it would have).
            self._drain(drain())
        usage = self._usage
        meter = self._meter
        completion, reasoning = meter.counts() if usage is None else (None, 0)
        last = meter.last
        if self._stitch is not None and last is not None:
            # The model of a usage chunk Strait adds: with the ids the client saw.
            last = next(iter(self._stitch.events([last])), last)
        return End(
            own,
            self._status,
            usage=usage,
            completion_tokens=completion,
            reasoning_tokens=reasoning,
            ttft_s=self._ttft,
            partial=own != "completed",
            stream=True,
            error=self._error,
            last_event=last,
            earlier=self._earlier,
        )

    def release(self) -> Awaitable[None] | None:
        """Close the upstream (after `stop`), so the engine stops generating for nobody."""
        close, self._upstream.close = self._upstream.close, None
        return close() if close is not None else None

    def _drain(self, events: list[bytes]) -> None:
        if not events:
            return
        self._meter.add(events)
        for payload in events:
            try:
                probe = _probe_event(payload)
            except _DECODE_ERRORS:
                continue
            if probe.usage is not None:
                self._usage = probe.usage
