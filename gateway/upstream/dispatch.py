"""Stage `upstream` (terminal): walk the route's plan until a target answers, retrying per the route's
`retry` policy (gateway.upstream.retry) with per-attempt `timeouts`.

After a failed attempt the dispatcher retries the same deployment (a transient 5xx or a reset, after a
jittered backoff; a 429/503 after its Retry-After when that is within the route's bound), moves on to
the plan's next deployment (connect failures, timeouts, unavailable, a longer Retry-After; after a 400
`context_length_exceeded`, the next one with a larger context window), or gives the failure to the
client. Every attempt counts against `max_attempts`, every one after the first against the route's
retry budget. 401/403 mean the provider refused the gateway's own credentials, which is the gateway's
problem (counted in `strait_upstream_auth_failures_total`, logged with the backend's name), so the next
deployment is tried and, if none answers, the client gets 502 `upstream_auth_failed`
(gateway.upstream.normalize). Nothing is retried once a byte of the answer has gone to the client. A
stream's commit point is its first content event, not its 200 status line (gateway.upstream.commit):
until then the events are held, and a stream without content within the route's `first_token_s`, or
that fails, ends or reports an error before content, is a failed attempt like one that never answered.
Each attempt updates the live signals the engine ranks with (in-flight, latency EWMA, `failed` for
connect errors, resets, timeouts and 5xx). `resume` is the mid-stream rescue of a route with `resume:
continue` (gateway.upstream.rescue): the plan's next deployments declaring `prefill` are asked to
continue a committed stream that broke, within the same `max_attempts` and retry budget.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Mapping

from opentelemetry.trace import Status, StatusCode, set_span_in_context

from gateway.canonical import Request
from gateway.context import RequestContext
from gateway.contracts import Adapter, UpstreamCall, UpstreamConnectError, UpstreamResponse, UpstreamResponseTooLarge
from gateway.errors import UpstreamTimeout, UpstreamUnavailable
from gateway.policy.index import Target
from gateway.policy.model import RetryPolicy, TryTimeouts, UpstreamLimits
from gateway.spans import start_attempt_span
from gateway.telemetry import Metrics
from gateway.tracing import Tracing
from gateway.upstream.broken_bill import broken_attempt
from gateway.upstream.commit import MAX_HELD_BYTES, AttemptTimer, Held, NotCommitted, hold, timed_out
from gateway.upstream.redact import NO_SECRETS, Redactor
from gateway.upstream.retry import NEXT, Failure, Move, RetryBudgets, classify_status, next_move
from gateway.upstream.signals import LiveSignals
from gateway.upstream.token_inputs import as_text as token_inputs_as_text
from gateway.upstream.token_inputs import needs_text

log = logging.getLogger("strait.upstream")

# For a request without a policy route (tests driving the dispatcher alone): the documented defaults.
DEFAULT_RETRY = RetryPolicy()
DEFAULT_TIMEOUTS = TryTimeouts()
# Failures after which the deployment counts as failing in the live signals (a 429 or a 4xx does not).
_UNHEALTHY: frozenset[Failure] = frozenset({"connect", "timeout", "reset", "5xx"})


class Dispatcher:
    def __init__(
        self,
        adapters: Mapping[str, Adapter],
        metrics: Metrics,
        signals: LiveSignals,
        redact: Redactor = NO_SECRETS,
        tracing: Tracing | None = None,
        rng: random.Random | None = None,
        budgets: RetryBudgets | None = None,
        upstream_limits: UpstreamLimits | None = None,
    ) -> None:
        self.adapters = adapters
        self.metrics = metrics
        self.signals = signals
        # Knows this runtime's backend secrets; the relay redacts upstream error text with it.
        self.redact = redact
        self.tracing = tracing
        # Per route: active requests and retries in flight (gateway.upstream.retry); outlives a reload.
        self.budgets = budgets if budgets is not None else RetryBudgets()
        # The policy's `server.upstream`: the limits of a backend without its own (its Target carries the
        # policy's backend as written; only its adapter was given these).
        self.upstream_limits = upstream_limits if upstream_limits is not None else UpstreamLimits()
        # Backoff jitter (a test may pass a seeded one).
        self.rng = rng if rng is not None else random.Random()

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

    async def _send(
        self, ctx: RequestContext, call: UpstreamCall, target: Target, timeouts: TryTimeouts
    ) -> UpstreamResponse:
        """One attempt, bounded by the route's per-try timeout: a whole JSON answer, or a stream up to its
        commit point (`_send_stream`)."""
        if self.tracing is not None and ctx.span is not None:
            sending = self._send_traced(ctx, call, target)
        else:
            sending = self.adapters[target.backend.name].send(call)
        if ctx.stream:
            return await self._send_stream(ctx, sending, target, timeouts)
        limit = timeouts.response_s
        if limit is None:
            return await sending
        try:
            async with asyncio.timeout(limit):
                return await sending
        except TimeoutError:
            raise UpstreamConnectError(
                f"{target.backend.name}: no answer within {limit:g} s (the route's timeouts)", timeout=True
            ) from None

    async def _send_stream(
        self, ctx: RequestContext, sending: Awaitable[UpstreamResponse], target: Target, timeouts: TryTimeouts
    ) -> UpstreamResponse:
        """A streamed attempt under one deadline (`AttemptTimer`): its head within `stream_headers_s` (at most
        `first_token_s`), then held until its first content event within `first_token_s` of the start
        (gateway.upstream.commit; with `resume: restart`, until its end). Raises UpstreamConnectError
        (no head), or NotCommitted (it failed before its commit point; the upstream is then closed)."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        start = loop.time()
        first_token = timeouts.first_token_s
        head_limit = min(timeouts.stream_headers_s, first_token)
        name = target.backend.name
        response: UpstreamResponse | None = None
        held = Held()
        failed: NotCommitted
        timed_out_here = False
        # The attempt's one deadline (what an `asyncio.timeout_at` block did here, for a fraction of its
        # cost on every streamed request): moved from the head's to the first token's.
        timer = AttemptTimer(loop, task, start + head_limit)
        try:
            response = await sending
            if not response.streaming:
                return response  # an error answer: the dispatcher's to classify
            timer.reschedule(start + first_token)
            route = ctx.route
            whole = route is not None and route.resume == "restart"
            limits = target.backend.limits
            response.head = await hold(
                response,
                timer,
                held,
                whole=whole,
                stall_s=timeouts.stall_s,
                choices=_choices(ctx),
                max_bytes=(limits or self.upstream_limits).max_body_bytes if whole else MAX_HELD_BYTES,
                name=name,
            )
            return response
        except asyncio.CancelledError:
            if not timer.stop():
                # The client left (or the request was cancelled) while the answer was held.
                if response is not None:
                    await _close(response)
                raise
            timed_out_here = True
        except TimeoutError:
            timed_out_here = True
        except NotCommitted as exc:
            failed = exc
        except BaseException:
            if response is not None:
                await _close(response)
            raise
        finally:
            timer.stop()
        if timed_out_here:
            if response is None:
                raise UpstreamConnectError(
                    f"{name}: no stream head within {head_limit:g} s (the route's timeouts)", timeout=True
                ) from None
            failed = timed_out(held, name)
        assert response is not None
        await _close(response)
        if failed.after_content:
            failed.events = held.events  # what it generated: billed (gateway.upstream.broken_bill)
        raise failed

    async def call(self, ctx: RequestContext) -> UpstreamResponse:
        plan = ctx.plan
        route = ctx.route
        policy = route.retry if route is not None else DEFAULT_RETRY
        timeouts = route.timeouts if route is not None else DEFAULT_TIMEOUTS
        max_attempts = route.max_attempts if route is not None else len(plan)
        if ctx.retry_claim is None:  # ended by the upstream stage's tap when the answer is over
            ctx.retry_claim = self.budgets.start(ctx.route_name, policy.budget_window_s)
        budget = ctx.retry_claim
        metrics = self.metrics
        signals = self.signals
        ctx.redact = self.redact
        request = ctx.request
        assert request is not None
        last_response: UpstreamResponse | None = None
        last_target: Target | None = None
        last_index = -1
        last_error: UpstreamConnectError | None = None
        # The last failure, when it was a stream that failed before its first content: what it said.
        last_stream: NotCommitted | None = None
        index = 0  # the plan's deployment being tried
        retries_here = 0  # retries of that deployment so far
        attempt = 0
        as_text: tuple[Request, bytes] | None = None  # token arrays decoded to text, once, if a target needs it
        while index < len(plan):
            target = plan[index]
            attempt += 1
            # The adapter sends the client's bytes with this model (passthrough) or translates the request;
            # a stream always asks for usage (the relay strips the chunk if the client did not ask for it).
            call = UpstreamCall(
                operation=ctx.operation,
                request=request,
                model=target.deployment.upstream_model,
                stream=ctx.stream,
                request_id=ctx.request_id,
            )
            if ctx.operation != "chat" and needs_text(request, target.model.tokenizer):
                if as_text is None:
                    as_text = await token_inputs_as_text(request)
                call.request, call.inputs = as_text
            backend = target.backend.name
            signals.started(backend)
            t0 = time.perf_counter()
            status: int | None = None
            headers: Mapping[str, str] = {}
            restart = False
            try:
                response = await self._send(ctx, call, target, timeouts)
            except UpstreamConnectError as exc:
                signals.finished(backend)
                failure: Failure = "timeout" if exc.timeout else "reset" if exc.reset else "connect"
                outcome = "connect_error" if failure == "connect" else failure
                metrics.child(metrics.upstream_attempts, backend, outcome).inc()
                log.warning("upstream %s failed (attempt %d, %s): %s", backend, attempt, outcome, exc)
                ctx.failed_attempts.append((target, 504 if exc.timeout else 502, time.perf_counter() - t0))
                last_error = exc
                last_stream = None
            except NotCommitted as held:
                # A stream that failed before its first content (closed by `_send_stream`): a failed
                # attempt only, like a connect failure (not also the request's answer in its records).
                signals.finished(backend)
                failure = held.failure
                metrics.child(metrics.upstream_attempts, backend, failure).inc()
                log.warning("upstream %s failed (attempt %d, %s): %s", backend, attempt, failure, held)
                outcome_status = 504 if held.timeout else 502
                if held.after_content:
                    # A held whole answer (`resume: restart`) that broke after content: billed for what
                    # it generated (the provider charges it), and restarted on the next deployment.
                    broken = await broken_attempt(ctx, target, held.events, outcome_status, time.perf_counter() - t0)
                    ctx.continued.append(broken)
                else:
                    ctx.failed_attempts.append((target, outcome_status, time.perf_counter() - t0))
                last_error = UpstreamConnectError(str(held), timeout=held.timeout)
                last_stream = held
                restart = held.after_content
            except UpstreamResponseTooLarge:
                # It answered, too much to read: not retried; the attempt is the one recorded.
                signals.finished(backend)
                ctx.target = target
                raise
            except BaseException:
                signals.finished(backend)
                raise
            else:
                status = response.status
                ctx.target = target
                if response.streaming:
                    # A stream is only ever a 200, and the client's from its first content (held so far).
                    metrics.child(metrics.upstream_attempts, backend, "200").inc()
                    # It holds its in-flight slot until the relay closes it.
                    signals.answered(backend, target.label, time.perf_counter() - t0)
                    ctx.plan_index, ctx.attempts = index, attempt
                    return response
                else:
                    metrics.child(metrics.upstream_attempts, backend, str(status)).inc()
                    if status < 500:
                        signals.answered(backend, target.label, time.perf_counter() - t0)
                    signals.finished(backend)
                    found = classify_status(status, response.body)
                    if found is None:
                        return response
                    failure = found
                    self._log_refusal(backend, status, failure)
                    headers = response.headers
                    ctx.failed_attempts.append((target, status, time.perf_counter() - t0))
                    last_response, last_target = response, target
                    last_index = len(ctx.failed_attempts) - 1
            if failure in _UNHEALTHY:
                signals.failed(backend, time.monotonic(), target.label)
            if restart:
                move: Move | None = NEXT if failure in policy.retry_on else None
                restart = False
            else:
                move = next_move(policy, failure, status, headers, retries_here, time.time(), self.rng)
            if move is None or attempt >= max_attempts:
                break
            following = index if move.same else _next_index(plan, index, failure)
            if following is None:
                break
            if not budget.try_retry(policy.budget_ratio, policy.budget_min):
                metrics.child(metrics.retry_budget_exhausted, ctx.route_name).inc()
                log.info("route %s: retry budget spent, no further attempt for %s", ctx.route_name, ctx.request_id)
                break
            if move.same:
                retries_here += 1
                metrics.child(metrics.retries, ctx.route_name).inc()
                if move.wait_s > 0:
                    # Bounded: a backoff is capped by backoff_max_ms, a Retry-After by max_retry_after_s.
                    await _sleep_at_least(move.wait_s)
            else:
                retries_here = 0
                metrics.child(metrics.fallbacks, ctx.route_name).inc()
            index = following
        if last_response is not None:
            # The client gets the last answer there was: its attempt is the final one, recorded once (not
            # also among the failed ones), whatever failed to connect after it.
            del ctx.failed_attempts[last_index]
            ctx.target = last_target
            return last_response
        if last_stream is not None and last_stream.client_message:
            # Its stream failed before any content (an oversize event, an error event, a cut): the
            # client is told why, redacted like any upstream text.
            failed = UpstreamTimeout if last_stream.timeout else UpstreamUnavailable
            message, code = last_stream.client_message, last_stream.code
            if last_stream.upstream_text:
                message, code = self.redact(message), self.redact.optional(code)
            raise failed(message, code=code)
        if last_error is not None and last_error.timeout:
            raise UpstreamTimeout("The upstream did not answer in time.")
        raise UpstreamUnavailable("No upstream could be reached for this model.")

    async def resume(self, ctx: RequestContext, prefix: str, produced: int) -> UpstreamResponse | None:
        """Mid-stream rescue (`resume: continue`): the stream of `ctx.target` broke after `prefix` reached
        the client; ask the plan's next deployments that declare `prefill` to continue it, within the
        route's `max_attempts` and retry budget. Each continuation must reach its first content like any
        stream (it is held until then); one that fails or refuses the prefill (a 4xx) is a failed attempt
        and the next is tried. On success `ctx.target` is the continuing deployment (the broken one's
        in-flight slot given back and its failure counted) and its response is returned; None: none could."""
        plan = ctx.plan
        route = ctx.route
        policy = route.retry if route is not None else DEFAULT_RETRY
        timeouts = route.timeouts if route is not None else DEFAULT_TIMEOUTS
        max_attempts = route.max_attempts if route is not None else len(plan)
        if ctx.retry_claim is None:  # set by `call` for every request that reached the dispatcher
            ctx.retry_claim = self.budgets.start(ctx.route_name, policy.budget_window_s)
        budget = ctx.retry_claim
        metrics, signals = self.metrics, self.signals
        request = ctx.request
        assert request is not None
        for index in range(ctx.plan_index + 1, len(plan)):
            target = plan[index]
            if not target.prefill:
                continue
            if ctx.attempts >= max_attempts:
                break
            if not budget.try_retry(policy.budget_ratio, policy.budget_min):
                metrics.child(metrics.retry_budget_exhausted, ctx.route_name).inc()
                log.info("route %s: retry budget spent, no rescue for %s", ctx.route_name, ctx.request_id)
                break
            ctx.attempts += 1
            metrics.child(metrics.fallbacks, ctx.route_name).inc()
            call = UpstreamCall(
                operation=ctx.operation,
                request=request,
                model=target.deployment.upstream_model,
                stream=True,
                request_id=ctx.request_id,
                prefill=prefix,
                prefill_tokens=produced,
            )
            backend = target.backend.name
            signals.started(backend)
            t0 = time.perf_counter()
            failure: Failure | None = None
            try:
                response = await self._send(ctx, call, target, timeouts)
            except UpstreamConnectError as exc:
                signals.finished(backend)
                failure = "timeout" if exc.timeout else "reset" if exc.reset else "connect"
                outcome = "connect_error" if failure == "connect" else failure
                metrics.child(metrics.upstream_attempts, backend, outcome).inc()
                log.warning("rescue on %s failed (%s): %s", backend, outcome, exc)
                ctx.failed_attempts.append((target, 504 if exc.timeout else 502, time.perf_counter() - t0))
            except NotCommitted as held:
                signals.finished(backend)
                failure = held.failure
                metrics.child(metrics.upstream_attempts, backend, failure).inc()
                log.warning("rescue on %s failed (%s): %s", backend, failure, held)
                ctx.failed_attempts.append((target, 504 if held.timeout else 502, time.perf_counter() - t0))
            except UpstreamResponseTooLarge:
                # An error answer past the body limit: refused like any error answer (never the client's).
                signals.finished(backend)
                log.warning("rescue on %s refused (an error answer past max_body_bytes)", backend)
                ctx.failed_attempts.append((target, 502, time.perf_counter() - t0))
            except BaseException:
                signals.finished(backend)
                raise
            else:
                if not response.streaming:
                    # An error answer: a refused prefill (4xx) or a failure. Never the client's: the
                    # stream ends with its original failure if no other deployment continues it.
                    signals.finished(backend)
                    metrics.child(metrics.upstream_attempts, backend, str(response.status)).inc()
                    log.warning("rescue on %s refused (HTTP %d)", backend, response.status)
                    ctx.failed_attempts.append((target, response.status, time.perf_counter() - t0))
                    failure = "5xx" if response.status >= 500 else None
                else:
                    metrics.child(metrics.upstream_attempts, backend, "200").inc()
                    signals.answered(backend, target.label, time.perf_counter() - t0)
                    broken = ctx.target
                    if broken is not None:
                        # The broken stream's slot and failure (the relay's tap counts the new one).
                        signals.finished(broken.backend.name)
                        signals.failed(broken.backend.name, time.monotonic(), broken.label)
                    ctx.target, ctx.plan_index = target, index
                    return response
            if failure in _UNHEALTHY:
                signals.failed(backend, time.monotonic(), target.label)
        return None

    def _log_refusal(self, backend: str, status: int, failure: Failure) -> None:
        if failure == "auth":
            # Never the key, never the upstream's text (it may echo the key): the backend's name.
            self.metrics.child(self.metrics.upstream_auth_failures, backend).inc()
            log.warning(
                "upstream %s refused the gateway's credentials (HTTP %d): check the backend's api_key", backend, status
            )
        elif failure == "redirect":
            # Redirects are never followed (an upstream URL comes only from the policy) and never passed
            # on (the Location and body may name internal hosts or carry secrets).
            log.warning(
                "upstream %s answered with a redirect (HTTP %d), which is not followed: check its base_url",
                backend,
                status,
            )


def _choices(ctx: RequestContext) -> int:
    request = ctx.request
    return max(1, request.n or 1) if request is not None else 1


async def _close(response: UpstreamResponse) -> None:
    """Abort an uncommitted stream: the engine stops generating for nobody."""
    close, response.close = response.close, None
    if close is not None:
        closing = close()
        if closing is not None:
            await asyncio.shield(closing)


async def _sleep_at_least(seconds: float) -> None:
    """Sleep `seconds` by the monotonic clock, never less: the event loop's timers (uvloop's have
    millisecond resolution and a cached "now") may fire a little early, and a Retry-After must not be."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        await asyncio.sleep(left)


def _next_index(plan: tuple[Target, ...], index: int, failure: Failure) -> int | None:
    """The plan's next deployment to try after `plan[index]` failed; after a context-length refusal, the
    next whose model declares a larger context window than the refusing one (none declared: none larger)."""
    if failure != "context_length":
        return index + 1 if index + 1 < len(plan) else None
    window = plan[index].model.context_window
    if window is None:
        return None
    for j in range(index + 1, len(plan)):
        other = plan[j].model.context_window
        if other is not None and other > window:
            return j
    return None
