"""Stage `upstream` (terminal): walk the route's plan until a target answers.

A target is skipped for the next one when it cannot be reached, times out before answering, or
answers 408/429/5xx, or 401/403: the provider refused the gateway's own credentials, which is the
gateway's problem (counted in `strait_upstream_auth_failures_total`, logged with the backend's name),
so the next deployment is tried and, if none answers, the client gets 502 `upstream_auth_failed`
(gateway.upstream.normalize). Nothing is retried once a byte of the answer has gone to the client: for streams
the commit point is the upstream's 200 status line. Each attempt updates the live signals the engine
ranks with (in-flight, latency EWMA, passive ejection after repeated connection failures).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from opentelemetry.trace import Status, StatusCode, set_span_in_context

from gateway.context import RequestContext
from gateway.contracts import Adapter, UpstreamCall, UpstreamConnectError, UpstreamResponse, UpstreamResponseTooLarge
from gateway.errors import UpstreamTimeout, UpstreamUnavailable
from gateway.policy.index import Target
from gateway.spans import start_attempt_span
from gateway.telemetry import Metrics
from gateway.tracing import Tracing
from gateway.upstream.normalize import AUTH_FAILURE_STATUS
from gateway.upstream.redact import NO_SECRETS, Redactor
from gateway.upstream.signals import LiveSignals

log = logging.getLogger("strait.upstream")

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504, 529})
# Statuses after which the next target is tried (before the first byte).
NEXT_TARGET_STATUS = RETRYABLE_STATUS | AUTH_FAILURE_STATUS


class Dispatcher:
    def __init__(
        self,
        adapters: Mapping[str, Adapter],
        metrics: Metrics,
        signals: LiveSignals,
        redact: Redactor = NO_SECRETS,
        tracing: Tracing | None = None,
    ) -> None:
        self.adapters = adapters
        self.metrics = metrics
        self.signals = signals
        # Knows this runtime's backend secrets; the relay redacts upstream error text with it.
        self.redact = redact
        self.tracing = tracing

    async def _send_traced(self, ctx: RequestContext, call: UpstreamCall, target: Target) -> UpstreamResponse:
        """One attempt inside its CLIENT span, the trace context sent upstream (`traceparent`)."""
        assert self.tracing is not None
        backend = target.backend
        span = start_attempt_span(self.tracing, ctx, target.deployment.upstream_model, backend.name, backend.adapter)
        call.headers = {}
        Tracing.inject(call.headers, set_span_in_context(span))
        try:
            response = await self.adapters[backend.name].send(call)
        except UpstreamConnectError as exc:
            span.set_status(Status(StatusCode.ERROR, "timeout" if exc.timeout else "connect_error"))
            span.end()
            raise
        except BaseException:
            span.end()
            raise
        span.set_attribute("http.response.status_code", response.status)
        if response.status >= 400:
            span.set_status(Status(StatusCode.ERROR))
        span.end()
        return response

    async def call(self, ctx: RequestContext) -> UpstreamResponse:
        last_response: UpstreamResponse | None = None
        last_target: Target | None = None
        last_index = -1
        last_error: UpstreamConnectError | None = None
        plan = ctx.plan
        signals = self.signals
        ctx.redact = self.redact
        request = ctx.request
        assert request is not None
        for attempt, target in enumerate(plan):
            # The adapter sends the client's bytes with this model (passthrough) or translates the request;
            # a stream always asks for usage (the relay strips the chunk if the client did not ask for it).
            call = UpstreamCall(
                operation=ctx.operation,
                request=request,
                model=target.deployment.upstream_model,
                stream=ctx.stream,
                request_id=ctx.request_id,
            )
            backend = target.backend.name
            signals.started(backend)
            t0 = time.perf_counter()
            try:
                if self.tracing is not None and ctx.span is not None:
                    response = await self._send_traced(ctx, call, target)
                else:
                    response = await self.adapters[backend].send(call)
            except UpstreamConnectError as exc:
                signals.finished(backend)
                signals.failed(backend, time.monotonic())
                outcome = "timeout" if exc.timeout else "connect_error"
                self.metrics.child(self.metrics.upstream_attempts, backend, outcome).inc()
                log.warning("upstream %s unreachable (attempt %d): %s", backend, attempt + 1, exc)
                ctx.failed_attempts.append((target, 504 if exc.timeout else 502, time.perf_counter() - t0))
                if attempt + 1 < len(plan):
                    self.metrics.child(self.metrics.fallbacks, ctx.route_name).inc()
                last_error = exc
                continue
            except UpstreamResponseTooLarge:
                # It answered, too much to read: not retried; the attempt is the one recorded.
                signals.finished(backend)
                ctx.target = target
                raise
            except BaseException:
                signals.finished(backend)
                raise
            self.metrics.child(self.metrics.upstream_attempts, backend, str(response.status)).inc()
            if response.status in AUTH_FAILURE_STATUS:
                # Never the key, never the upstream's text (it may echo the key): the backend's name.
                self.metrics.child(self.metrics.upstream_auth_failures, backend).inc()
                log.warning(
                    "upstream %s refused the gateway's credentials (HTTP %d): check the backend's api_key",
                    backend,
                    response.status,
                )
            redirect = 300 <= response.status < 400
            if redirect:
                # Redirects are never followed (an upstream URL comes only from the policy) and never
                # passed on (the Location and body may name internal hosts or carry secrets).
                log.warning(
                    "upstream %s answered with a redirect (HTTP %d), which is not followed: check its base_url",
                    backend,
                    response.status,
                )
            if response.status < 500:
                signals.answered(backend, target.label, time.perf_counter() - t0)
            if not response.streaming:
                # A stream holds its in-flight slot until the relay closes it.
                signals.finished(backend)
            ctx.target = target
            if (response.status in NEXT_TARGET_STATUS or redirect) and attempt + 1 < len(plan):
                self.metrics.child(self.metrics.fallbacks, ctx.route_name).inc()
                ctx.failed_attempts.append((target, response.status, time.perf_counter() - t0))
                last_response, last_target = response, target
                last_index = len(ctx.failed_attempts) - 1
                continue
            return response
        if last_response is not None:
            # Every later target failed to connect: the client gets this answer, so its attempt is the
            # final one, recorded once (not also among the failed ones).
            del ctx.failed_attempts[last_index]
            ctx.target = last_target
            return last_response
        if last_error is not None and last_error.timeout:
            raise UpstreamTimeout("The upstream did not answer in time.")
        raise UpstreamUnavailable("No upstream could be reached for this model.")
