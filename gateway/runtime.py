"""What a running gateway holds: the current policy runtime (swapped whole on reload) and its metrics."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import msgspec

from gateway.accounting.ledger import Ledger
from gateway.accounting.unpriced import report_unpriced
from gateway.accounting.writer import UsageWriter
from gateway.cache.embedders import threshold_of
from gateway.cache.pool import EmbedderPool, embedder_specs
from gateway.cache.store import CacheStore
from gateway.capture.writer import CaptureWriter
from gateway.contracts import Adapter, AdapterFactory, Tap
from gateway.inflight import InFlight
from gateway.pipeline import Pipeline, Stage
from gateway.policy.decisions import DecisionLog
from gateway.policy.index import PolicyIndex
from gateway.policy.model import Backend, PolicySet, UpstreamLimits
from gateway.responses_store import ResponseStore
from gateway.stages import priority
from gateway.stages.accounting import AccountingStage
from gateway.stages.auth import AuthStage
from gateway.stages.cache import CacheStage
from gateway.stages.capture import CaptureTap, captures_any
from gateway.stages.explain import Explain
from gateway.stages.limits import LimitsStage
from gateway.stages.observers import DecisionObserver, FeatureLog, FeatureLogFile, ShadowPolicy
from gateway.stages.recent import RecentDecisions, RecentLog
from gateway.stages.route import RouteStage
from gateway.stages.shadow import ShadowRunner, ShadowTap
from gateway.stages.upstream import UpstreamStage
from gateway.state import Store
from gateway.telemetry import Metrics
from gateway.tracing import Tracing
from gateway.upstream.dispatch import Dispatcher
from gateway.upstream.health import HealthMonitor, probe_plan
from gateway.upstream.redact import redactor_for
from gateway.upstream.retry import RetryBudgets
from gateway.upstream.signals import LiveSignals

log = logging.getLogger("strait")
# How often the shared store's epoch is checked (one pipelined round trip).
EPOCH_CHECK_S = 5.0


@dataclass(frozen=True, slots=True)
class Runtime:
    """Everything derived from one policy. A request reads `gateway.runtime` once and uses that
    snapshot to the end, so a reload never mixes two policies inside one request."""

    index: PolicyIndex
    auth: AuthStage
    # Request stages in order: auth -> priority (when the policy sheds load or restricts classes) -> decode (the body, only once authenticated) -> route (policy
    # engine, explain) -> limits (one store call; a spent budget may switch to the plan's downgrade)
    # -> upstream (terminal: dispatch, response shaping, error accounting). Everything the stages
    # derive from the policy alone is built here, once: the index's compiled tables
    # (gateway.policy.compile) and the limits stage's store Limits per (tenant, route).
    # Taps at the end of every answered request: live signals, token metrics, accounting (span).
    pipeline: Pipeline
    dispatcher: Dispatcher
    adapters: Mapping[str, Adapter]
    upstream_limits: UpstreamLimits
    # The cache stage, when a tenant of the policy caches (POST /v1/cache/feedback reports to it).
    cache: CacheStage | None = None
    # Model requests started on this runtime and still running (to their last byte): a replaced runtime
    # is taken apart (gateway.teardown) only once none is.
    held: Held = field(default_factory=lambda: Held())


class Held:
    """A count of the requests running on one runtime: the edge (gateway.api.routes) enters and leaves it,
    on the event loop only; an int, no lock."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


@dataclass(frozen=True, slots=True)
class Services:
    """What outlives a policy, handed to every runtime built from one: built once by app.py."""

    metrics: Metrics
    signals: LiveSignals
    store: Store
    accounting: AccountingStage
    decisions: DecisionLog
    # Builds the body-decoding stage for a policy (its body limit): the wire codec's, in api/, handed
    # in by app.py so that nothing below api/ imports it.
    decode: Callable[[PolicySet], Stage]
    # OpenTelemetry, when the OTEL_* variables configure it (gateway.tracing); None: no tracing code runs.
    tracing: Tracing | None = None
    # Where cached answers live (a key space, or a Redis, of their own) and the embedders opened so far.
    cache_store: CacheStore | None = None
    embedders: EmbedderPool | None = None
    # Stored responses (POST /v1/responses with `store`): in process, or the state's Redis.
    responses: ResponseStore | None = None
    # Active requests and retries in flight per route (the retry budget): a reload must not forget them.
    retry_budgets: RetryBudgets = field(default_factory=RetryBudgets)
    # The model requests in flight on this replica (load shedding, the shutdown's grace period).
    inflight: InFlight = field(default_factory=InFlight)
    # This replica's region (STRAIT_REGION): every request's ingress region.
    region: str | None = None
    # The feature log's file (STRAIT_FEATURE_LOG) and the shadow policy (STRAIT_SHADOW_POLICY), if set.
    feature_log: FeatureLogFile | None = None
    shadow: ShadowPolicy | None = None
    # The capture writer (STRAIT_CAPTURE): consenting tenants' requests, and feedback, to the capture store.
    capture: CaptureWriter | None = None
    # Shadow traffic (routes' `shadow`): copies of answered requests to candidate models, bounded per
    # process, handed to its sink (gateway.stages.shadow). None: no copies are made.
    shadow_traffic: ShadowRunner | None = None
    # The last decisions of this replica (the console's search and its policy diff against recent traffic).
    recent: RecentDecisions | None = None


