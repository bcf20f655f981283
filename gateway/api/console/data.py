"""What each console page shows, as typed documents: the JSON at `/admin/api/...` and the HTML pages are both
rendered from these (docs/console.md), read from what the gateway already holds (its metrics registry, live
signals, usage ledger, policy index, recent decisions, reloader). Nothing here reveals a key, a digest or a
backend's secret: keys by id only, backends by name and declared facts (no URL, no api_key reference).
"""

from __future__ import annotations

import datetime as dt
import time
from collections import defaultdict

import msgspec

from gateway.accounting.ledger import LedgerUnavailable
from gateway.api.console import metrics_view
from gateway.api.console.history import SpillHistory, SpillPoint
from gateway.api.console.metrics_view import RouteFigures
from gateway.policy.engine import Decision
from gateway.reload import PolicyReloader
from gateway.runtime import Gateway
from gateway.stages.recent import RecentDecision

# Decisions listed by a search at most.
MAX_LISTED = 200


class Alert(msgspec.Struct, kw_only=True):
    name: str
    detail: str


class TenantSpend(msgspec.Struct, kw_only=True):
    tenant: str
    requests: int
    cost_usd: float
    budget_usd_per_day: float | None


class Overview(msgspec.Struct, kw_only=True):
    policy_version: str
    started_at: int
    in_flight: int
    requests: int
    errors: int
    # Requests answered with an error, refusals before any upstream included (strait_refusals_total).
    refused: int
    # Shares in [0, 1]; None when nothing was served (or looked up) yet.
    spillover_share: float | None
    cache_hit_rate: float | None
    served_by_tier: dict[str, int]
    # Answers by tier per minute over the last hour (the last point: the minute under way).
    spill_history: list[SpillPoint]
    routes: list[RouteFigures]
    spend_today: list[TenantSpend] | None
    ledger_error: str | None
    alerts: list[Alert]
    day: str


class DecisionSummary(msgspec.Struct, kw_only=True):
    ts: float
    request_id: str
    client_request_id: str | None
    decision_id: str
    tenant: str
    route: str
    choice: str


class DecisionSearch(msgspec.Struct, kw_only=True):
    q: str
    tenant: str
    route: str
    kept: int
    data: list[DecisionSummary]


class DecisionDetail(msgspec.Struct, kw_only=True):
    summary: DecisionSummary
    # None for a refused request (no table: the refusal is in summary.choice).
    decision: Decision | None


class TenantView(msgspec.Struct, kw_only=True):
    name: str
    key_ids: list[str]
    allowed_routes: list[str]
    explain: bool
    limits: dict[str, dict[str, int | None]]
    budget_usd_per_day: float | None
    budget_usd_per_month: float | None
    on_exhausted: str
    requests_today: int | None
    tokens_today: int | None
    spend_today_usd: float | None
    spend_month_usd: float | None
    refusals: dict[str, int]


class Tenants(msgspec.Struct, kw_only=True):
    day: str
    month_start: str
    ledger_error: str | None
    data: list[TenantView]
    # Refusals before authentication (no tenant known): by code.
    unauthenticated_refusals: dict[str, int]


class DeploymentView(msgspec.Struct, kw_only=True):
    label: str
    model: str
    ejected: bool
    latency_ewma_ms: float | None
    ttft_ewma_ms: float | None
    tokens_per_s: float | None
    price_input_per_mtok: float | None
    price_output_per_mtok: float | None


class BackendView(msgspec.Struct, kw_only=True):
    name: str
    adapter: str
    tier: str
    healthy: bool
    ejected_for_s: float | None
    ejection_reason: str | None
    in_flight: int
    max_concurrency: int | None
    utilisation: float | None
    utilisation_source: str
    queue: int | None
    spilling_on: list[str]
    operator: str | None
    operator_country: str | None
    region: str | None
    jurisdiction: str | None
    retention_days: int | None
    trains_on_data: bool | None
    certifications: list[str]
    hardware: str | None
    commitment: str
    attempts: dict[str, int]
    deployments: list[DeploymentView]


class EjectionEvent(msgspec.Struct, kw_only=True):
    ts: float
    # A backend, or a deployment (model@backend).
    key: str
    reason: str
    seconds: float


