"""Shadow traffic: a sampled share of a route's answered requests is sent again, after the client has its
whole answer, to the route's `shadow` model (a candidate: a fine-tune, a new engine), and the candidate's
answer goes to the shadow sink (gateway.contracts.ShadowSink: capture stores it beside the live one),
never to the client.

How it stays off the client's path:
- `ShadowTap.on_end` runs with the live request's other taps; it only decides (the route has a shadow,
  the answer completed and came from an upstream, the sample says yes, the plan names a deployment the
  candidate may use: `RoutePlan.shadow`, filtered by the engine exactly like the route's own candidates)
  and leaves a callback in `ctx.after_answer`. The edge runs it once the answer's last byte is sent
  (gateway.context.answered), streams included: the copy cannot start before the client is done.
- `ShadowRunner` (one per process) runs at most `server.shadow.max_concurrency` copies at once and keeps
  at most `max_queue` waiting; a copy that finds both full is dropped and counted. It calls the adapter
  directly (no retries, no fallback, no limits stage), within the route's `shadow.timeout_s`. Every
  failure (error status, connection, timeout, a sink that raises) is counted and logged, never raised.
- Spend: a route's `shadow.usd_per_day` caps its copies' cost a day on this replica
  (gateway.stages.shadow_budget): a copy is estimated (the live answer's tokens at the candidate's price)
  and reserved before it is queued, and charged its real usage when it ends; a copy that does not fit is
  not made, counted `over_budget`.

Accounting: a copy is never a usage record of the tenant, never reserves or consumes the tenant's rate
limits or budgets, and never feeds the live signals that rank deployments. Its usage is accounted under
its own series, `strait_shadow_tokens_total{route,kind}` and `strait_shadow_cost_usd_total{route}` (the
candidate deployment's price), and handed to the sink.

What is sent: the request the client sent (its own bytes when it did not stream, only the model
replaced), always as a non-streaming call. A streamed chat is sent from its canonical form (the adapter
encodes it); a streamed completion (no translation exists) is not copied (excluded, reason `stream`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import msgspec

from gateway.accounting.counts import TokenCounts, cost_micro_usd, counts_of
from gateway.context import RequestContext
from gateway.contracts import (
    Adapter,
    End,
    ShadowFailure,
    ShadowSink,
    UpstreamCall,
    UpstreamConnectError,
    UpstreamResponse,
)
from gateway.policy.index import Target
from gateway.policy.model import ShadowLimits
from gateway.relay import EndTap
from gateway.stages.shadow_budget import ShadowBudget, micro_usd
from gateway.telemetry import Metrics
from gateway.upstream.wire import Usage, UsageProbe

log = logging.getLogger("strait.shadow")
# A candidate deployment whose copies fail (error, refused, timed out) this many times in a row is paused:
# copies to it are not attempted (counted `paused`) for PAUSE_BASE_S, doubling per pause that ends in
# another failure, up to PAUSE_MAX_S; the first copy after a pause probes it, a success clears it. A dead
# candidate then costs the gateway nothing per request (a refused connect costs about 0.5 ms CPU each).
PAUSE_AFTER = 5
PAUSE_BASE_S = 1.0
PAUSE_MAX_S = 30.0
_usage_of = msgspec.json.Decoder(UsageProbe).decode


class LogSink:
    """The default sink: one debug line per copy (ids, outcome, latency; never content). The runner's
    metrics count every copy whatever the sink; capture replaces this sink with one that stores answers."""

    def record(
        self, live: RequestContext, target: Target, answer: bytes | ShadowFailure, latency_s: float, usage: Usage | None
    ) -> None:
        outcome = "completed" if isinstance(answer, bytes) else answer.outcome
        log.debug(
            "shadow copy of request %s to %s: %s in %.3fs (%s completion tokens)",
            live.request_id,
            target.label,
            outcome,
            latency_s,
            None if usage is None else usage.completion_tokens,
        )


@dataclass(slots=True)
class _Failing:
    """A candidate deployment's failures in a row, and until when its copies are paused."""

    failures: int = 0
    until: float = 0.0
    pause_s: float = PAUSE_BASE_S


@dataclass(slots=True)
class ShadowJob:
    """One copy to make: the live request it copies, where to, with which adapter, within how long."""

    live: RequestContext
    route: str
    target: Target
    adapter: Adapter
    call: UpstreamCall
    timeout_s: float
    # The route's spend cap a day (micro-USD; None: none) and this copy's estimated cost (reserved when
    # it is admitted, released when it ends).
    cap: int | None = None
    estimate: int = 0


