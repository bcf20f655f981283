"""The shared-state contract: what the limits stage asks of a store, and what it gets back.

One admission is one call: every rate, concurrency and budget check of a request is decided together,
all-or-nothing (if any check denies, nothing is consumed). An admitted request gets a `Ticket`; the
reconcile call hands it back with the actual usage, which releases the unused token reservation, the
concurrency slots and the budget reservation. Money is integer micro-USD throughout.

Two implementations honour this contract (`MemoryStore`, `RedisStore`) and one suite tests both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, Protocol

import msgspec

Scope = Literal["key", "tenant", "route"]
RateUnit = Literal["requests", "tokens"]
BudgetScope = Literal["key", "tenant"]
BudgetMetric = Literal["usd", "tokens"]
BudgetWindow = Literal["day", "month"]
BreakerState = Literal["closed", "open", "half-open"]
StoreKind = Literal["memory", "redis", "redis-cluster"]

# Milliseconds since the Unix epoch (wall clock: budget windows are calendar days and months, UTC).
Clock = Callable[[], int]

# Every integer a script multiplies stays below 2**52 so Lua's doubles compute what Python's ints do.
_MAX_SCALED = 2**50
# The most tokens one admission may reserve: token rates are computed exactly in milliseconds over a day.
MAX_RESERVE_TOKENS = (2**52 - 1) // 86_400_000
# The most micro-USD one admission may reserve.
MAX_RESERVE_MICRO_USD = _MAX_SCALED - 1


class StoreConfigError(ValueError):
    """The state URL or limits cannot work as configured; raised at start-up, never per request."""


class RateLimit(msgspec.Struct, frozen=True, kw_only=True):
    """`limit` units per `period_s` (GCRA): smooth refill, bursting up to `burst` units (default: `limit`)."""

    scope: Scope
    unit: RateUnit
    limit: int
    period_s: int = 60
    # 0 means "equal to limit": an idle key may spend its whole period's allowance at once, never more.
    burst: int = 0

    def __post_init__(self) -> None:
        if self.limit < 1 or not 1 <= self.period_s <= 86_400 or self.burst < 0:
            raise StoreConfigError(f"rate limit needs limit >= 1, 1 <= period_s <= 86400, burst >= 0: {self}")
        if self.capacity * self.period_ms >= _MAX_SCALED:
            raise StoreConfigError(f"rate limit too large to compute exactly: {self}")

    @property
    def capacity(self) -> int:
        return self.burst or self.limit

    @property
    def period_ms(self) -> int:
        return self.period_s * 1000


class ConcurrencyLimit(msgspec.Struct, frozen=True, kw_only=True):
    """At most `limit` requests in flight; a slot is held until reconcile or until its lease expires."""

    scope: Scope
    limit: int

    def __post_init__(self) -> None:
        if self.limit < 0:
            raise StoreConfigError(f"concurrency limit must be >= 0: {self}")


class BudgetLimit(msgspec.Struct, frozen=True, kw_only=True):
    """A spending cap per UTC day or month: micro-USD (`usd`) or tokens (`tokens`)."""

    scope: BudgetScope
    metric: BudgetMetric
    window: BudgetWindow
    limit: int

    def __post_init__(self) -> None:
        if self.limit < 0 or self.limit >= _MAX_SCALED:
            raise StoreConfigError(f"budget limit out of range: {self}")


Limit = RateLimit | ConcurrencyLimit | BudgetLimit


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """Every limit that applies to one (tenant, key, route); built once from policy, reused per request."""

    rates: tuple[RateLimit, ...] = ()
    concurrency: tuple[ConcurrencyLimit, ...] = ()
    budgets: tuple[BudgetLimit, ...] = ()

    @property
    def needs_ticket(self) -> bool:
        """Whether an admission leaves anything to reconcile (tokens, slots or budget reservations)."""
        if self.concurrency or self.budgets:
            return True
        for r in self.rates:  # noqa: SIM110 - a loop is cheaper than any() over a generator on the hot path
            if r.unit == "tokens":
                return True
        return False


# The per-request values below (a request, its checks, ticket and verdict) are made on every admission and
# reconcile: gc=False keeps them out of the cyclic collector (they are immutable and hold no cycle).


class AdmissionRequest(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    request_id: str
    tenant: str
    key: str
    route: str
    limits: Limits
    # Reserved against token rates and token budgets: prompt tokens + max_tokens (the worst case).
    tokens: int = 0
    # Reserved against USD budgets: the worst-case cost of `tokens`, in micro-USD.
    cost_micro_usd: int = 0
    # How long slots and budget reservations survive without reconcile/renew (a dead replica's orphans).
    lease_s: float = 300.0

    def __post_init__(self) -> None:
        if self.tokens < 0 or self.cost_micro_usd < 0 or self.lease_s <= 0:
            raise ValueError(f"tokens and cost must be >= 0 and lease_s > 0: {self.request_id}")
        if self.tokens > MAX_RESERVE_TOKENS or self.cost_micro_usd > MAX_RESERVE_MICRO_USD:
            raise ValueError(f"tokens or cost too large: {self.request_id}")

    @property
    def lease_ms(self) -> int:
        return max(1, int(self.lease_s * 1000))


class CheckResult(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One limit's verdict, with what OpenAI-style headers need.

    - rate: `remaining` units, `reset_ms` until the bucket is full again.
    - concurrency: `remaining` free slots, `reset_ms` 0.
    - budget: `remaining` micro-USD or tokens (may be negative when overspent), `reset_ms` until the window ends.
    On denial `retry_after_ms` is the wait (rates: exact to the ms, so `ceil(ms / 1000)` seconds is within
    1 s above the true wait; concurrency: a 1 s hint; budgets: the window's end). `fits` is False when
    this request can never pass the limit (it costs more than the limit's whole capacity).
    """

    limit: Limit
    allowed: bool
    remaining: int
    reset_ms: int
    retry_after_ms: int = 0
    fits: bool = True


