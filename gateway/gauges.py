"""Gauges read when Prometheus scrapes, not kept up to date per request: what the gateway holds right now
(upstream requests in flight, ejected and spilling backends, each route's deployments left after ejections, the usage
writer's queue and spool, the state store's breaker and failure counts, the process's open file descriptors and
the event loop's tasks: what a soak test watches for leaks) and the policy's own numbers alerts compare against (the
shedding cap, tenants' budgets). Labels come from the policy (backend, route and tenant names) or are
fixed, so cardinality is bounded by the policy.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from gateway.accounting.writer import UsageWriter
from gateway.inflight import InFlight
from gateway.state import Store
from gateway.upstream.retry import RetryBudgets
from gateway.upstream.signals import LiveSignals

if TYPE_CHECKING:
    from gateway.runtime import Runtime

_BREAKER = {"closed": 0, "half-open": 1, "open": 2}


class _Source(Protocol):
    signals: LiveSignals
    retry_budgets: RetryBudgets
    writer: UsageWriter
    store: Store
    inflight: InFlight
    runtime: Runtime


class GatewayGauges:
    """A prometheus_client collector over one running gateway."""

    def __init__(self, gateway: _Source) -> None:
        self._gateway = gateway

    def describe(self) -> list[Metric]:
        return []  # collected lazily; nothing to describe up front

    def collect(self) -> Iterator[Metric]:
        g = self._gateway
        yield GaugeMetricFamily(
            "strait_in_flight_requests",
            "Requests on the model endpoints in flight on this replica (what server.shedding caps).",
            value=g.inflight.count,
        )
        yield GaugeMetricFamily(
            "strait_draining",
            "1 once a shutdown (SIGTERM) began: in-flight requests finishing.",
            value=g.inflight.draining,
        )
        in_flight = GaugeMetricFamily(
            "strait_upstream_in_flight",
            "Upstream requests (and open streams) in flight, by backend.",
            labels=["backend"],
        )
        for backend, n in sorted(g.signals.in_flight.items()):
            in_flight.add_metric([backend], n)
        yield in_flight
        ejected = GaugeMetricFamily(
            "strait_upstream_ejected",
            "1 while a backend (or a model@backend deployment) is ejected by outlier detection.",
            labels=["backend"],
        )
        live = g.signals.snapshot(time.monotonic())
        unhealthy = live.unhealthy
        for backend in sorted(set(g.signals.in_flight) | unhealthy):
            ejected.add_metric([backend], 1 if backend in unhealthy else 0)
        yield ejected
        yield _route_deployments(g.runtime, unhealthy)
        policy = g.runtime.index.policy
        yield GaugeMetricFamily(
            "strait_shedding_max_in_flight",
            "The policy's server.shedding.max_in_flight: requests in flight per replica above which new ones "
            "get 503 (0: no cap). Compare with strait_in_flight_requests.",
            value=policy.server.shedding.max_in_flight,
        )
        budgets = GaugeMetricFamily(
            "strait_tenant_budget_usd",
            "A tenant's spending budget from the policy (budgets.tenant), by period (day, month); compare with "
            "strait_usage_cost_usd_total summed over replicas.",
            labels=["tenant", "period"],
        )
        for tenant in policy.tenants:
            budget = tenant.budgets.tenant
            if budget.usd_per_day is not None:
                budgets.add_metric([tenant.name, "day"], budget.usd_per_day)
            if budget.usd_per_month is not None:
                budgets.add_metric([tenant.name, "month"], budget.usd_per_month)
        yield budgets
        utilisation = GaugeMetricFamily(
            "strait_backend_utilisation",
            "Utilisation (0-1) from the engine's scraped metrics, while fresh.",
            labels=["backend"],
        )
        queue = GaugeMetricFamily(
            "strait_backend_queue", "Requests waiting in the engine (scraped metrics, while fresh).", labels=["backend"]
        )
        for backend, u in sorted(live.utilisation.items()):
            utilisation.add_metric([backend], u)
        for backend, q in sorted(live.queue.items()):
            queue.add_metric([backend], q)
        yield utilisation
        yield queue
        stale = GaugeMetricFamily(
            "strait_backend_metrics_stale",
            "1 while a backend's engine metrics are stale (utilisation counted from in-flight requests).",
            labels=["backend"],
        )
        for backend in sorted(live.stale):
            stale.add_metric([backend], 1)
        yield stale
        spilling = GaugeMetricFamily(
            "strait_backend_spilling",
            "1 while spillover sends a backend's overflow elsewhere (on any route), 0 otherwise.",
            labels=["backend"],
        )
        spilled = {backend for _, backend in live.spilling}
        for backend in sorted(g.signals.backends | spilled):
            spilling.add_metric([backend], 1 if backend in spilled else 0)
        yield spilling
        active = GaugeMetricFamily(
            "strait_route_active_requests",
            "Requests being dispatched or streamed, by route (what the retry budget is a share of).",
            labels=["route"],
        )
        retrying = GaugeMetricFamily(
            "strait_route_retries_in_flight",
            "Retries the route's retry budget has in flight, by route.",
            labels=["route"],
        )
        for route, (n_active, n_retrying) in sorted(g.retry_budgets.by_route().items()):
            active.add_metric([route], n_active)
            retrying.add_metric([route], n_retrying)
        yield active
        yield retrying
        yield GaugeMetricFamily(
            "strait_usage_queue_records", "Usage records waiting in memory for the ledger.", value=g.writer.queued()
        )
        yield GaugeMetricFamily(
            "strait_usage_spool_bytes",
            "Bytes of usage records spooled to disk while the ledger was unreachable.",
            value=g.writer.spool.size(),
        )
        yield CounterMetricFamily(
            "strait_usage_spool_dropped_records",
            "Usage records dropped because the spool was full.",
            value=g.writer.spool.dropped,
        )
        status = g.store.status()
        yield GaugeMetricFamily(
            "strait_state_breaker",
            "The state store's circuit breaker: 0 closed, 1 half-open, 2 open.",
            value=_BREAKER.get(status.breaker, 0),
        )
        calls = CounterMetricFamily(
            "strait_state_calls_unanswered",
            "State store calls that got no answer: failed (timeout, refused, error), skipped (breaker open), "
            "saturated (no connection in time: this process overloaded).",
            labels=["reason"],
        )
        calls.add_metric(["failed"], status.failures)
        calls.add_metric(["skipped"], status.skipped)
        calls.add_metric(["saturated"], status.saturated)
        yield calls
        yield from _process_gauges()


def _process_gauges() -> Iterator[Metric]:
    """Open file descriptors (Linux: /proc/self/fd) and the event loop's live tasks: both flat under
    steady load, so a line rising over a soak (loadtest/soak.py) is a leak of sockets or tasks."""
    try:
        fds = len(os.listdir("/proc/self/fd")) - 1  # less the descriptor listdir itself held open
    except OSError:  # not Linux: no gauge rather than a wrong one
        fds = -1
    if fds >= 0:
        yield GaugeMetricFamily("strait_process_open_fds", "File descriptors this process holds open.", value=fds)
    try:
        tasks = len(asyncio.all_tasks())
    except RuntimeError:  # collected off the event loop (a direct registry read): nothing to count
        return
    yield GaugeMetricFamily(
        "strait_event_loop_tasks",
        "Tasks alive on this process's event loop (requests, streams, background).",
        value=tasks,
    )


def _route_deployments(runtime: Runtime, unhealthy: frozenset[str]) -> GaugeMetricFamily:
    """Each route's deployments by state: `ejected` when outlier detection took out the deployment or its
    backend (as routing judges it), else `available`. A route with none available routes in panic mode
    (every candidate tried anyway): the `all upstreams of a route ejected` alert."""
    family = GaugeMetricFamily(
        "strait_route_deployments",
        "A route's deployments (any operation) by state: available, or ejected by outlier detection.",
        labels=["route", "state"],
    )
    labels_by_route: dict[str, dict[str, bool]] = {}
    for (route, _op), targets in runtime.index.targets.items():
        seen = labels_by_route.setdefault(route, {})
        for t in targets:
            seen[t.label] = t.backend.name in unhealthy or t.label in unhealthy
    for route, states in sorted(labels_by_route.items()):
        ejected = sum(states.values())
        family.add_metric([route, "available"], len(states) - ejected)
        family.add_metric([route, "ejected"], ejected)
    return family