class Backends(msgspec.Struct, kw_only=True):
    data: list[BackendView]
    # This replica's last ejections, newest first.
    ejections: list[EjectionEvent]


class PolicyStatus(msgspec.Struct, kw_only=True):
    version: str
    path: str
    loaded_at: float
    last_reload_ok: bool
    last_rejected_at: float | None
    last_rejected_errors: list[str]
    routes: int
    backends: int
    tenants: int


def _today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


def _share(part: int, whole: int) -> float | None:
    return None if whole <= 0 else round(part / whole, 4)


async def _spend(
    gateway: Gateway, tenants: list[str], since: dt.date, until: dt.date
) -> dict[str, tuple[int, int, float]]:
    """tenant -> (requests, tokens, cost USD) over the days, from the ledger (what /admin/usage reads)."""
    rows = await gateway.ledger.totals(tenants, since, until, "route")
    out: dict[str, tuple[int, int, float]] = {}
    for row in rows:
        n, tokens, cost = out.get(row.tenant, (0, 0, 0))
        out[row.tenant] = (
            n + row.requests,
            tokens + row.prompt_tokens + row.completion_tokens,
            cost + row.cost_micro_usd,
        )
    return {t: (n, tok, round(micro / 1e6, 6)) for t, (n, tok, micro) in out.items()}


def _tenant_names(gateway: Gateway) -> list[str]:
    index = gateway.runtime.index
    return sorted(index.tenants) or [index.open_tenant.name]


async def overview(gateway: Gateway, reloader: PolicyReloader, history: SpillHistory | None = None) -> Overview:
    index = gateway.runtime.index
    routes = metrics_view.route_figures(gateway.metrics, index.routes)
    served: dict[str, int] = defaultdict(int)
    for r in routes:
        for tier, n in r.served_by_tier.items():
            served[tier] += n
    today = _today()
    names = _tenant_names(gateway)
    spend: list[TenantSpend] | None
    ledger_error = None
    try:
        by_tenant = await _spend(gateway, names, today, today)
    except LedgerUnavailable:
        spend, ledger_error, by_tenant = None, "the usage ledger is not readable right now", {}
    budgets = {t.name: t.budgets.tenant.usd_per_day for t in index.policy.tenants}
    spend = [
        TenantSpend(
            tenant=t,
            requests=by_tenant.get(t, (0, 0, 0.0))[0],
            cost_usd=by_tenant.get(t, (0, 0, 0.0))[2],
            budget_usd_per_day=budgets.get(t),
        )
        for t in names
    ]
    if ledger_error is not None:
        spend = None
    return Overview(
        policy_version=index.version,
        started_at=gateway.started_at,
        in_flight=gateway.inflight.count,
        requests=sum(r.requests for r in routes),
        errors=sum(r.errors for r in routes),
        refused=sum(sum(codes.values()) for codes in metrics_view.refusals_by_tenant(gateway.metrics).values()),
        spillover_share=_share(sum(r.spilled for r in routes), sum(served.values())),
        cache_hit_rate=_share(sum(r.cache_hits for r in routes), sum(r.cache_lookups for r in routes)),
        served_by_tier=dict(sorted(served.items())),
        spill_history=[] if history is None else history.points(),
        routes=routes,
        spend_today=spend,
        ledger_error=ledger_error,
        alerts=alerts(gateway, reloader, spend or []),
        day=today.isoformat(),
    )