def build_runtime(
    policy: PolicySet,
    factories: Mapping[str, AdapterFactory],
    services: Services,
    previous: Runtime | None = None,
    environ: Mapping[str, str] | None = None,
) -> Runtime:
    """Everything for one policy, at start-up: `compile_runtime`, then `configure_signals`. A reload
    (gateway.reload) runs the two apart: the first in a worker thread, the second on the event loop."""
    runtime = compile_runtime(policy, factories, services, previous, environ)
    configure_signals(policy, services.signals)
    return runtime


def configure_signals(policy: PolicySet, signals: LiveSignals) -> None:
    """The live signals' outlier thresholds per backend, and which can be probed for free (half-open)
    before traffic returns. Requests read the signals: on the event loop only."""
    signals.configure(policy.backends, probed=[b.name for b in policy.backends if probe_plan(b) is not None])


def compile_runtime(
    policy: PolicySet,
    factories: Mapping[str, AdapterFactory],
    services: Services,
    previous: Runtime | None = None,
    environ: Mapping[str, str] | None = None,
) -> Runtime:
    """Everything for one policy but the live signals' settings (`configure_signals`). Adapters of
    backends whose definition did not change are reused from `previous`, so a reload keeps their
    connection pools warm.

    Safe in a worker thread, which is where a reload runs it (tens of ms for a policy of thousands of
    tenants: on the event loop that would stall every request): it reads `services` and `previous`
    without changing them, and builds objects no request sees until the runtime is put in force. Adapter
    factories only build (an adapter opens its connections on its first request, on the event loop)."""
    metrics, signals, store = services.metrics, services.signals, services.store
    index = PolicyIndex.of(policy)  # built once when the policy was checked
    adapters: dict[str, Adapter] = {}
    limits = policy.server.upstream
    for b in policy.backends:
        old = previous.index.backends.get(b.name) if previous is not None else None
        if previous is not None and old == b and previous.upstream_limits == limits:
            adapters[b.name] = previous.adapters[b.name]
        else:
            adapters[b.name] = factories[b.adapter](_with_limits(b, limits))
    auth = AuthStage(index)
    # Shared by `route` and `limits` (which explains again when it switches to the downgrade plan).
    explain = Explain(index, services.decisions)
    observers: list[DecisionObserver] = []
    if services.feature_log is not None:
        observers.append(FeatureLog(services.feature_log, index))
    if services.shadow is not None:
        observers.append(services.shadow)
    if services.recent is not None:
        observers.append(RecentLog(services.recent, index))
    route = RouteStage(index, signals, explain, tuple(observers), services.region)
    # The redactor knows every backend's resolved key, so no upstream error text can echo one.
    dispatcher = Dispatcher(
        adapters,
        metrics,
        signals,
        redactor_for((b.api_key for b in policy.backends), os.environ if environ is None else environ),
        tracing=services.tracing,
        budgets=services.retry_budgets,
        upstream_limits=limits,
    )
    upstream = UpstreamStage(dispatcher, metrics, signals)
    stages: list[Stage] = [auth]
    if priority.needed(index):
        # Before `decode`: a shed request costs no body read.
        stages.append(priority.PriorityStage(index, services.inflight, metrics))
    stages += [services.decode(policy), route, LimitsStage(index, store, metrics, explain)]
    cache = _cache_stage(index, services)
    if cache is not None:
        stages.append(cache)
    # Capture only when some tenant consented: otherwise not a single call per request.
    capture = services.capture
    capture_taps = (
        (CaptureTap(index, capture),) if capture is not None and capture.enabled and captures_any(index) else ()
    )
    taps: list[Tap] = [services.accounting, *capture_taps]
    runner = services.shadow_traffic
    if runner is not None and any(r.shadow is not None for r in policy.routes):
        runner.configure(policy.server.shadow)
        # After accounting: a copy is decided only once the live answer is accounted.
        taps.append(ShadowTap(runner, adapters))
    return Runtime(
        index=index,
        auth=auth,
        pipeline=Pipeline(
            stages,
            upstream,
            tracing=services.tracing,
            on_refused=services.accounting.refused,
            # Accounting ends every answered request (records, slot release, lease keepalive of a stream);
            # capture after it (it records the tokens accounting charged); shadow copies last.
            taps=taps,
        ),
        dispatcher=dispatcher,
        adapters=adapters,
        upstream_limits=limits,
        cache=cache,
    )