class Ticket(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """What `reconcile`/`renew` need: the request as admitted and the budget windows it reserved in."""

    request: AdmissionRequest
    day: str
    month: str
    # Admitted by the per-replica fallback while the shared store was unreachable; reconciled locally.
    local: bool = False


class Admission(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    allowed: bool
    # The shared store was unreachable: rate and concurrency checks were skipped (fail open) and
    # budgets were checked against this replica's conservative local share. Count it in a metric.
    degraded: bool = False
    # One per limit in `Limits` order (rates, concurrency, budgets); when degraded, budgets only.
    checks: tuple[CheckResult, ...] = ()
    # Present when allowed and there is something to reconcile; pass it to `Store.reconcile`.
    ticket: Ticket | None = None

    @property
    def denied_by(self) -> tuple[CheckResult, ...]:
        return tuple(c for c in self.checks if not c.allowed)

    @property
    def retry_after_ms(self) -> int:
        """The longest wait among denying checks that can pass later (0 when allowed or none can)."""
        return max((c.retry_after_ms for c in self.checks if not c.allowed and c.fits), default=0)

    def headline(self, unit: RateUnit) -> CheckResult | None:
        """The binding rate check of a unit (least remaining, then longest reset) for `x-ratelimit-*`."""
        best: CheckResult | None = None
        for c in self.checks:
            if (
                isinstance(c.limit, RateLimit)
                and c.limit.unit == unit
                and (best is None or (c.remaining, -c.reset_ms) < (best.remaining, -best.reset_ms))
            ):
                best = c
        return best


class Usage(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """What the request actually cost: prompt + completion tokens, and micro-USD."""

    tokens: int
    cost_micro_usd: int = 0


class Reconciliation(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    # False when nothing was applied: a duplicate call, an expired ticket, or the store unreachable.
    applied: bool
    degraded: bool = False


class StoreStatus(msgspec.Struct, frozen=True, kw_only=True):
    kind: StoreKind
    # Whether replicas share these limits; False for `memory` (per process).
    shared: bool
    breaker: BreakerState = "closed"
    # Calls that failed (timeout, refused, error), calls skipped while the breaker was open, and calls
    # that found every connection busy until the deadline (this process overloaded; not a breaker input).
    failures: int = 0
    skipped: int = 0
    saturated: int = 0


class Store(Protocol):
    """Rate limits, concurrency slots and budgets, shared by every replica (or not: see `status().shared`)."""

    async def admit(self, request: AdmissionRequest) -> Admission: ...

    async def reconcile(self, ticket: Ticket, usage: Usage) -> Reconciliation: ...

    async def reconcile_many(self, items: Sequence[tuple[Ticket, Usage]]) -> int:
        """Reconcile a batch in one round trip where the store can (one Redis pipeline); returns how
        many were applied. Each item is idempotent, exactly as `reconcile`."""
        ...

    async def renew(self, ticket: Ticket, lease_s: float) -> bool:
        """Extend a long request's slots and reservations; False if the ticket is gone or unreachable."""
        ...

    async def ping(self) -> bool: ...

    async def check_epoch(self) -> bool:
        """True when the store came back empty since the last check (restarted without persistence:
        every counter, slot and budget it held is gone). Cheap; called every few seconds."""
        ...

    def status(self) -> StoreStatus: ...

    async def close(self) -> None: ...
