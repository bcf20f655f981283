"""Live signals the engine ranks with, per backend and per deployment (`model@backend`).

- in flight, per backend: counted by the dispatcher (`started` / `finished`);
- latency: EWMAs of the time to response headers (`answered`), of the time to first token and of
  output tokens per second (`first_token`, `throughput`, from the upstream stage's tap);
- outlier ejection (gateway.upstream.outlier): failed attempts (`failed`), successes (`answered`) and
  health probes (`probe_result`, from gateway.upstream.health);
- engine load, per backend: utilisation and queue depth scraped from its metrics page
  (gateway.upstream.scrape, `engine_load`); once the last good scrape is older than the backend's
  `stale_after_s`, routing falls back to in-flight counting and explain says `stale`; with each good
  scrape, how many of this gateway's requests were in flight there (`scrape_basis`), so that the engine
  corrects the gauge with the requests started or finished since (gateway.policy.live.utilisation);
- spillover memory: which (route, backend) pairs are spilling, so that a backend comes back only
  below the route's lower mark (hysteresis; the engine decides, the route stage records it here).

No I/O of its own. `snapshot(now)` is what one decision ranks with; it shares the dicts (no copy on
the hot path).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.policy.live import LiveState, ScrapeBasis
from gateway.policy.model import Backend
from gateway.upstream.outlier import Ejection, OutlierTracker

# Ejections remembered for the console (gateway.api.console), per process.
EJECTIONS_KEPT = 200

# Weight of the newest sample in the latency, TTFT and throughput EWMAs.
ALPHA = 0.2


@dataclass(slots=True)
class EngineLoad:
    """The last good scrape of one backend's engine metrics."""

    at: float
    running: float
    waiting: float
    utilisation: float
    format: str
    # KV-cache use (0-1), when the engine's format reports it.
    kv: float | None = None