def alerts(gateway: Gateway, reloader: PolicyReloader, spend: list[TenantSpend]) -> list[Alert]:
    """The conditions of docker/prometheus/alerts.yaml that need no rate window, judged on this replica now."""
    out: list[Alert] = []
    if reloader.last_rejected is not None and reloader.last_rejected.at > reloader.loaded_at:
        out.append(
            Alert(
                name="StraitPolicyReloadFailing",
                detail="the last reload was refused: the running policy is older than its files",
            )
        )
    live = gateway.signals.snapshot(time.monotonic())
    for (route, _op), targets in sorted(gateway.runtime.index.targets.items()):
        if targets and all(t.backend.name in live.unhealthy or t.label in live.unhealthy for t in targets):
            out.append(
                Alert(name="StraitRouteAllUpstreamsEjected", detail=f"every deployment of route {route} is ejected")
            )
    status = gateway.store.status()
    if status.breaker == "open":
        out.append(Alert(name="StraitRedisUnreachable", detail="the state store's breaker is open: limits fail open"))
    if gateway.writer.spool.size() > 0:
        out.append(
            Alert(name="StraitUsageSpoolGrowing", detail="usage records are spooled to disk: the ledger is unreachable")
        )
    if gateway.writer.spool.dropped:
        out.append(
            Alert(
                name="StraitUsageRecordsDropped",
                detail=f"{gateway.writer.spool.dropped} usage records dropped (spool full)",
            )
        )
    cap = gateway.runtime.index.policy.server.shedding.max_in_flight
    if cap and gateway.inflight.count >= 0.9 * cap:
        out.append(Alert(name="StraitGatewaySaturated", detail=f"{gateway.inflight.count} requests in flight of {cap}"))
    for s in spend:
        if s.budget_usd_per_day and s.cost_usd >= 0.8 * s.budget_usd_per_day:
            out.append(
                Alert(
                    name="StraitTenantBudgetBurn",
                    detail=f"tenant {s.tenant} spent {s.cost_usd:.4f} of {s.budget_usd_per_day:g} USD today",
                )
            )
    return out


def _summary(entry: RecentDecision) -> DecisionSummary:
    return DecisionSummary(
        ts=entry.ts,
        request_id=entry.request_id,
        client_request_id=entry.client_request_id,
        decision_id=entry.decision_id,
        tenant=entry.tenant,
        route=entry.route,
        choice=entry.choice,
    )


def search_decisions(gateway: Gateway, q: str = "", tenant: str = "", route: str = "") -> DecisionSearch:
    """Newest first; `q` matches a request id, decision id or client x-request-id (exactly or as a prefix)."""
    ring = gateway.services.recent
    found: list[DecisionSummary] = []
    if ring is not None:
        for entry in ring.newest_first():
            if tenant and entry.tenant != tenant:
                continue
            if route and entry.route != route:
                continue
            if q and not any(
                v is not None and v.startswith(q)
                for v in (entry.request_id, entry.decision_id, entry.client_request_id)
            ):
                continue
            found.append(_summary(entry))
            if len(found) >= MAX_LISTED:
                break
    return DecisionSearch(q=q, tenant=tenant, route=route, kept=0 if ring is None else len(ring), data=found)


def decision_detail(gateway: Gateway, request_id: str) -> DecisionDetail | None:
    ring = gateway.services.recent
    entry = None if ring is None else ring.find(request_id)
    if entry is None:
        return None
    return DecisionDetail(summary=_summary(entry), decision=entry.decision)


async def tenants(gateway: Gateway) -> Tenants:
    index = gateway.runtime.index
    today = _today()
    month_start = today.replace(day=1)
    names = _tenant_names(gateway)
    ledger_error = None
    try:
        day = await _spend(gateway, names, today, today)
        month = await _spend(gateway, names, month_start, today)
    except LedgerUnavailable:
        ledger_error, day, month = "the usage ledger is not readable right now", {}, {}
    refusals = metrics_view.refusals_by_tenant(gateway.metrics)
    by_name = {t.name: t for t in index.policy.tenants}
    views = []
    for name in names:
        t = by_name.get(name)
        spent_day = day.get(name)
        spent_month = month.get(name)
        limits: dict[str, dict[str, int | None]] = {}
        if t is not None:
            for scope, rl in (
                ("tenant", t.limits.tenant),
                ("per_key", t.limits.per_key),
                *sorted(t.limits.routes.items()),
            ):
                limits[scope] = {k: v for k, v in msgspec.structs.asdict(rl).items() if v is not None}
        views.append(
            TenantView(
                name=name,
                key_ids=[k.id for k in t.keys] if t is not None else [],
                allowed_routes=list(t.allowed_routes) if t is not None else ["*"],
                explain=bool(t is not None and t.explain),
                limits={k: v for k, v in limits.items() if v},
                budget_usd_per_day=None if t is None else t.budgets.tenant.usd_per_day,
                budget_usd_per_month=None if t is None else t.budgets.tenant.usd_per_month,
                on_exhausted="block" if t is None else t.budgets.on_exhausted,
                requests_today=None if ledger_error else (spent_day or (0, 0, 0.0))[0],
                tokens_today=None if ledger_error else (spent_day or (0, 0, 0.0))[1],
                spend_today_usd=None if ledger_error else (spent_day or (0, 0, 0.0))[2],
                spend_month_usd=None if ledger_error else (spent_month or (0, 0, 0.0))[2],
                refusals=dict(sorted(refusals.get(name, {}).items())),
            )
        )
    return Tenants(
        day=today.isoformat(),
        month_start=month_start.isoformat(),
        ledger_error=ledger_error,
        data=views,
        unauthenticated_refusals=dict(sorted(refusals.get("-", {}).items())),
    )


