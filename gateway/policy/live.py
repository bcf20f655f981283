"""What the routing engine knows of live load, and the verdicts it draws from it: a backend's utilisation
(its engine's scraped gauge, corrected with the requests this gateway started or finished there since the
scrape, never below this gateway's own in-flight count), the latency a deployment is ranked on, and whether
a spilling backend takes a request (`spill_verdict`). Pure, no I/O: the live signals come in a `LiveState`
snapshot (gateway.upstream.signals makes it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, NamedTuple

import msgspec

from gateway.policy.index import Target
from gateway.policy.model import Route, Spillover

# Latency assumed for a deployment with no measurement yet, by tier (ms): a cold start still ranks sensibly.
LATENCY_PRIOR_MS: Final[dict[str, float]] = {"edge": 150.0, "self-hosted": 300.0, "provider": 600.0}


class ScrapeBasis(NamedTuple):
    """What one good scrape of a backend's engine saw, kept so that the gauge can be corrected between
    scrapes with the requests this gateway started or finished there since (`utilisation`)."""

    # This gateway's requests in flight on the backend when the scrape came back.
    in_flight: int
    # Requests in the engine then (running + waiting, as it reported them).
    in_engine: float
    # Its KV-cache use then (0-1), None when its format has no such gauge.
    kv: float | None


class LiveState(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of live signals, by backend name (latency, TTFT and throughput by `model@backend`)."""

    # Ejected backends (or deployments, by label): out of the plan unless every candidate is (panic).
    unhealthy: frozenset[str] = frozenset()
    # EWMA of the time to response headers.
    latency_ms: Mapping[str, float] = {}
    # EWMAs of the time to first token and of output tokens per second (streams).
    ttft_ms: Mapping[str, float] = {}
    tokens_per_s: Mapping[str, float] = {}
    in_flight: Mapping[str, int] = {}
    # The engine's own gauges, scraped and fresh: utilisation (0-1) and requests waiting.
    utilisation: Mapping[str, float] = {}
    queue: Mapping[str, int] = {}
    # What each fresh scrape saw (by backend): the gauges above are corrected with the requests this
    # gateway started or finished since. A backend without one: its gauge as scraped.
    scrape_basis: Mapping[str, ScrapeBasis] = {}
    # Backends whose engine metrics are stale: their utilisation is counted from in-flight requests.
    stale: frozenset[str] = frozenset()
    # (route, backend) pairs spilling now: they come back only below the route's lower mark.
    spilling: frozenset[tuple[str, str]] = frozenset()


EMPTY_LIVE: Final = LiveState()


def utilisation(t: Target, live: LiveState) -> float:
    """The engine's gauge (fresh scrapes only) corrected with the requests this gateway started or finished
    there since that scrape (`estimated`), but never less than this gateway's own in-flight requests over
    `max_concurrency`: the gauge lags by up to a scrape interval, while the requests this gateway has just
    sent or seen finish are known now (a burst must not all pile onto a backend that was idle at the last
    scrape, and a slot freed since must not stay idle until the next one)."""
    name = t.backend.name
    cap = t.backend.capacity.max_concurrency
    flying = live.in_flight.get(name)
    counted = flying / cap if cap and flying is not None else 0.0
    u = live.utilisation.get(name)
    if u is None:
        return counted
    basis = live.scrape_basis.get(name)
    if basis is not None:
        u = estimated(u, basis, flying or 0, cap)
    return max(u, counted)


def estimated(scraped: float, basis: ScrapeBasis, flying: int, cap: int | None) -> float:
    """The scraped utilisation as it would read with `flying` of this gateway's requests on the backend
    instead of the `basis.in_flight` it had at the scrape: each request started since is one more in the
    engine, each finished one less; the slot part is (requests in the engine) / max_concurrency, and the
    KV-cache part is scaled by the same ratio (each running request is taken to hold an equal share of the
    cache; a cache in use with nothing running is not ours to correct). Clamped to [0, 1]."""
    delta = flying - basis.in_flight
    if delta == 0:
        return scraped
    before = basis.in_engine
    after = max(0.0, before + delta)
    parts = [0.0]
    if basis.kv is not None:
        parts.append(basis.kv * after / before if before > 0 else basis.kv)
    if cap:
        parts.append(after / cap)
    if len(parts) == 1:
        return scraped  # neither gauge can be corrected (no KV gauge, no max_concurrency)
    return min(1.0, max(parts))


def not_ours(t: Target, live: LiveState) -> float:
    """The part of the scraped utilisation this gateway's own requests do not explain: the gauge as it
    would read without any of them. 0 without a fresh scrape (in-flight counting is all ours); the whole
    gauge when the scrape has no basis to correct it with."""
    name = t.backend.name
    u = live.utilisation.get(name)
    if u is None:
        return 0.0
    basis = live.scrape_basis.get(name)
    return u if basis is None else estimated(u, basis, 0, t.backend.capacity.max_concurrency)