class LiveSignals:
    def __init__(self) -> None:
        self.in_flight: dict[str, int] = {}
        self.latency_ms: dict[str, float] = {}
        self.ttft_ms: dict[str, float] = {}
        self.tokens_per_s: dict[str, float] = {}
        # Fresh engine gauges only (stale ones are removed by `refresh_staleness`).
        self.utilisation: dict[str, float] = {}
        self.queue: dict[str, int] = {}
        self.engine: dict[str, EngineLoad] = {}
        self.scrape_basis: dict[str, ScrapeBasis] = {}
        self.scrape_failures: dict[str, int] = {}
        self.outliers = OutlierTracker()
        # The last ejections (wall-clock time, backend or deployment, reason, seconds out), newest last.
        self.ejections: deque[tuple[float, str, str, float]] = deque(maxlen=EJECTIONS_KEPT)
        self._stale: frozenset[str] = frozenset()
        self._stale_after: dict[str, float] = {}
        self._spilling: frozenset[tuple[str, str]] = frozenset()
        # The loaded policy's backend names: the label set of the per-backend gauges.
        self.backends: frozenset[str] = frozenset()
        self._state = self._build()

    def _build(self, unhealthy: frozenset[str] = frozenset()) -> LiveState:
        return LiveState(
            unhealthy=unhealthy,
            latency_ms=self.latency_ms,
            ttft_ms=self.ttft_ms,
            tokens_per_s=self.tokens_per_s,
            in_flight=self.in_flight,
            utilisation=self.utilisation,
            queue=self.queue,
            scrape_basis=self.scrape_basis,
            stale=self._stale,
            spilling=self._spilling,
        )

    def configure(self, backends: Iterable[Backend], probed: Iterable[str]) -> None:
        """A policy was loaded: its backends' outlier thresholds, which can be probed, how old their
        engine metrics may get. Signals of backends it no longer has are dropped."""
        backends = list(backends)
        names = {b.name for b in backends}
        self.outliers.configure({b.name: b.outlier for b in backends}, probed)
        self._stale_after = {b.name: b.capacity.stale_after_s or 3 * b.capacity.scrape_interval_s for b in backends}
        self.backends = frozenset(names)
        for table in (self.utilisation, self.queue, self.engine, self.scrape_basis, self.scrape_failures):
            for name in [n for n in table if n not in names]:
                del table[name]
        self._stale = frozenset(n for n in self._stale if n in names)
        self._spilling = frozenset(p for p in self._spilling if p[1] in names)
        self._state = self._build()

    def snapshot(self, now: float) -> LiveState:
        """The live state for one decision."""
        if not self.outliers.ejected:
            return self._state
        return self._build(self.outliers.unhealthy(now))

    # ---- the dispatcher's calls ----

    def started(self, backend: str) -> None:
        self.in_flight[backend] = self.in_flight.get(backend, 0) + 1

    def finished(self, backend: str) -> None:
        self.in_flight[backend] = max(0, self.in_flight.get(backend, 1) - 1)

    def answered(self, backend: str, label: str, seconds: float, now: float | None = None) -> None:
        """The upstream answered (its head arrived, not a 5xx) after `seconds`."""
        ms = seconds * 1000.0
        old = self.latency_ms.get(label)
        self.latency_ms[label] = ms if old is None else old + ALPHA * (ms - old)
        t = time.monotonic() if now is None else now
        self.outliers.success(backend, t)
        if label != backend:
            self.outliers.success(label, t)

    def failed(self, backend: str, now: float, label: str | None = None) -> Ejection | None:
        """An attempt failed (5xx, timeout, reset, refused): counted towards the backend's ejection
        (and the deployment's, when `label` names it)."""
        ejection = self.outliers.failure(backend, now)
        if ejection is not None:
            self._remember(ejection, now)
        if label is not None and label != backend:
            deployment = self.outliers.failure(label, now)
            if deployment is not None:
                self._remember(deployment, now)
            ejection = deployment or ejection
        return ejection

    def _remember(self, ejection: Ejection, now: float) -> None:
        """The ejection history (the console's Backends page): wall-clock time, key, reason, for how long."""
        self.ejections.append((time.time(), ejection.key, ejection.reason, max(0.0, ejection.until - now)))

    # ---- the upstream stage's tap: time to first token and throughput of answers ----

    def first_token(self, label: str, seconds: float) -> None:
        ms = seconds * 1000.0
        old = self.ttft_ms.get(label)
        self.ttft_ms[label] = ms if old is None else old + ALPHA * (ms - old)

    def throughput(self, label: str, tokens_per_s: float) -> None:
        if not math.isfinite(tokens_per_s) or tokens_per_s <= 0:
            return
        old = self.tokens_per_s.get(label)
        self.tokens_per_s[label] = tokens_per_s if old is None else old + ALPHA * (tokens_per_s - old)

    # ---- the health monitor and the scraper ----

    def probe_result(self, key: str, ok: bool, now: float) -> Ejection | None:
        ejection = self.outliers.probe_result(key, ok, now)
        if ejection is not None:
            self._remember(ejection, now)
        return ejection

    def engine_load(self, backend: str, load: EngineLoad) -> None:
        self.engine[backend] = load
        self.utilisation[backend] = load.utilisation
        # Taken when the page came back: the engine's figures include what this gateway had sent by then
        # (to within the page's round trip), the base the route stage's estimate moves from.
        self.scrape_basis[backend] = ScrapeBasis(self.in_flight.get(backend, 0), load.running + load.waiting, load.kv)
        self.queue[backend] = int(load.waiting)
        self.scrape_failures.pop(backend, None)
        if backend in self._stale:
            self._stale = self._stale - {backend}
            self._state = self._build()

    def scrape_failed(self, backend: str, now: float) -> None:
        self.scrape_failures[backend] = self.scrape_failures.get(backend, 0) + 1
        self.refresh_staleness(backend, now)

    def refresh_staleness(self, backend: str, now: float) -> None:
        """Drop a backend's engine gauges once its last good scrape is too old: routing counts in-flight."""
        load = self.engine.get(backend)
        too_old = load is None or now - load.at > self._stale_after.get(backend, math.inf)
        if too_old and backend not in self._stale:
            self.utilisation.pop(backend, None)
            self.queue.pop(backend, None)
            self.scrape_basis.pop(backend, None)
            self._stale = self._stale | {backend}
            self._state = self._build()

    def forget_engine(self, backend: str) -> None:
        """Its metrics are no longer scraped (a reload removed `metrics_url`): routing counts in-flight."""
        self.engine.pop(backend, None)
        self.utilisation.pop(backend, None)
        self.queue.pop(backend, None)
        self.scrape_basis.pop(backend, None)
        self.scrape_failures.pop(backend, None)
        if backend in self._stale:
            self._stale = self._stale - {backend}
            self._state = self._build()

    def refresh_all(self, now: float) -> None:
        """Flag every backend whose last good scrape is too old (a scrape that never comes back included)."""
        for backend in list(self.engine):
            self.refresh_staleness(backend, now)

    def load_age(self, backend: str, now: float) -> float | None:
        load = self.engine.get(backend)
        return None if load is None else now - load.at

    # ---- spillover memory ----

    def set_spilling(self, changes: Iterable[tuple[str, str, bool]]) -> None:
        current = set(self._spilling)
        for route, backend, on in changes:
            if on:
                current.add((route, backend))
            else:
                current.discard((route, backend))
        if current != self._spilling:
            self._spilling = frozenset(current)
            self._state = self._build()