class ShadowRunner:
    """The process's shadow copies: bounded (running and waiting), each ended exactly once, counted."""

    def __init__(
        self,
        metrics: Metrics,
        sink: ShadowSink | None = None,
        limits: ShadowLimits | None = None,
        budget: ShadowBudget | None = None,
    ) -> None:
        self.metrics = metrics
        self.budget = budget if budget is not None else ShadowBudget()
        self.sink: ShadowSink = sink if sink is not None else LogSink()
        self.limits = limits if limits is not None else ShadowLimits()
        self._waiting: deque[ShadowJob] = deque()
        self._running: set[asyncio.Task[None]] = set()
        self._closed = False
        self._sink_failed = False
        # By deployment label (bounded by the policy's deployments): candidates failing in a row.
        self._failing: dict[str, _Failing] = {}
        self.clock = time.monotonic

    def configure(self, limits: ShadowLimits) -> None:
        """The policy's caps (a reload may change them; copies already running finish)."""
        self.limits = limits

    @property
    def pending(self) -> int:
        return len(self._running) + len(self._waiting)

    def submit(self, job: ShadowJob) -> bool:
        """Start the copy, queue it, or drop it (counted) when the queue is full or the route's shadow spend
        for the day is used up; never blocks."""
        if self._closed:
            return False
        failing = self._failing.get(job.target.label)
        if failing is not None and failing.until > self.clock():
            self._count(job.route, "paused")
            return False
        now = len(self._running) < self.limits.max_concurrency
        if not now and len(self._waiting) >= self.limits.max_queue:
            self._count(job.route, "dropped")
            return False
        if not self.budget.reserve(job.route, job.cap, job.estimate):
            self._count(job.route, "over_budget")
            return False
        if now:
            self._start(job)
        else:
            self._waiting.append(job)
        self.metrics.shadow_pending.set(self.pending)
        return True

    def _start(self, job: ShadowJob) -> None:
        task = asyncio.ensure_future(self._run(job))
        self._running.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        while self._waiting and len(self._running) < self.limits.max_concurrency and not self._closed:
            self._start(self._waiting.popleft())
        self.metrics.shadow_pending.set(self.pending)

    def _count(self, route: str, outcome: str) -> None:
        self.metrics.child(self.metrics.shadow_requests, route, outcome).inc()

    async def _run(self, job: ShadowJob) -> None:
        started = time.perf_counter()
        answer: bytes | ShadowFailure
        response: UpstreamResponse | None = None
        try:
            async with asyncio.timeout(job.timeout_s):
                response = await job.adapter.send(job.call)
            if response.streaming:
                answer = ShadowFailure("failed", response.status, "the candidate streamed a non-streaming call")
            elif 200 <= response.status < 300:
                answer = response.body
            else:
                answer = ShadowFailure("failed", response.status, f"the candidate answered {response.status}")
        except TimeoutError:
            answer = ShadowFailure("timed_out", None, f"no whole answer within {job.timeout_s:g}s")
        except UpstreamConnectError as exc:
            answer = ShadowFailure("timed_out" if exc.timeout else "failed", None, type(exc).__name__)
        except asyncio.CancelledError:
            raise  # the process is shutting down: the copy is abandoned, not counted
        except Exception as exc:  # an adapter's bug must not escape into the event loop
            log.exception("shadow copy of request %s to %s: the adapter failed", job.live.request_id, job.target.label)
            answer = ShadowFailure("failed", None, type(exc).__name__)
        finally:
            if response is not None and response.close is not None:
                try:
                    closing = response.close()
                    if closing is not None:
                        await closing
                except Exception:
                    log.exception("shadow copy of %s: releasing the candidate's connection failed", job.live.request_id)
        self._finish(job, answer, time.perf_counter() - started)

    def _finish(self, job: ShadowJob, answer: bytes | ShadowFailure, seconds: float) -> None:
        m = self.metrics
        route = job.route
        usage: Usage | None = None
        self._note(job.target.label, failed=not isinstance(answer, bytes))
        if isinstance(answer, bytes):
            self._count(route, "completed")
            try:
                usage = _usage_of(answer).usage
            except (msgspec.DecodeError, msgspec.ValidationError):
                usage = None
        else:
            self._count(route, answer.outcome)
            log.info(
                "shadow copy of request %s to %s %s: %s",
                job.live.request_id,
                job.target.label,
                answer.outcome,
                answer.reason,
            )
        m.child(m.shadow_latency, route).observe(seconds)
        # Charged to the route's shadow budget: the real cost; without usage, the estimate when the
        # candidate may have spent its tokens (an answer without usage, a timeout), else nothing.
        cost = 0
        if usage is not None:
            counts = counts_of(usage)
            m.child(m.shadow_tokens, route, "prompt").inc(counts.prompt)
            m.child(m.shadow_tokens, route, "completion").inc(counts.completion)
            cost = cost_micro_usd(job.target.deployment.price, counts)
            if cost:
                m.child(m.shadow_cost, route).inc(cost / 1e6)
        elif isinstance(answer, bytes) or answer.outcome == "timed_out":
            cost = job.estimate
        self.budget.settle(route, job.estimate, cost)
        try:
            self.sink.record(job.live, job.target, answer, seconds, usage)
        except Exception:
            if not self._sink_failed:  # said once until it works again; counted every time
                self._sink_failed = True
                log.exception("shadow sink %s failed; copies are counted but not recorded", type(self.sink).__name__)
            m.child(m.shadow_sink_errors, route).inc()
        else:
            self._sink_failed = False

    def _note(self, label: str, *, failed: bool) -> None:
        """Count a candidate's failures in a row; pause its copies when they reach PAUSE_AFTER."""
        if not failed:
            self._failing.pop(label, None)
            return
        failing = self._failing.get(label)
        if failing is None:
            failing = self._failing[label] = _Failing()
        failing.failures += 1
        if failing.failures >= PAUSE_AFTER:
            failing.until = self.clock() + failing.pause_s
            log.warning(
                "shadow copies to %s paused for %.0fs after %d failures in a row",
                label,
                failing.pause_s,
                failing.failures,
            )
            failing.pause_s = min(failing.pause_s * 2, PAUSE_MAX_S)

    async def aclose(self) -> None:
        """Shutdown: waiting copies are forgotten, running ones cancelled (before the adapters close)."""
        self._closed = True
        self._waiting.clear()
        tasks = list(self._running)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self.metrics.shadow_pending.set(0)