def utilisation_text(t: Target, live: LiveState, u: float) -> str:
    """`utilisation 0.75`, and what decided it when it is not the scrape as is: the estimate
    (`estimated from the scrape's 1.00, 1 finished since`) or this gateway's count (`4 of 4 in flight`)."""
    name = t.backend.name
    text = f"utilisation {u:.2f}"
    cap = t.backend.capacity.max_concurrency
    flying = live.in_flight.get(name, 0)
    scraped = live.utilisation.get(name)
    basis = live.scrape_basis.get(name)
    if (
        scraped is not None
        and basis is not None
        and flying != basis.in_flight
        and u == estimated(scraped, basis, flying, cap)
    ):
        delta = flying - basis.in_flight
        since = f"{delta} started" if delta > 0 else f"{-delta} finished"
        return f"{text} (estimated from the scrape's {scraped:.2f}, {since} since)"
    if cap and flying and u == flying / cap and u != scraped:
        return f"{text} ({flying} of {cap} in flight)"
    return text


def load_source(t: Target, live: LiveState) -> str | None:
    name = t.backend.name
    if name in live.utilisation:
        basis = live.scrape_basis.get(name)
        if basis is not None and live.in_flight.get(name, 0) != basis.in_flight:
            return "estimated"
        return "engine"
    counted = t.backend.capacity.max_concurrency and name in live.in_flight
    if name in live.stale:
        return "stale"
    return "in-flight" if counted else None


def latency_of(t: Target, live: LiveState) -> float:
    """What the latency objective ranks on: the time to first token when streams were measured, else the
    time to response headers (a whole answer's first token comes with it), else the tier's prior."""
    measured = live.ttft_ms.get(t.label)
    if measured is None:
        measured = live.latency_ms.get(t.label)
    if measured is None:
        measured = live.latency_ms.get(t.backend.name)
    return measured if measured is not None else LATENCY_PRIOR_MS.get(t.backend.tier, 600.0)


def spill_verdict(t: Target, route: Route, spill: Spillover, live: LiveState) -> tuple[str | None, str | None]:
    """(why this request goes elsewhere, None) when the target's backend does not take it on this route;
    (None, why it fits) when the backend is spilling yet takes it; (None, None) when it is not spilling.

    Per request, a backend takes a request while its utilisation (the scrape corrected with this
    gateway's requests since, `utilisation`) is below the threshold and its queue below its own: only the
    overflow spills, so committed capacity stays full. The spill state (what the caller remembers:
    `RoutePlan.spill_changes`) has hysteresis: it starts when a request does not fit and ends only at or
    below the lower marks, by the estimate and by the last scrape both. While it lasts, load this gateway
    cannot account for keeps the backend behind: if the part of the scraped utilisation that is not this
    gateway's requests is above the resume mark (or the queue is above its own), nothing is sent there;
    otherwise the slots this gateway's own finished requests freed are refilled, up to the threshold,
    because that count is exact, not a lagging gauge that could make it flap."""
    u = utilisation(t, live)
    q = live.queue.get(t.backend.name)
    spilling = (route.name, t.backend.name) in live.spilling
    if spilling:
        resume, queue_resume = spill.resume_mark(), spill.queue_resume_mark()
        queue_high = queue_resume is not None and q is not None and q > queue_resume
        # The state ends only once the engine's own gauge agrees (the estimate alone, from requests that
        # just finished together and are about to be replaced, would end it at every dip: flapping).
        if max(u, live.utilisation.get(t.backend.name, 0.0)) <= resume and not queue_high:
            return None, None  # drained: flows back, the spill state ends
        if u > resume:
            foreign = not_ours(t, live)
            if foreign > resume:
                of = "" if abs(foreign - u) < 0.005 else f", {foreign:.2f} of it not this gateway's requests,"
                return f"still spilling: utilisation {u:.2f}{of} above the resume mark {resume:.2f}", None
        if queue_high:
            return f"still spilling: queue {q} above the resume mark {queue_resume}", None
    if u >= spill.threshold:
        return f"{utilisation_text(t, live, u)} >= threshold {spill.threshold:.2f}", None
    if spill.queue_threshold is not None and q is not None and q >= spill.queue_threshold:
        return f"queue {q} >= threshold {spill.queue_threshold}", None
    if spilling:
        return (
            None,
            f"spilling the overflow only: this request fits, {utilisation_text(t, live, u)} < threshold {spill.threshold:.2f}",
        )
    return None, None