def _cache_stage(index: PolicyIndex, services: Services) -> CacheStage | None:
    """The cache stage when some tenant caches on some route; its embedders opened now (a missing
    optional dependency is a load-time error naming the extra, never a request's)."""
    if services.cache_store is None or not any(tables.cache for tables in index.tenant_tables.values()):
        return None
    pool = services.embedders if services.embedders is not None else EmbedderPool()
    specs = embedder_specs(index)
    embedders = {name: pool.get(spec) for name, spec in specs.items()}
    thresholds = {name: threshold_of(spec) for name, spec in specs.items()}
    return CacheStage(index, services.cache_store, embedders, services.metrics, thresholds)


def _with_limits(backend: Backend, limits: UpstreamLimits) -> Backend:
    """The backend as its adapter sees it: with the server's upstream limits unless it has its own."""
    return backend if backend.limits is not None else msgspec.structs.replace(backend, limits=limits)


class Gateway:
    """What lives as long as the process: the current runtime (replaced on reload), live signals, the
    state store, the usage writer and the accounting stage."""

    def __init__(self, runtime: Runtime, services: Services, writer: UsageWriter, ledger: Ledger) -> None:
        self.runtime = runtime
        self.services = services
        self.metrics = services.metrics
        self.signals = services.signals
        self.retry_budgets = services.retry_budgets
        self.store = services.store
        self.writer = writer
        self.ledger = ledger
        self.accounting = services.accounting
        self.decisions = services.decisions
        self.inflight = services.inflight
        self.started_at = int(time.time())
        self._epoch_task: asyncio.Future[None] | None = None
        # Probes ejected backends and scrapes engine metrics, off the request path (gateway.upstream.health).
        self.health = HealthMonitor(self.signals)
        self.health.apply(list(runtime.index.policy.backends), runtime.adapters)
        report_unpriced(runtime.index.policy, self.metrics)

    def use(self, runtime: Runtime) -> None:
        """Put a new runtime in force (a reload): its backends get their probes and scrapers, removed or
        changed ones' stop (from the next loop turn on, a batch per turn; unchanged ones keep theirs). The reloader then reports its unpriced deployments again, in a worker thread
        (`report_unpriced`: thousands of gauge series at enterprise size)."""
        self.runtime = runtime
        self.health.apply(list(runtime.index.policy.backends), runtime.adapters)

    async def start(self) -> None:
        if self.runtime.cache is not None:
            # Local models load now, in their own threads, not on the first request that needs them.
            await self.runtime.cache.warm()
        await self.writer.start()
        if self.services.capture is not None:
            await self.services.capture.start()
        self._epoch_task = asyncio.ensure_future(self._watch_epoch())
        await self.health.start()

    async def _watch_epoch(self) -> None:
        """Notice a shared store that came back empty: log it and count it (budgets started over)."""
        while True:
            try:
                if await self.store.check_epoch():
                    self.metrics.state_resets.inc()
                    log.warning(
                        "state store came back empty (restarted without persistence?): rate limits, "
                        "concurrency slots and budgets started over; run Redis with AOF persistence"
                    )
            except Exception:  # never let the watcher die; the next round tries again
                log.exception("state epoch check failed")
            await asyncio.sleep(EPOCH_CHECK_S)

    async def aclose(self) -> None:
        if self._epoch_task is not None:
            self._epoch_task.cancel()
        await self.health.aclose()
        if self.services.shadow_traffic is not None:
            # Before the adapters close: a running copy is cancelled, not failed on a closed pool.
            await self.services.shadow_traffic.aclose()
        if self.runtime.cache is not None:
            await self.runtime.cache.drain()
        await self.accounting.drain()
        if self.services.capture is not None:
            # What is queued is written (redacted) before the store closes.
            await self.services.capture.aclose()
        await self.writer.stop()
        await self.ledger.close()
        await self.store.close()
        if self.services.cache_store is not None:
            await self.services.cache_store.aclose()
        if self.services.embedders is not None:
            await self.services.embedders.aclose()
        if self.services.responses is not None:
            await self.services.responses.aclose()
        for adapter in self.runtime.adapters.values():
            await adapter.aclose()
        if self.services.tracing is not None:
            # Exports the spans still batched (in a thread: the exporter's HTTP call blocks).
            await asyncio.to_thread(self.services.tracing.shutdown)