def backends(gateway: Gateway) -> Backends:
    index = gateway.runtime.index
    signals = gateway.signals
    now = time.monotonic()
    live = signals.snapshot(now)
    attempts: dict[str, dict[str, int]] = defaultdict(dict)
    for labels, value in metrics_view.Samples(gateway.metrics).rows("strait_upstream_attempts_total"):
        attempts[labels["backend"]][labels["outcome"]] = int(value)
    deployments: dict[str, list[DeploymentView]] = defaultdict(list)
    seen: set[str] = set()
    for targets in index.targets.values():
        for t in targets:
            if t.label in seen:
                continue
            seen.add(t.label)
            price = t.deployment.price
            deployments[t.backend.name].append(
                DeploymentView(
                    label=t.label,
                    model=t.model.name,
                    ejected=t.label in live.unhealthy,
                    latency_ewma_ms=_round(live.latency_ms.get(t.label)),
                    ttft_ewma_ms=_round(live.ttft_ms.get(t.label)),
                    tokens_per_s=_round(live.tokens_per_s.get(t.label)),
                    price_input_per_mtok=None if price is None else price.input_per_mtok,
                    price_output_per_mtok=None if price is None else price.output_per_mtok,
                )
            )
    out = []
    for b in index.policy.backends:
        in_flight = live.in_flight.get(b.name, 0)
        cap = b.capacity.max_concurrency
        if b.name in live.utilisation:
            utilisation: float | None = live.utilisation[b.name]
            source = "engine"
        elif cap:
            utilisation, source = in_flight / cap, "stale" if b.name in live.stale else "in-flight"
        else:
            utilisation, source = None, "unknown"
        until = signals.outliers.ejected.get(b.name)
        operator = index.operators.get(b.hosting.operator) if b.hosting.operator else None
        out.append(
            BackendView(
                name=b.name,
                adapter=b.adapter,
                tier=b.tier,
                healthy=b.name not in live.unhealthy,
                ejected_for_s=None if until is None else round(max(0.0, until - now), 1),
                ejection_reason=signals.outliers.reason(b.name) if until is not None else None,
                in_flight=in_flight,
                max_concurrency=cap,
                utilisation=None if utilisation is None else round(utilisation, 4),
                utilisation_source=source,
                queue=live.queue.get(b.name),
                spilling_on=sorted(route for route, backend in live.spilling if backend == b.name),
                operator=b.hosting.operator,
                operator_country=None if operator is None else operator.headquarters,
                region=b.hosting.region,
                jurisdiction=b.hosting.jurisdiction,
                retention_days=b.hosting.retention_days,
                trains_on_data=b.hosting.trains_on_data,
                certifications=list(b.hosting.certifications),
                hardware=None if b.hardware is None else b.hardware.describe(),
                commitment=b.capacity.commitment,
                attempts=dict(sorted(attempts.get(b.name, {}).items())),
                deployments=sorted(deployments.get(b.name, []), key=lambda d: d.label),
            )
        )
    history = [
        EjectionEvent(ts=ts, key=key, reason=reason, seconds=round(seconds, 1))
        for ts, key, reason, seconds in reversed(signals.ejections)
    ]
    return Backends(data=out, ejections=history)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def policy_status(gateway: Gateway, reloader: PolicyReloader) -> PolicyStatus:
    index = gateway.runtime.index
    rejected = reloader.last_rejected
    return PolicyStatus(
        version=index.version,
        path=str(reloader.path),
        loaded_at=reloader.loaded_at,
        last_reload_ok=rejected is None or rejected.at < reloader.loaded_at,
        last_rejected_at=None if rejected is None else rejected.at,
        last_rejected_errors=[] if rejected is None else list(rejected.errors),
        routes=len(index.routes),
        backends=len(index.backends),
        tenants=len(index.tenants),
    )
