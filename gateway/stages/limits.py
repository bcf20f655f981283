"""Stage `limits`: rate limits, concurrency and budgets for the key, the tenant and the route, in one
call to the shared store (one Redis round trip), after `route` so that the token reservation
(prompt tokens + max_tokens) and the budget reservation (the worst-case price in the plan) are known.

The store's `Limits` for every (tenant, route) are built once per policy (`LimitTable`, from the
sections gateway.policy.compile picks). When only budgets refuse and the tenant's budgets say
`on_exhausted: downgrade`, the request switches to the downgrade plan the `route` stage's plan carries
(`RoutePlan.downgrade`) and is admitted against rates and concurrency only.

Failure modes (declared, tested): rate and concurrency limits fail open when the store is unreachable
(counted in `strait_limits_degraded_total`, logged at most once a second); budgets fall back to a
conservative per-replica share inside the store.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Final

from gateway.context import RequestContext
from gateway.errors import BudgetExceeded, InvalidRequest, RateLimited
from gateway.pipeline import RequestOnly
from gateway.policy.compile import BudgetScope, LimitSections
from gateway.policy.engine import RoutePlan
from gateway.policy.index import PolicyIndex
from gateway.policy.model import Budget, RateLimits
from gateway.stages.explain import Explain
from gateway.state import (
    AdmissionRequest,
    BudgetLimit,
    CheckResult,
    ConcurrencyLimit,
    Limits,
    RateLimit,
    Store,
)
from gateway.state.base import MAX_RESERVE_MICRO_USD, MAX_RESERVE_TOKENS, Admission, Scope
from gateway.telemetry import Metrics

log = logging.getLogger("strait.limits")

# Output tokens reserved against TPM and budgets when a request sets no max_tokens.
DEFAULT_RESERVE_TOKENS: Final = 1024
NO_LIMITS: Final = Limits()
BUDGET_HEADER: Final = "x-strait-budget"


def _rates(scope: Scope, r: RateLimits) -> tuple[list[RateLimit], list[ConcurrencyLimit]]:
    rates = []
    if r.requests_per_minute:
        rates.append(RateLimit(scope=scope, unit="requests", limit=r.requests_per_minute))
    if r.tokens_per_minute:
        rates.append(RateLimit(scope=scope, unit="tokens", limit=r.tokens_per_minute))
    if r.requests_per_day:
        rates.append(RateLimit(scope=scope, unit="requests", limit=r.requests_per_day, period_s=86_400))
    if r.tokens_per_day:
        rates.append(RateLimit(scope=scope, unit="tokens", limit=r.tokens_per_day, period_s=86_400))
    conc = [ConcurrencyLimit(scope=scope, limit=r.max_concurrency)] if r.max_concurrency is not None else []
    return rates, conc


def _budgets(scope: BudgetScope, b: Budget) -> list[BudgetLimit]:
    out = []
    if b.usd_per_day is not None:
        out.append(BudgetLimit(scope=scope, metric="usd", window="day", limit=round(b.usd_per_day * 1e6)))
    if b.usd_per_month is not None:
        out.append(BudgetLimit(scope=scope, metric="usd", window="month", limit=round(b.usd_per_month * 1e6)))
    if b.tokens_per_month is not None:
        out.append(BudgetLimit(scope=scope, metric="tokens", window="month", limit=b.tokens_per_month))
    return out


def store_limits(sections: LimitSections, *, with_budgets: bool = True) -> Limits:
    """The policy's limit sections for one (tenant, route) as the store's `Limits` (NO_LIMITS if none)."""
    rates: list[RateLimit] = []
    conc: list[ConcurrencyLimit] = []
    for scope, section in sections.rates:
        r, c = _rates(scope, section)
        rates += r
        conc += c
    budgets = [limit for scope, b in sections.budgets for limit in _budgets(scope, b)] if with_budgets else []
    if not rates and not conc and not budgets:
        return NO_LIMITS
    return Limits(rates=tuple(rates), concurrency=tuple(conc), budgets=tuple(budgets))


@dataclass(frozen=True, slots=True)
class _TenantLimits:
    # (with budgets, without budgets) by route name, for routes with a section of their own ...
    by_route: dict[str, tuple[Limits, Limits]]
    # ... and for every other route.
    default: tuple[Limits, Limits]


class LimitTable:
    """The store's `Limits` for every (tenant, route), built once per policy when the runtime is built
    (from gateway.policy.compile's sections), so a request only looks them up. The variant without
    budgets is for a request moved to the downgrade route: its budget is spent, only rates apply."""

    def __init__(self, index: PolicyIndex) -> None:
        # Converted once per distinct set of sections: tenants mostly share limits, and a policy of
        # thousands of tenants is built on the event loop when it is reloaded.
        converted: dict[LimitSections, tuple[Limits, Limits]] = {}

        def both(sections: LimitSections) -> tuple[Limits, Limits]:
            found = converted.get(sections)
            if found is None:
                found = converted[sections] = (store_limits(sections), store_limits(sections, with_budgets=False))
            return found

        self._tenants = {
            name: _TenantLimits(
                by_route={route: both(s) for route, s in tables.route_limits.items()}, default=both(tables.limits)
            )
            for name, tables in index.tenant_tables.items()
        }

    def get(self, tenant: str, route: str, *, with_budgets: bool = True) -> Limits | None:
        """None for a tenant the policy does not name (the open tenant of a policy without keys)."""
        t = self._tenants.get(tenant)
        if t is None:
            return None
        pair = t.by_route.get(route, t.default)
        return pair[0] if with_budgets else pair[1]


def _duration(ms: int) -> str:
    """OpenAI's reset format: `20ms`, `1s`, `6m0s`."""
    if ms < 1000:
        return f"{ms}ms"
    seconds = math.ceil(ms / 1000)
    return f"{seconds // 60}m{seconds % 60}s" if seconds >= 60 else f"{seconds}s"


def _tighter(check: CheckResult, best: CheckResult | None) -> bool:
    """Whether `check` is the one to report: fewer left, or as few and resetting later."""
    return (
        best is None
        or check.remaining < best.remaining
        or (check.remaining == best.remaining and check.reset_ms > best.reset_ms)
    )


def rate_headers(admission: Admission, headers: dict[str, str] | None = None) -> dict[str, str]:
    """OpenAI's `x-ratelimit-*` headers from each unit's binding rate check (`Admission.headline`: least
    remaining, then longest reset), requests first; added to `headers` when given. One pass over the checks
    for both units (what the two `headline` calls find, in the same order)."""
    out: dict[str, str] = {} if headers is None else headers
    requests: CheckResult | None = None
    tokens: CheckResult | None = None
    for c in admission.checks:
        lim = c.limit
        if not isinstance(lim, RateLimit):
            continue
        if lim.unit == "requests":
            if _tighter(c, requests):
                requests = c
        elif _tighter(c, tokens):
            tokens = c
    if requests is not None:
        out["x-ratelimit-limit-requests"] = str(requests.limit.limit)
        out["x-ratelimit-remaining-requests"] = str(requests.remaining) if requests.remaining > 0 else "0"
        out["x-ratelimit-reset-requests"] = _duration(requests.reset_ms)
    if tokens is not None:
        out["x-ratelimit-limit-tokens"] = str(tokens.limit.limit)
        out["x-ratelimit-remaining-tokens"] = str(tokens.remaining) if tokens.remaining > 0 else "0"
        out["x-ratelimit-reset-tokens"] = _duration(tokens.reset_ms)
    return out


class LimitsStage(RequestOnly):
    name = "limits"

    def __init__(self, index: PolicyIndex, store: Store, metrics: Metrics, explain: Explain) -> None:
        self.limits = LimitTable(index)
        self.store = store
        self.metrics = metrics
        # Records the downgrade plan's decision when a spent budget switches to it.
        self.explain = explain
        self._last_degraded_log = 0.0

    async def on_request(self, ctx: RequestContext) -> None:
        principal, plan = ctx.principal, ctx.route_plan
        if principal is None or plan is None:
            return
        limits = self.limits.get(principal.tenant, plan.route.name)
        if limits is None:
            return  # an open policy (no tenants) has no limits
        admission = await self._admit(ctx, limits)
        result = "allowed"
        if not admission.allowed:
            denied = admission.denied_by
            if all(isinstance(c.limit, BudgetLimit) for c in denied):
                downgrade = plan.downgrade
                if downgrade is None:
                    self._count(ctx, "budget")
                    raise BudgetExceeded(_budget_refusal(denied), headers={"x-should-retry": "false"})
                result = "downgraded"
                # The budget is spent and the tenant downgrades: the plan decided with the request's.
                self._switch(ctx, downgrade)
                limits = self.limits.get(principal.tenant, downgrade.route.name, with_budgets=False)
                assert limits is not None
                admission = await self._admit(ctx, limits)
        if not admission.allowed:
            what = ", ".join(f"{c.limit.scope} {_limit_text(c)}" for c in admission.denied_by)
            self._count(ctx, _refusal_kind(admission))
            if any(not c.fits for c in admission.denied_by):
                # Larger than the limit's whole capacity: waiting will never help (OpenAI's "Request too large").
                raise RateLimited(
                    f"Request too large: it needs {ctx.prompt_tokens.bound()} prompt tokens plus its max_tokens, more than "
                    f"the limit allows at once ({what}). Lower max_tokens or shorten the prompt.",
                    code="request_too_large",
                    headers={"x-should-retry": "false", **rate_headers(admission)},
                )
            retry_s = max(1, math.ceil(admission.retry_after_ms / 1000)) if admission.retry_after_ms else 1
            raise RateLimited(
                f"Rate limit reached ({what}). Retry after {retry_s} s.",
                headers={"retry-after": str(min(retry_s, 120)), **rate_headers(admission)},
            )
        ctx.ticket = admission.ticket
        ctx.release_can_wait = release_can_wait(admission)
        rate_headers(admission, ctx.extra_headers)
        self._count(ctx, "degraded" if admission.degraded else result)

    def _count(self, ctx: RequestContext, result: str) -> None:
        self.metrics.child(self.metrics.limit_decisions, ctx.route_name, result).inc()

    def _switch(self, ctx: RequestContext, plan: RoutePlan) -> None:
        """The request continues on the downgrade plan: everything after this stage (upstream, accounting,
        metrics, explain) sees the route that finally answers."""
        ctx.route_name = plan.requested
        ctx.route = plan.route
        ctx.plan = plan.targets
        ctx.route_plan = plan
        ctx.extra_headers[BUDGET_HEADER] = "downgraded"
        if self.explain.asked(ctx):
            self.explain.record(ctx, plan)

    async def _admit(self, ctx: RequestContext, limits: Limits) -> Admission:
        assert ctx.route is not None and ctx.principal is not None
        if limits is NO_LIMITS:
            return Admission(allowed=True)
        request = ctx.request
        assert request is not None
        out = request.max_output_tokens or DEFAULT_RESERVE_TOKENS
        # Every generated choice costs output tokens: `n` returned, `best_of` generated (legacy completions).
        out *= max(1, request.n or 1, request.best_of or 1)
        # Tokenized only for a token limit or a budget: request and concurrency limits never read it.
        prompt = await ctx.prompt_tokens.count() if limits.budgets or _counts_tokens(limits) else 0
        tokens = prompt + out
        if tokens > MAX_RESERVE_TOKENS:
            # max_tokens and n were range-checked at decode; their product can still be past what one
            # admission can reserve exactly. A client's input, so a 400 rather than a failed store call.
            raise InvalidRequest(
                f"This request would reserve {tokens} tokens (prompt tokens + max_tokens x n), more than the "
                f"{MAX_RESERVE_TOKENS} one request may reserve. Lower max_tokens or n.",
                param=request.output_tokens_field,
                code="request_too_large",
            )
        plan = ctx.plan
        if len(plan) == 1:
            worst = plan[0].rates.worst_micro_usd(prompt, out)
        else:
            worst = max((t.rates.worst_micro_usd(prompt, out) for t in plan), default=0)
        if worst > MAX_RESERVE_MICRO_USD:
            raise InvalidRequest(
                f"This request's worst-case cost ({worst / 1e6:.0f} USD) is more than one request may reserve. "
                "Lower max_tokens or n.",
                param=request.output_tokens_field,
                code="request_too_large",
            )
        started = time.perf_counter()
        admission = await self.store.admit(
            AdmissionRequest(
                request_id=ctx.request_id,
                tenant=ctx.principal.tenant,
                key=ctx.principal.key_id,
                route=ctx.route.name,
                limits=limits,
                tokens=tokens,
                cost_micro_usd=worst,
            )
        )
        self.metrics.child(self.metrics.state_latency, "admit").observe(time.perf_counter() - started)
        if admission.degraded:
            self.metrics.limits_degraded.inc()
            now = time.monotonic()
            if now - self._last_degraded_log >= 1.0:
                self._last_degraded_log = now
                log.warning("state store unreachable: rate limits open, budgets on the local share")
        return admission


# A slot release may wait for the next batched reconcile (up to accounting.RECONCILE_EVERY_S) only while at
# least this many slots, and at least half of the limit, were still free after the admission (and only for
# a request that ended soon after it: accounting.RELEASE_CAN_WAIT_FOR_S).
SLOT_ROOM_MIN: Final = 4


def release_can_wait(admission: Admission) -> bool:
    """Whether this request's concurrency slots can be given back with the batched reconciles instead of
    before its answer's last byte. The answer's end waits for an urgent release so that a client sending
    one request at a time never finds its own previous one still holding a slot (on any replica); that
    can only refuse it when the limit is nearly reached. With half the slots and SLOT_ROOM_MIN free after
    this admission, the slot held a few milliseconds longer refuses nobody unless the tenant's requests
    in flight double between the admission and the release: the release then costs no wait and no extra
    round trip. What the admission saw ages with the request, so accounting batches only the releases of
    requests that ended within accounting.RELEASE_CAN_WAIT_FOR_S (a long stream's release is awaited, as before).
    A degraded admission reports no concurrency check (the store was not asked): its release stays urgent."""
    found = False
    for check in admission.checks:
        limit = check.limit
        if isinstance(limit, ConcurrencyLimit):
            if check.remaining < SLOT_ROOM_MIN or check.remaining * 2 < limit.limit:
                return False
            found = True
    return found


def _refusal_kind(admission: Admission) -> str:
    """The metric's result for a refusal: what a dashboard needs to tell apart (bounded labels)."""
    denied = admission.denied_by
    if any(not c.fits for c in denied):
        return "too_large"
    if any(isinstance(c.limit, ConcurrencyLimit) for c in denied):
        return "concurrency"
    if all(isinstance(c.limit, BudgetLimit) for c in denied):
        return "budget"
    return "rate_limited"


def _counts_tokens(limits: Limits) -> bool:
    return any(r.unit == "tokens" for r in limits.rates)


def _limit_text(c: CheckResult) -> str:
    lim = c.limit
    if isinstance(lim, RateLimit):
        return f"{lim.limit} {lim.unit} per {lim.period_s}s"
    if isinstance(lim, ConcurrencyLimit):
        return f"{lim.limit} concurrent requests"
    return _budget_text(c)


def _budget_text(c: CheckResult) -> str:
    lim = c.limit
    assert isinstance(lim, BudgetLimit)
    amount = f"{lim.limit / 1e6:.2f} USD" if lim.metric == "usd" else f"{lim.limit} tokens"
    return f"{lim.scope} budget of {amount} per {lim.window}"


def _budget_refusal(denied: tuple[CheckResult, ...]) -> str:
    """Spent, or not spent but this request's worst case does not fit in what is left: different advice."""
    spent = [c for c in denied if c.remaining <= 0]
    if spent:
        return "Your budget is exhausted: " + "; ".join(_budget_text(c) for c in spent) + "."
    left = "; ".join(f"{_budget_text(c)} has {_amount(c, c.remaining)} left" for c in denied)
    return (
        f"This request could cost more than your budget has left ({left}): lower max_tokens (or n), "
        "or wait for the budget window to reset."
    )


def _amount(c: CheckResult, value: int) -> str:
    lim = c.limit
    assert isinstance(lim, BudgetLimit)
    return f"{value / 1e6:.4f} USD" if lim.metric == "usd" else f"{value} tokens"