class ShadowTap(EndTap):
    """Decides, at the end of each answer, whether a copy is made, and leaves it for after the answer."""

    def __init__(
        self,
        runner: ShadowRunner,
        adapters: Mapping[str, Adapter],
        sample: Callable[[], float] = random.random,
    ) -> None:
        self.runner = runner
        self.adapters = adapters
        self.sample = sample

    def on_end(self, ctx: RequestContext, end: End) -> None:
        plan = ctx.route_plan
        if plan is None or ctx.request is None or end.outcome != "completed" or end.cache is not None:
            return
        shadow = plan.route.shadow
        if shadow is None or end.status >= 300:
            return
        if shadow.sample_rate < 1.0 and self.sample() >= shadow.sample_rate:
            return
        route = plan.route.name
        m = self.runner.metrics
        target = plan.shadow
        reason = plan.shadow_excluded if target is None else None
        if target is not None and ctx.stream and ctx.operation != "chat":
            reason = "stream"
        if target is None or reason is not None:
            m.child(m.shadow_requests, route, "excluded").inc()
            m.child(m.shadow_excluded, route, reason or "no_deployment").inc()
            return
        adapter = self.adapters.get(target.backend.name)
        if adapter is None:
            return
        cap = None if shadow.usd_per_day is None else micro_usd(shadow.usd_per_day)
        job = ShadowJob(ctx, route, target, adapter, _copy_call(ctx, target), shadow.timeout_s, cap)
        live_usage = end.usage
        if ctx.after_answer is None:
            ctx.after_answer = []
        ctx.after_answer.append(lambda: self._submit(job, live_usage))

    def _submit(self, job: ShadowJob, live_usage: Usage | None) -> None:
        job.estimate = estimate(job, live_usage)
        self.runner.submit(job)


def estimate(job: ShadowJob, live_usage: Usage | None) -> int:
    """A copy's cost before it is made: the live answer's tokens at the candidate's price (micro-USD).
    Accounting's counts (written by its tap, which ends before the copy is submitted) when there are any,
    else the provider's usage of the live answer, else nothing to go on (0)."""
    live = job.live
    if live.usage_in is not None or live.usage_out is not None:
        counts = TokenCounts(prompt=live.usage_in or 0, completion=live.usage_out or 0)
    elif live_usage is not None:
        counts = counts_of(live_usage)
    else:
        return 0
    return cost_micro_usd(job.target.deployment.price, counts)


def _copy_call(ctx: RequestContext, target: Target) -> UpstreamCall:
    """The live request as a non-streaming call to the candidate: the client's own bytes when it did not
    stream (only the model replaced, as for any passthrough), else its canonical form."""
    request = ctx.request
    assert request is not None
    if request.stream:
        request = msgspec.structs.replace(request, stream=False, include_usage=False, original=None)
    return UpstreamCall(
        operation=ctx.operation,
        request=request,
        model=target.deployment.upstream_model,
        stream=False,
        request_id=ctx.request_id,
    )
