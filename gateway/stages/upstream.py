"""Stage `upstream` (terminal): the Dispatcher walks the plan; its answer becomes the client's Reply
(gateway.stages.respond: a JSON body with how it ended, or the upstream's stream as an event source).

It contributes two taps, run when the answer is over: live signals (a stream holds its backend's
in-flight count until then) and token metrics (the provider's usage, the stream's time to first event).
A dispatch failure or a client that leaves while waiting propagates to the pipeline, which ends the
request through every tap (accounting included) before the error goes on.
"""

from __future__ import annotations

from gateway.context import RequestContext
from gateway.contracts import End
from gateway.relay import EndTap
from gateway.reply import Reply
from gateway.stages.respond import respond
from gateway.telemetry import Metrics
from gateway.upstream.dispatch import Dispatcher
from gateway.upstream.signals import LiveSignals


class SignalsTap(EndTap):
    """A stream's backend is no longer working on it: its in-flight count goes down (the dispatcher
    counts a whole answer down itself)."""

    def __init__(self, signals: LiveSignals) -> None:
        self.signals = signals

    def on_end(self, ctx: RequestContext, end: End) -> None:
        if end.stream and end.cache is None and ctx.target is not None:
            self.signals.finished(ctx.target.backend.name)


class MetricsTap(EndTap):
    """Tokens the provider reported, by route; a stream's time to first event."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def on_end(self, ctx: RequestContext, end: End) -> None:
        if end.cache is not None:
            return  # no upstream ran: its tokens and time to first event are not the provider's
        m = self.metrics
        route = ctx.route_name
        if end.stream and end.ttft_s is not None:
            m.child(m.ttft, route).observe(end.ttft_s)
        usage = end.usage
        if usage is not None:
            m.child(m.tokens, route, "prompt").inc(usage.prompt_tokens)
            m.child(m.tokens, route, "completion").inc(usage.completion_tokens)


class UpstreamStage:
    name = "upstream"

    def __init__(self, dispatcher: Dispatcher, metrics: Metrics, signals: LiveSignals) -> None:
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.taps = (SignalsTap(signals), MetricsTap(metrics))

    async def call(self, ctx: RequestContext) -> Reply:
        return respond(ctx, await self.dispatcher.call(ctx), self.metrics)
