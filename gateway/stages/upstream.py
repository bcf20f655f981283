"""Stage `upstream` (terminal): the Dispatcher walks the plan; its answer becomes the client's Reply
(gateway.stages.respond: a JSON body with how it ended, or the upstream's stream as an event source).

It contributes three taps, run when the answer is over: the route's retry budget (the request stops
counting as active), live signals (a stream holds its backend's in-flight count until then) and token
metrics (the provider's usage, the stream's time to first event).
A route with `resume: continue` gives the relay the dispatcher's `resume`, to continue a committed
stream that breaks on another deployment (gateway.upstream.rescue). A dispatch failure or a client that
leaves while waiting propagates to the pipeline, which ends the
request through every tap (accounting included) before the error goes on.
"""

from __future__ import annotations

import time

from gateway.accounting.counts import counts_of
from gateway.context import RequestContext
from gateway.contracts import End
from gateway.relay import EndTap
from gateway.reply import Reply
from gateway.stages.respond import respond
from gateway.telemetry import Metrics
from gateway.upstream.dispatch import Dispatcher
from gateway.upstream.signals import LiveSignals


class RetryBudgetTap(EndTap):
    """The request no longer counts against its route's retry budget (gateway.upstream.retry): the
    pipeline ends every request that reached the dispatcher through its taps exactly once, whether it
    answered, failed, streamed to its end or was cancelled; the claim's `end` is idempotent besides."""

    def on_end(self, ctx: RequestContext, end: End) -> None:
        claim = ctx.retry_claim
        if claim is not None:
            claim.end()


class SignalsTap(EndTap):
    """A stream's backend is no longer working on it: its in-flight count goes down (the dispatcher
    counts a whole answer down itself). A completed stream also feeds the deployment's EWMAs of time to
    first token (the latency objective ranks on it) and of output tokens per second."""

    def __init__(self, signals: LiveSignals) -> None:
        self.signals = signals

    def on_end(self, ctx: RequestContext, end: End) -> None:
        target = ctx.target
        if not end.stream or end.cache is not None or target is None:
            return
        self.signals.finished(target.backend.name)
        if end.outcome in ("upstream_failed", "timed_out"):
            # Broken or stalled after its head: a failure of the deployment like one before it (its
            # 200 head was counted a success), so a backend that keeps cutting streams is ejected too.
            self.signals.failed(target.backend.name, time.monotonic(), target.label)
            return
        if end.outcome != "completed" or end.ttft_s is None or not all(c.restarted for c in ctx.continued):
            return  # (a continued stream's first token was another deployment's)
        # The client's time to first event, less the attempts that failed (or broke and were restarted)
        # before this deployment answered.
        spent_elsewhere = sum(seconds for _, _, seconds in ctx.failed_attempts)
        spent_elsewhere += sum(c.seconds for c in ctx.continued)
        ttft = max(0.0, end.ttft_s - spent_elsewhere)
        self.signals.first_token(target.label, ttft)
        usage = end.usage
        tokens = usage.completion_tokens if usage is not None else end.completion_tokens
        generating = time.perf_counter() - ctx.started - end.ttft_s
        if tokens and generating > 0:
            self.signals.throughput(target.label, tokens / generating)


class MetricsTap(EndTap):
    """Tokens the provider reported, by route; a stream's time to first event, by route and deployment."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def on_end(self, ctx: RequestContext, end: End) -> None:
        if end.cache is not None:
            return  # no upstream ran: its tokens and time to first event are not the provider's
        m = self.metrics
        route = ctx.route_name
        if end.stream and end.ttft_s is not None:
            m.child(m.ttft, route).observe(end.ttft_s)
            if ctx.target is not None:
                m.child(m.deployment_ttft, route, ctx.target.label).observe(end.ttft_s)
        usage = end.usage
        if usage is not None:
            tokens = counts_of(usage)
            m.child(m.tokens, route, "prompt").inc(tokens.prompt)
            m.child(m.tokens, route, "completion").inc(tokens.completion)
            # Parts of those (the same bounded kinds as strait_usage_tokens), only when reported.
            if tokens.cached:
                m.child(m.tokens, route, "cached").inc(tokens.cached)
            if tokens.cache_write:
                m.child(m.tokens, route, "cache_write").inc(tokens.cache_write)
            if tokens.reasoning:
                m.child(m.tokens, route, "reasoning").inc(tokens.reasoning)


class UpstreamStage:
    name = "upstream"

    def __init__(self, dispatcher: Dispatcher, metrics: Metrics, signals: LiveSignals) -> None:
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.taps = (RetryBudgetTap(), SignalsTap(signals), MetricsTap(metrics))

    async def call(self, ctx: RequestContext) -> Reply:
        response = await self.dispatcher.call(ctx)
        route = ctx.route
        # `resume: continue`: a committed stream that breaks is continued on another deployment.
        rescue = self.dispatcher.resume if route is not None and route.resume == "continue" else None
        return respond(ctx, response, self.metrics, rescue)
