"""Small builders shared by the state tests."""

from __future__ import annotations

import itertools

from gateway.state import AdmissionRequest, BudgetLimit, ConcurrencyLimit, Limits, RateLimit
from gateway.state.base import BudgetMetric, BudgetScope, BudgetWindow, Scope

_rid = itertools.count()


def rid() -> str:
    return f"req-{next(_rid)}"


def request(
    limits: Limits,
    *,
    tenant: str = "acme",
    key: str = "k1",
    route: str = "chat",
    tokens: int = 0,
    cost: int = 0,
    lease_s: float = 300.0,
    request_id: str | None = None,
) -> AdmissionRequest:
    return AdmissionRequest(
        request_id=request_id or rid(),
        tenant=tenant,
        key=key,
        route=route,
        limits=limits,
        tokens=tokens,
        cost_micro_usd=cost,
        lease_s=lease_s,
    )


def rpm(limit: int, scope: Scope = "key", *, period_s: int = 60, burst: int = 0) -> RateLimit:
    return RateLimit(scope=scope, unit="requests", limit=limit, period_s=period_s, burst=burst)


def tpm(limit: int, scope: Scope = "key", *, period_s: int = 60, burst: int = 0) -> RateLimit:
    return RateLimit(scope=scope, unit="tokens", limit=limit, period_s=period_s, burst=burst)


def slots(limit: int, scope: Scope = "key") -> ConcurrencyLimit:
    return ConcurrencyLimit(scope=scope, limit=limit)


def budget(
    limit: int, scope: BudgetScope = "tenant", metric: BudgetMetric = "usd", window: BudgetWindow = "day"
) -> BudgetLimit:
    return BudgetLimit(scope=scope, metric=metric, window=window, limit=limit)
