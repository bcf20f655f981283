"""Stage `accounting`, a tap (gateway.contracts.Tap): a usage record per upstream attempt, the store's
reservation reconciled to what was really used, both off the request path; while a stream lasts, its
ticket's lease is renewed by a timer (no work per event).

`on_end` is the one place a request that reached the upstream stage is accounted: the pipeline calls it
exactly once per request (JSON answer, upstream error, dispatch failure, cancellation, or a stream's end
through the relay), so `complete` has that one caller.

Tokens: the provider's usage when it sent one; otherwise tiktoken over what the upstream produced,
flagged `usage_source=estimated` (never 0 for an answer that had text). A client that left mid-stream
is charged for what the upstream generated until it was closed, flagged `partial`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from gateway.access_log import AccessLog
from gateway.accounting.counts import NONE, TokenCounts, cost_micro_usd, counts_of
from gateway.accounting.meter import completion_counts_of
from gateway.accounting.records import UsageRecord, UsageSource
from gateway.accounting.writer import UsageWriter
from gateway.context import RequestContext
from gateway.contracts import End
from gateway.policy.evidence import contradicts, reported_geo
from gateway.relay import EndTap
from gateway.state import MemoryStore, Store, Ticket
from gateway.state import Usage as StoreUsage
from gateway.telemetry import Metrics
from gateway.tokens import OFFLOAD_CHARS

# The `route` label of a request refused before a route was chosen (bad key, unknown model, bad body).
UNROUTED = "-"
# Distinct error codes `strait_refusals` labels (the gateway's own are a few dozen; the rest are upstreams').
MAX_CODE_LABELS = 64

# Runs a callback after a delay and returns its handle (the event loop's `call_later`; a test's own).
Schedule = Callable[[float, Callable[[], None]], asyncio.Handle]


def _call_later(delay: float, callback: Callable[[], None]) -> asyncio.Handle:
    return asyncio.get_running_loop().call_later(delay, callback)


log = logging.getLogger("strait.accounting")

# A lease (300 s by default) is renewed this often while an answer is still streaming.
RENEW_EVERY_S = 60.0
# Reconciles wait this long to travel together (one pipeline), at most this many per call.
RECONCILE_EVERY_S = 0.01
RECONCILE_BATCH = 64
# A slot release joins the batch (limits.release_can_wait) only for a request that ended within this long of
# its start: the free slots its admission saw are that fresh. A longer one's release is awaited.
RELEASE_CAN_WAIT_FOR_S = 1.0


def _estimates_prompt(ctx: RequestContext, end: End) -> bool:
    """Whether `complete` counts the prompt itself: an answer (or a cut-short one) without provider usage."""
    return (
        end.usage is None
        and end.cache is None
        and ctx.target is not None
        and ctx.principal is not None
        and (end.status < 400 or end.partial)
    )


def _long_answer(end: End) -> bool:
    """A JSON answer to count (no provider usage) too long to tokenize on the event loop."""
    return end.completion_tokens is None and sum(len(b) for b in end.produced) > OFFLOAD_CHARS


class AccountingStage(EndTap):
    """A tap with a start (the lease timer) and an end (the records, the release); nothing per event."""

    name = "accounting"

    def __init__(
        self,
        writer: UsageWriter,
        store: Store,
        metrics: Metrics,
        access_log: AccessLog | None = None,
        schedule: Schedule = _call_later,
    ) -> None:
        self.writer = writer
        self._schedule = schedule
        self.access_log = access_log
        self.store = store
        self.metrics = metrics
        self._reconciles: set[asyncio.Task[object]] = set()
        # Error codes seen as `strait_refusals` labels (bounded: MAX_CODE_LABELS).
        self._codes: set[str] = set()
        # (tenant, route, deployment) -> its prompt, completion and cost metric children (`_usage_tallies`).
        self._tallies: dict[tuple[str, str, str], tuple[Any, Any, Any]] = {}
        self._inline = store if isinstance(store, MemoryStore) else None
        self._pending: list[tuple[Ticket, StoreUsage]] = []
        self._flusher: asyncio.Future[None] | None = None
        # Releases a client waits for (they free concurrency slots): flushed without the batching delay.
        self._urgent: list[tuple[Ticket, StoreUsage, asyncio.Future[None]]] = []
        self._urgent_flusher: asyncio.Future[None] | None = None
        # Requests being completed once their long prompt is counted in a worker thread.
        self._deferred: set[asyncio.Task[None]] = set()

    def on_start(self, ctx: RequestContext) -> None:
        """A stream starts: its ticket's lease (concurrency slot, budget reservation) is renewed every
        RENEW_EVERY_S while it lasts, so a stream longer than the lease keeps what it holds."""
        if ctx.ticket is not None:
            ctx.lease_timer = self._schedule(RENEW_EVERY_S, partial(self._renew, ctx))

    def on_end(self, ctx: RequestContext, end: End) -> None:
        timer = ctx.lease_timer
        if timer is not None:
            timer.cancel()
            ctx.lease_timer = None
        if _estimates_prompt(ctx, end) and (ctx.prompt_tokens.long() or _long_answer(end)):
            # The upstream reported no usage (a client that left early, an engine that sends none) and the
            # prompt was never counted: counting a long one here would stall the event loop, every other
            # request with it (seconds for a few MB). It is counted in a worker thread and the request
            # completed then; the answer's last byte waits for that (`ctx.settling`), as for a slot release.
            ctx.accounted = True
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            ctx.settling = done
            task = asyncio.ensure_future(self._complete_counted(ctx, end, done))
            self._deferred.add(task)
            task.add_done_callback(self._deferred.discard)
            return
        # What was charged: the request's span (ended by a later tap) reports it, the cache keeps it with
        # the answer it stores.
        ctx.usage_in, ctx.usage_out = self.complete(ctx, end)

    async def _complete_counted(self, ctx: RequestContext, end: End, done: asyncio.Future[None]) -> None:
        """`complete` once the prompt is counted off the event loop; `done` when its release has landed.
        (The request's span, ended by a later tap meanwhile, goes without the token counts.)"""
        try:
            try:
                await ctx.prompt_tokens.count()
                if _long_answer(end) and ctx.target is not None:
                    # A JSON answer without usage (up to the upstream body limit, 16 MiB by default).
                    counted, reasoning = await asyncio.to_thread(
                        completion_counts_of, end.produced, ctx.target.model.tokenizer
                    )
                    end = dataclasses.replace(end, completion_tokens=counted, reasoning_tokens=reasoning)
            finally:
                # Counted now (or, if cancelled at shutdown, on this thread).
                ctx.usage_in, ctx.usage_out = self.complete(ctx, end)
            if ctx.settling is not None and ctx.settling is not done:
                await asyncio.shield(ctx.settling)
        finally:
            if not done.done():
                done.set_result(None)

    def _renew(self, ctx: RequestContext) -> None:
        ticket = ctx.ticket
        if ticket is None:
            ctx.lease_timer = None
            return
        task: asyncio.Task[object] = asyncio.ensure_future(self.store.renew(ticket, ticket.request.lease_s))
        self._reconciles.add(task)
        task.add_done_callback(self._reconciled)
        ctx.lease_timer = self._schedule(RENEW_EVERY_S, partial(self._renew, ctx))

    def complete(self, ctx: RequestContext, end: End) -> tuple[int, int]:
        """The answer is over (sent, failed or abandoned): record it and release the reservation.
        Returns the (prompt, completion) tokens charged.

        Without provider usage, completion tokens are the End's `completion_tokens` (a stream's count)
        or else tiktoken over `produced` (a JSON body)."""
        if end.cache is not None:
            return self._complete_hit(ctx, end)
        status, usage, partial_, ttft_s = end.status, end.usage, end.partial, end.ttft_s
        now = time.time()
        ts_ms = int(now * 1000)
        tokens = NONE
        cost = 0
        source: UsageSource = "none"
        target = ctx.target
        principal = ctx.principal
        for n, (failed, outcome, seconds) in enumerate(ctx.failed_attempts, start=1):
            self._submit(
                ctx,
                n,
                False,
                ts_ms,
                failed.model.name,
                failed.label,
                failed.backend.name,
                outcome,
                NONE,
                0,
                seconds,
                None,
                False,
                "none",
            )
        # Streams that broke after sending content and were continued elsewhere (`resume: continue`):
        # billed for what they produced, every kind of token, at their own deployment's price.
        earlier = NONE
        earlier_cost = 0
        for n, part in enumerate(ctx.continued, start=len(ctx.failed_attempts) + 1):
            if principal is None:
                break
            part_cost = cost_micro_usd(part.target.deployment.price, part.tokens)
            self._submit(
                ctx,
                n,
                False,
                ts_ms,
                part.target.model.name,
                part.target.label,
                part.target.backend.name,
                part.status,
                part.tokens,
                part_cost,
                part.seconds,
                ttft_s,
                True,
                "estimated" if part.estimated else "provider",
            )
            earlier += part.tokens
            earlier_cost += part_cost
        if target is not None and principal is not None:
            geo = None
            if usage is not None:
                # What the provider reported, and only that (a cut stream's usage chunk included).
                tokens = counts_of(usage)
                source = "provider"
                geo = reported_geo(usage.inference_geo)
                if geo is not None and contradicts(target, geo):
                    self.metrics.child(self.metrics.evidence_mismatch, target.label).inc()
                    log.warning(
                        "request %s: %s reported inference in %r, outside its declared jurisdiction %s",
                        ctx.request_id,
                        target.label,
                        geo,
                        target.backend.hosting.jurisdiction,
                    )
            elif _estimates_prompt(ctx, end):
                # The upstream reported none: the prompt and what it produced, counted (a cut stream:
                # what it sent before the cut, never a whole-answer estimate).
                completion, reasoning = (
                    (end.completion_tokens, end.reasoning_tokens)
                    if end.completion_tokens is not None
                    else completion_counts_of(end.produced, target.model.tokenizer)
                )
                tokens = TokenCounts(prompt=ctx.prompt_tokens.count_now(), completion=completion, reasoning=reasoning)
                source = "estimated"
            cost = target.rates.micro_usd(
                tokens.prompt, tokens.cached, tokens.cache_write, tokens.completion, tokens.reasoning
            )
            self._submit(
                ctx,
                len(ctx.failed_attempts) + len(ctx.continued) + 1,
                True,
                ts_ms,
                target.model.name,
                target.label,
                target.backend.name,
                status,
                tokens,
                cost,
                time.perf_counter() - ctx.started,
                ttft_s,
                partial_,
                source,
                inference_geo=geo,
            )
        whole = tokens + earlier
        self.release(ctx, whole.total, cost + earlier_cost)
        ctx.accounted = True
        if self.access_log is not None:
            self.access_log.write(
                ctx,
                status,
                # The request's whole bill: a continued stream's earlier attempts included.
                prompt=whole.prompt,
                completion=whole.completion,
                cached=whole.cached,
                cache_write=whole.cache_write,
                reasoning=whole.reasoning,
                cost_micro_usd=cost + earlier_cost,
                ttft_s=ttft_s,
                partial=partial_,
            )
        return tokens.prompt, tokens.completion

    def _complete_hit(self, ctx: RequestContext, end: End) -> tuple[int, int]:
        """A cache hit: one record (cache_hit, the tokens it saved, no tokens charged), its reservation
        released with no tokens (the request counted against the request rates, not the token rates) and
        the route's hit price, if any, charged against budgets."""
        saved = end.saved
        target, principal = ctx.target, ctx.principal
        tokens_saved = cost = 0
        if saved is not None:
            tokens_saved = saved.prompt_tokens + saved.completion_tokens
            if target is not None and end.hit_price > 0:
                made = cost_micro_usd(target.deployment.price, counts_of(saved))
                cost = round(made * end.hit_price)
        if target is not None and principal is not None:
            self._submit(
                ctx,
                1,
                True,
                int(time.time() * 1000),
                target.model.name,
                target.label,
                target.backend.name,
                end.status,
                NONE,
                cost,
                time.perf_counter() - ctx.started,
                None,
                False,
                "none",
                cache_hit=True,
                tokens_saved=tokens_saved,
            )
        self.release(ctx, 0, cost)
        ctx.accounted = True
        if self.access_log is not None:
            self.access_log.write(ctx, end.status, cost_micro_usd=cost, cache=end.cache, tokens_saved=tokens_saved)
        return 0, 0

    def refused(self, ctx: RequestContext, status: int, code: str | None) -> None:
        """A request refused before any upstream (auth, body, route, limits) or failed upstream: counted by
        tenant and code (the console's refusals by reason), among the requests by route and status (what
        error-rate alerts read: a timeout or an unreachable upstream is a 5xx like an upstream's own), and
        its log line. Before a route was chosen the route label is `-` (never the client's model string)."""
        tenant = ctx.principal.tenant if ctx.principal is not None else "-"
        m = self.metrics
        m.child(m.refusals, tenant, self._code_label(status, code)).inc()
        # The requested route, as every other count of this metric has it (respond, cache hits); `-` until
        # a route was chosen, while route_name is still the client's raw model string.
        m.child(m.requests, ctx.route_name if ctx.route is not None else UNROUTED, str(status)).inc()
        if self.access_log is not None and not ctx.accounted:
            self.access_log.write(ctx, status, error=code)

    def _code_label(self, status: int, code: str | None) -> str:
        """The error code as a label: an upstream's own code passes through errors, so it is kept only when
        it looks like one and while fewer than MAX_CODE_LABELS were seen (bounded cardinality)."""
        if code is None or len(code) > 48 or not code.replace("_", "").replace("-", "").isalnum():
            return f"http_{status}"
        if code not in self._codes:
            if len(self._codes) >= MAX_CODE_LABELS:
                return f"http_{status}"
            self._codes.add(code)
        return code

    def release(self, ctx: RequestContext, tokens: int, cost: int) -> None:
        """Hand the reservation back to the store with the real usage.

        A ticket that holds concurrency slots is reconciled at once, and `ctx.settling` is the call:
        the edge awaits it before the answer's last byte, so a client that sends strictly one request
        at a time never finds its own previous request still holding a slot. Unless the limits stage
        found the slots far from full (`ctx.release_can_wait`) and the request ended within
        RELEASE_CAN_WAIT_FOR_S of its start (what the admission saw is still fresh): then, like everything else (token
        debt, budget reservations), the release waits, queued, and is sent with the others of the last
        few milliseconds in one call (one Redis pipeline), never before the response.
        """
        ticket = ctx.ticket
        if ticket is None:
            return
        ctx.ticket = None
        usage = StoreUsage(tokens=tokens, cost_micro_usd=cost)
        if self._inline is not None:
            # In-process state: releasing is a few dict operations, cheaper done now than queued.
            self._inline.reconcile_now(ticket, usage)
            return
        if ticket.request.limits.concurrency and not (
            ctx.release_can_wait and time.perf_counter() - ctx.started <= RELEASE_CAN_WAIT_FOR_S
        ):
            settled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._urgent.append((ticket, usage, settled))
            ctx.settling = settled
            if self._urgent_flusher is None or self._urgent_flusher.done():
                self._urgent_flusher = asyncio.ensure_future(self._flush_urgent())
            return
        self._pending.append((ticket, usage))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush_soon())

    async def _flush_soon(self) -> None:
        await asyncio.sleep(RECONCILE_EVERY_S)
        while self._pending:
            batch, self._pending = self._pending[:RECONCILE_BATCH], self._pending[RECONCILE_BATCH:]
            try:
                await self._reconcile(batch)
            except Exception:  # never let a store bug kill the flusher; leases expire the rest
                log.exception("reconcile batch failed")

    async def _reconcile(self, batch: list[tuple[Ticket, StoreUsage]]) -> None:
        started = time.perf_counter()
        await self.store.reconcile_many(batch)
        self.metrics.child(self.metrics.state_latency, "reconcile").observe(time.perf_counter() - started)

    async def _flush_urgent(self) -> None:
        """Slot releases go at the next turn of the event loop (those of one turn travel together in
        one pipeline), taking along whatever else is queued; each waiter is woken when its batch lands."""
        await asyncio.sleep(0)
        while self._urgent:
            urgent, self._urgent = self._urgent[:RECONCILE_BATCH], self._urgent[RECONCILE_BATCH:]
            room = RECONCILE_BATCH - len(urgent)
            rest, self._pending = self._pending[:room], self._pending[room:]
            try:
                await self._reconcile([(t, u) for t, u, _ in urgent] + rest)
            except Exception:  # never let a store bug kill the flusher; leases expire the rest
                log.exception("reconcile batch failed")
            finally:
                for _, _, settled in urgent:
                    if not settled.done():
                        settled.set_result(None)

    def _reconciled(self, task: asyncio.Task[object]) -> None:
        self._reconciles.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("reconcile failed: %s", task.exception())

    def _submit(
        self,
        ctx: RequestContext,
        attempt: int,
        final: bool,
        ts_ms: int,
        model: str,
        deployment: str,
        backend: str,
        status: int,
        tokens: TokenCounts,
        cost: int,
        seconds: float,
        ttft_s: float | None,
        partial: bool,
        source: UsageSource,
        *,
        cache_hit: bool = False,
        tokens_saved: int = 0,
        inference_geo: str | None = None,
    ) -> None:
        principal = ctx.principal
        assert principal is not None
        self.writer.submit(
            UsageRecord(
                request_id=ctx.request_id,
                attempt=attempt,
                final=final,
                ts_ms=ts_ms,
                tenant=principal.tenant,
                key_id=principal.key_id,
                route=ctx.route.name if ctx.route is not None else ctx.route_name,
                model=model,
                deployment=deployment,
                backend=backend,
                status=status,
                prompt_tokens=tokens.prompt,
                completion_tokens=tokens.completion,
                cached_tokens=tokens.cached,
                cache_write_tokens=tokens.cache_write,
                reasoning_tokens=tokens.reasoning,
                cost_micro_usd=cost,
                latency_ms=round(seconds * 1000, 3),
                ttft_ms=None if ttft_s is None else round(ttft_s * 1000, 3),
                partial=partial,
                usage_source=source,
                client_request_id=ctx.client_request_id,
                cache_hit=cache_hit,
                tokens_saved=tokens_saved,
                inference_geo=inference_geo,
            )
        )
        m = self.metrics
        m.child(m.usage_records, source).inc()
        route = ctx.route.name if ctx.route is not None else ctx.route_name
        if tokens.prompt or tokens.completion or cost:
            tallies = self._usage_tallies(principal.tenant, route, deployment)
            # `kind` is one of five (bounded): prompt and completion are totals; cached, cache_write
            # (parts of prompt) and reasoning (a part of completion) only when there are any.
            if tokens.prompt or tokens.completion:
                tallies[0].inc(tokens.prompt)
                tallies[1].inc(tokens.completion)
                if tokens.cached:
                    m.child(m.usage_tokens, principal.tenant, route, deployment, "cached").inc(tokens.cached)
                if tokens.cache_write:
                    m.child(m.usage_tokens, principal.tenant, route, deployment, "cache_write").inc(tokens.cache_write)
                if tokens.reasoning:
                    m.child(m.usage_tokens, principal.tenant, route, deployment, "reasoning").inc(tokens.reasoning)
            if cost:
                tallies[2].inc(cost / 1e6)
        served = None if cache_hit else _served_by(ctx, deployment)
        if served is not None:
            tier, spilled = served
            if final:
                m.child(m.served_requests, route, tier, spilled).inc()
            if cost:
                m.child(m.served_cost, route, tier, spilled).inc(cost / 1e6)

    def _usage_tallies(self, tenant: str, route: str, deployment: str) -> tuple[Any, Any, Any]:
        """The prompt-tokens, completion-tokens and cost children of one tenant, route and deployment,
        looked up as one (three `Metrics.child` lookups per request fewer; bounded by the policy)."""
        key = (tenant, route, deployment)
        found = self._tallies.get(key)
        if found is None:
            m = self.metrics
            found = self._tallies[key] = (
                m.child(m.usage_tokens, tenant, route, deployment, "prompt"),
                m.child(m.usage_tokens, tenant, route, deployment, "completion"),
                m.child(m.usage_cost, tenant, route, deployment),
            )
        return found

    async def drain(self) -> None:
        """Send every queued reconcile and wait for background calls (shutdown)."""
        if self._deferred:
            await asyncio.gather(*self._deferred, return_exceptions=True)
        if self._urgent_flusher is not None:
            await asyncio.gather(self._urgent_flusher, return_exceptions=True)
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        if self._pending:
            batch, self._pending = self._pending, []
            await self.store.reconcile_many(batch)
        if self._reconciles:
            await asyncio.gather(*self._reconciles, return_exceptions=True)
        if self.access_log is not None:
            self.access_log.flush()


def _served_by(ctx: RequestContext, deployment: str) -> tuple[str, str] | None:
    """The tier of the plan's deployment that produced a usage record, and "true" when spillover moved a
    backend of this request behind it (the request went past a full backend), else "false". None for a
    record of no plan deployment."""
    spilled_past = ctx.route_plan.spilled if ctx.route_plan is not None else {}
    for target in ctx.plan:
        if target.label == deployment:
            moved = bool(spilled_past) and target.backend.name not in spilled_past
            return target.backend.tier, "true" if moved else "false"
    return None
