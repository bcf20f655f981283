"""Runs the request stages in order, then the terminal stage, then the stages' `on_response` in reverse.

A stage's `on_request` returns None to go on, or a Reply that short-circuits (a cache hit, a refusal
answered in band): later stages and the terminal do not run, and `on_response` runs for the stages
before it, in reverse (the stage that answered built the reply; it has nothing to observe). A
short-circuit that is an answer (a Reply with an `end`, or a stream: a cache hit) is ended through the
taps exactly like the terminal's, so it is accounted, logged and traced; a refusal (neither) is not. A stage
may also refuse by raising a GatewayError: it propagates out of `run` without any `on_response`
(app.py's exception handlers render it as an OpenAI error envelope).

Most stages only look at the request: they subclass `RequestOnly`, and the pipeline leaves them out of
the response pass entirely (no await per stage per request for a no-op).

Taps (gateway.contracts.Tap) observe the answer: the stages and the terminal contribute them in a
`taps` attribute, the pipeline adds its own (the request's span, when tracing), and composes them once
per policy. Every request that reaches the terminal is ended through them exactly once: a whole answer
or an error right here (then the answer waits for its concurrency slots to be given back), a stream
when it is over, through the one relay the pipeline wraps around it (gateway.relay). Accounting, lease
keepalive and slot release, live signals and token metrics are taps; nothing of theirs is in the edge.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Protocol

from opentelemetry.context import attach, detach
from opentelemetry.trace import Tracer as OtelTracer
from opentelemetry.trace import set_span_in_context

from gateway.context import RequestContext
from gateway.contracts import End, Tap
from gateway.errors import GatewayError
from gateway.inflight import is_shutdown_cut
from gateway.relay import Relay, end_taps, overrides, settled
from gateway.reply import Reply, close_stream
from gateway.spans import SpanTap, end_request_span, start_request_span
from gateway.tracing import Tracing


class Stage(Protocol):
    """A request stage. It may also contribute taps: a `taps` attribute (a tuple of Tap)."""

    name: str

    async def on_request(self, ctx: RequestContext) -> Reply | None: ...

    async def on_response(self, ctx: RequestContext, reply: Reply) -> Reply: ...


class Terminal(Protocol):
    """The last stage: it always answers (the upstream; a fake in tests). A whole answer carries its
    `End` (`Reply.end`); a stream is an EventStream that tells it when it is over. It may contribute
    taps like a stage."""

    name: str

    async def call(self, ctx: RequestContext) -> Reply: ...


class RequestOnly:
    """Base of stages with nothing to do on the response: the pipeline skips their `on_response`."""

    async def on_response(self, ctx: RequestContext, reply: Reply) -> Reply:
        return reply


_PASS_THROUGH: object = RequestOnly.on_response


class _TracedStage:
    """A stage inside its own child span; wrapped once at construction, when tracing is on."""

    def __init__(self, stage: Stage, tracer: OtelTracer) -> None:
        self.name = stage.name
        self._stage = stage
        self._tracer = tracer
        self._span_name = f"strait.{stage.name}"

    async def on_request(self, ctx: RequestContext) -> Reply | None:
        with self._tracer.start_as_current_span(self._span_name):
            return await self._stage.on_request(ctx)

    async def on_response(self, ctx: RequestContext, reply: Reply) -> Reply:
        return await self._stage.on_response(ctx, reply)


class _TracedTerminal:
    def __init__(self, terminal: Terminal, tracer: OtelTracer) -> None:
        self.name = terminal.name
        self._terminal = terminal
        self._tracer = tracer
        self._span_name = f"strait.{terminal.name}"

    async def call(self, ctx: RequestContext) -> Reply:
        with self._tracer.start_as_current_span(self._span_name):
            return await self._terminal.call(ctx)


class Pipeline:
    def __init__(
        self,
        stages: Sequence[Stage],
        terminal: Terminal,
        tracing: Tracing | None = None,
        on_refused: Callable[[RequestContext, int, str | None], None] | None = None,
        taps: Sequence[Tap] = (),
    ) -> None:
        self.stages: tuple[Stage, ...] = tuple(stages)
        self.terminal = terminal
        # Every tap, in the order their on_end runs: the stages', the terminal's, those given here, and
        # the request span's last (it reports what accounting charged). Which of them need a call at
        # the start or per event is known here, once per policy, not per request.
        own: list[Tap] = [t for part in (*self.stages, terminal) for t in getattr(part, "taps", ())]
        own += taps
        if tracing is not None:
            own.append(SpanTap())
        self.taps: tuple[Tap, ...] = tuple(own)
        self._start_taps = tuple(t for t in own if overrides(t, "on_start"))
        self._event_taps = tuple(t for t in own if overrides(t, "on_event"))
        # Told of every GatewayError leaving the pipeline (the request's log line when no upstream ran).
        self.on_refused = on_refused
        # Position of each stage with a real `on_response`, known once per policy, not per request.
        self._responders = tuple(
            i for i, s in enumerate(self.stages) if getattr(type(s), "on_response", None) is not _PASS_THROUGH
        )
        # None (the default): no tracing code on the request path at all. Otherwise the stages and the
        # terminal are wrapped in their spans here, once, and `run` opens the request's span around them.
        self.tracing = tracing
        if tracing is not None:
            self.stages = tuple(_TracedStage(st, tracing.tracer) for st in self.stages)
            self.terminal = _TracedTerminal(terminal, tracing.tracer)
            self.run = self._run_traced  # type: ignore[method-assign]

    async def run(self, ctx: RequestContext) -> Reply:
        reply: Reply | None = None
        ran = 0
        try:
            for stage in self.stages:
                reply = await stage.on_request(ctx)
                if reply is not None:
                    if reply.end is not None or reply.stream is not None:
                        # An answer (a cache hit), not a refusal: ended through the taps like the terminal's.
                        reply = await self._ended(ctx, reply)
                    break
                ran += 1
            if reply is None:
                reply = await self._answer(ctx)
        except GatewayError as exc:
            if self.on_refused is not None:
                self.on_refused(ctx, exc.status, exc.code)
            raise
        if self._responders:
            stages = self.stages
            try:
                for i in reversed(self._responders):
                    if i < ran:
                        reply = await stages[i].on_response(ctx, reply)
            except BaseException:
                if reply.stream is not None:
                    await close_stream(reply.stream, "client_gone")  # nobody will pull it: end it now
                raise
        return reply

    async def _answer(self, ctx: RequestContext) -> Reply:
        """The terminal's answer; the request is ended through the taps here (a whole answer, an
        error, a cancellation) or by the relay (a stream)."""
        try:
            reply = await self.terminal.call(ctx)
        except GatewayError as exc:
            end_taps(ctx, self.taps, End("timed_out" if exc.status == 504 else "upstream_failed", exc.status))
            await settled(ctx)
            raise
        except asyncio.CancelledError as exc:
            # The client left while the upstream was being asked: charged as a cut-short answer. Cut by
            # the shutdown's grace period instead: recorded with the 503 the edge sends (ShuttingDown).
            end_taps(ctx, self.taps, End("client_gone", 503 if is_shutdown_cut(exc) else 499, partial=True))
            raise
        except Exception:
            end_taps(ctx, self.taps, End("upstream_failed", 500))
            raise
        return await self._ended(ctx, reply)

    async def _ended(self, ctx: RequestContext, reply: Reply) -> Reply:
        """A whole answer is ended through the taps now; a stream by the relay wrapped around it."""
        stream = reply.stream
        if stream is None:
            ctx.answer_body = reply.body
            end_taps(ctx, self.taps, reply.end if reply.end is not None else End("completed", reply.status))
            await settled(ctx)
        else:
            reply.stream = Relay(ctx, stream, self.taps, self._start_taps, self._event_taps)
        return reply

    async def _run_traced(self, ctx: RequestContext) -> Reply:
        """`run` inside the request's SERVER span. The span ends in its tap (SpanTap: with the tokens
        charged; a stream's when it is over), or here for a request refused before the upstream."""
        assert self.tracing is not None
        span = start_request_span(self.tracing, ctx)
        token = attach(set_span_in_context(span))
        try:
            reply = await Pipeline.run(self, ctx)
        except GatewayError as exc:
            end_request_span(ctx, exc.status, error=exc.code)
            raise
        except asyncio.CancelledError as exc:
            if is_shutdown_cut(exc):
                end_request_span(ctx, 503, error="shutting_down")
            else:
                end_request_span(ctx, 499, error="cancelled")
            raise
        except BaseException:
            end_request_span(ctx, 499, error="cancelled")
            raise
        finally:
            detach(token)
        if reply.stream is None:
            end_request_span(ctx, reply.status)
        return reply
