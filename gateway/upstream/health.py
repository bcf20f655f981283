"""Off the request path: half-open (and optional active) health probes, and engine-metrics scraping.

Started with the gateway, re-planned on every policy reload (a new backend gets its tasks, a removed
or changed one's stop), stopped on shutdown. Every request it makes is free: `GET /health`,
`GET /v1/models` or the metrics page; never a completion. It writes only to the live signals.

- Probes: each tick, every ejected backend (or deployment) whose period is over and that waits for a
  probe gets one (`outlier.probe`); its answer readmits it or ejects it again, for longer. With
  `outlier.active_interval_s`, healthy backends are probed at that interval too, a failed probe
  counting as a failure.
- Scraping: each backend with `capacity.metrics_url` (or an adapter serving its metrics in process,
  such as `simulated`) is read every `capacity.scrape_interval_s`; a failed or unreadable scrape is
  counted, and once the last good one is older than `stale_after_s`, routing falls back to in-flight
  counting (gateway.upstream.signals).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol, cast, runtime_checkable
from urllib.parse import urlsplit

import aiohttp

from gateway.policy.model import Backend
from gateway.upstream.scrape import MAX_PAGE_BYTES, MetricsPageError, parse
from gateway.upstream.signals import EngineLoad, LiveSignals

log = logging.getLogger("strait.health")

# How often ejected backends are checked for a due probe (a probe itself takes up to probe_timeout_s).
TICK_S: Final = 0.1
# Scraper tasks started or stopped per event-loop turn after a (re)plan (`HealthMonitor._reconcile`).
REPLAN_BATCH: Final = 50


@runtime_checkable
class InProcessEngine(Protocol):
    """An adapter whose engine lives in the gateway (`simulated`): its metrics page, without HTTP."""

    def engine_metrics(self) -> str: ...


@runtime_checkable
class OwnProbe(Protocol):
    """An adapter whose provider is not OpenAI-shaped (`gemini`): the free request that proves it answers
    (its model list), with the provider's own auth header, replaces `{base_url}/models` with a bearer key
    and `/health` (a metrics page, when configured, is still scraped as it is)."""

    def probe_request(self) -> tuple[str, dict[str, str]]: ...


@dataclass(frozen=True, slots=True)
class ProbePlan:
    kind: str
    url: str
    # Sent only to the backend's own API (/v1/models of a provider needs the key); never to metrics_url.
    authorised: bool
    # The adapter's own headers for its probe (OwnProbe), instead of a bearer key.
    headers: tuple[tuple[str, str], ...] = ()


def _auth_headers(backend: Backend, key: str) -> dict[str, str]:
    """How the backend's API takes its key: Anthropic's as `x-api-key` with its version header (the
    `anthropic` adapter's), every other provider's as a bearer token."""
    if backend.adapter == "anthropic":
        version = backend.anthropic.version if backend.anthropic is not None else "2023-06-01"
        return {"x-api-key": key, "anthropic-version": version}
    return {"authorization": f"Bearer {key}"}


def _root(base_url: str) -> str:
    base = urlsplit(base_url)._replace(query="", fragment="").geturl().rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


def _under(base_url: str, path: str) -> str:
    """`path` under the base URL, the base's query (e.g. `?api-version=`) kept after it."""
    parts = urlsplit(base_url)
    return parts._replace(path=parts.path.rstrip("/") + path, fragment="").geturl()


def probe_plan(backend: Backend) -> ProbePlan | None:
    """What a free health probe of this backend requests, or None (it cannot be probed for free)."""
    kind = backend.outlier.probe
    metrics_url = backend.capacity.metrics_url
    if kind == "auto":
        if metrics_url:
            kind = "metrics"
        elif backend.base_url is None:
            return None
        else:
            kind = "models" if backend.tier == "provider" else "health"
    if kind == "none":
        return None
    if kind == "metrics":
        return ProbePlan("metrics", metrics_url, False) if metrics_url else None
    if backend.base_url is None:
        return None
    if kind == "models":
        return ProbePlan("models", _under(backend.base_url, "/models"), True)
    return ProbePlan("health", _root(backend.base_url) + "/health", False)


def _secret(ref: str | None, environ: Mapping[str, str]) -> str | None:
    if ref is None:
        return None
    return environ.get(ref.removeprefix("env:")) or None


@dataclass(frozen=True, slots=True)
class _Watch:
    """What the monitor does for one backend; a changed definition restarts its tasks."""

    backend: Backend
    probe: ProbePlan | None
    engine: InProcessEngine | None


class HealthMonitor:
    def __init__(
        self,
        signals: LiveSignals,
        *,
        clock: Callable[[], float] = time.monotonic,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.signals = signals
        self.clock = clock
        self.environ = os.environ if environ is None else environ
        self._watches: dict[str, _Watch] = {}
        self._scrapers: dict[str, asyncio.Task[None]] = {}
        # The watch each running scraper was started for (a changed one is restarted).
        self._scraping: dict[str, _Watch] = {}
        # Starts and stops scrapers after a (re)plan, a batch per loop turn (`_reconcile`).
        self._reconciler: asyncio.Task[None] | None = None
        self._probing: set[str] = set()
        self._next_active: dict[str, float] = {}
        self._ticker: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Counters for tests and gauges: probes sent (by backend) and scrapes (ok, failed).
        self.probes: dict[str, int] = {}
        self.scrapes_ok: dict[str, int] = {}
        self.scrapes_failed: dict[str, int] = {}

    # ---- lifecycle ----

    def apply(self, backends: list[Backend], adapters: Mapping[str, object]) -> None:
        """Plan the tasks for a (new) policy: started (and those of removed or changed backends stopped)
        from the next loop turn on, a batch per turn, if the monitor runs, else on `start`."""
        watches: dict[str, _Watch] = {}
        # isinstance against a runtime-checkable Protocol walks its attributes (0.1 ms a call on 3.11):
        # decided once per adapter class, not per backend (a thousand backends are reloaded on the loop).
        engine_classes: dict[type, bool] = {}
        for b in backends:
            adapter = adapters.get(b.name)
            kind = type(adapter)
            if kind not in engine_classes:
                engine_classes[kind] = isinstance(adapter, InProcessEngine)
            engine = cast(InProcessEngine, adapter) if engine_classes[kind] else None
            plan = probe_plan(b)
            if plan is not None and plan.kind != "metrics" and isinstance(adapter, OwnProbe):
                url, own_headers = adapter.probe_request()
                plan = ProbePlan(plan.kind, url, False, tuple(own_headers.items()))
            watches[b.name] = _Watch(b, plan, engine)
        self._next_active = {n: t for n, t in self._next_active.items() if watches.get(n) == self._watches.get(n)}
        self._watches = watches
        if self._ticker is not None:
            self._reconcile_soon()

    async def start(self) -> None:
        if self._ticker is None:
            self._ticker = asyncio.ensure_future(self._tick_forever())
            self._reconcile_soon()

    async def aclose(self) -> None:
        tasks = [t for t in (self._ticker, self._reconciler, *self._scrapers.values(), *self._tasks) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._ticker = None
        self._reconciler = None
        self._scrapers.clear()
        self._scraping.clear()
        self._tasks.clear()
        if self._session is not None and not self._session.closed:
            await self._session.close()

    def _reconcile_soon(self) -> None:
        if self._reconciler is None or self._reconciler.done():
            self._reconciler = asyncio.ensure_future(self._reconcile())

    def _changes(self) -> tuple[list[str], list[_Watch]]:
        """Scrapers to stop (their backend is gone or changed) and watches to start one for."""
        stale = [name for name, w in self._scraping.items() if self._watches.get(name) != w]
        new = [
            w
            for name, w in self._watches.items()
            if self._scraping.get(name) != w and (w.backend.capacity.metrics_url or w.engine is not None)
        ]
        return stale, new

    async def _reconcile(self) -> None:
        """Bring the scrapers in line with the plan, REPLAN_BATCH task starts or stops per loop turn:
        a reload of a thousand changed backends cancels and starts over a thousand tasks, tens of ms in
        one turn (a stall of every request). Scrapers of unchanged backends keep running. The new ones'
        first scrapes are spread over one interval: started together, they would all scrape in one turn
        of the event loop, a stall then and at every interval after. A plan changed meanwhile (another
        reload) is followed from the next batch on."""
        planned: dict[str, _Watch] | None = None
        stale: list[str] = []
        new: list[_Watch] = []
        started = total = 0
        while True:
            if planned is not self._watches:
                planned = self._watches
                stale, new = self._changes()
                total = started + len(new)
            if not stale and not new:
                return
            for name in stale[:REPLAN_BATCH]:
                self._scrapers.pop(name).cancel()
                del self._scraping[name]
                # Its last gauge must not steer routing forever: in-flight counting until a new scrape.
                self.signals.forget_engine(name)
            starting = new[: max(0, REPLAN_BATCH - len(stale))]
            del stale[:REPLAN_BATCH], new[: len(starting)]
            for w in starting:
                offset = w.backend.capacity.scrape_interval_s * started / total
                self._scrapers[w.backend.name] = asyncio.ensure_future(self._scrape_forever(w, offset))
                self._scraping[w.backend.name] = w
                started += 1
            await asyncio.sleep(0)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar(), trust_env=False, connector=aiohttp.TCPConnector(limit=32)
            )
        return self._session

    async def _get(self, url: str, timeout_s: float, headers: dict[str, str] | None = None) -> tuple[int, str]:
        """Status and (bounded) text of a GET; never follows redirects."""
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with self._client().get(url, timeout=timeout, headers=headers, allow_redirects=False) as r:
            body = await r.content.read(MAX_PAGE_BYTES)
            return r.status, body.decode("utf-8", "replace")

    # ---- probes ----

    async def _tick_forever(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # never let the monitor die; the next tick tries again
                log.exception("health monitor tick failed")
            await asyncio.sleep(TICK_S)

    def tick(self) -> None:
        now = self.clock()
        self.signals.refresh_all(now)
        for key in self.signals.outliers.due_probes(now):
            self._spawn_probe(key, active=False)
        for name, w in self._watches.items():
            interval = w.backend.outlier.active_interval_s
            if interval is None or w.probe is None or name in self.signals.outliers.ejected:
                continue
            due = self._next_active.get(name)
            if due is None or due <= now:
                self._next_active[name] = now + interval
                if due is not None:
                    self._spawn_probe(name, active=True)

    def _spawn_probe(self, key: str, *, active: bool) -> None:
        if key in self._probing:
            return
        w = self._watches.get(key.rpartition("@")[2])
        if w is None or w.probe is None:
            return
        self._probing.add(key)
        task = asyncio.ensure_future(self._probe(key, w.backend, w.probe))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _probe(self, key: str, backend: Backend, plan: ProbePlan) -> None:
        ok = False
        try:
            headers = dict(plan.headers) if plan.headers else None
            key_value = _secret(backend.api_key, self.environ) if plan.authorised else None
            if key_value:
                headers = _auth_headers(backend, key_value)
            self.probes[backend.name] = self.probes.get(backend.name, 0) + 1
            status, text = await self._get(plan.url, backend.outlier.probe_timeout_s, headers)
            ok = 200 <= status < 300
            if ok and plan.kind == "metrics":
                parse(text, backend.capacity.metrics_format)
        except (aiohttp.ClientError, TimeoutError, MetricsPageError, ValueError) as exc:
            log.info("health probe of %s (%s) failed: %s", key, plan.kind, type(exc).__name__)
            ok = False
        finally:
            self._probing.discard(key)
        self.signals.probe_result(key, ok, self.clock())

    # ---- scraping ----

    async def _scrape_forever(self, w: _Watch, offset_s: float = 0.0) -> None:
        cap = w.backend.capacity
        if offset_s > 0:
            await asyncio.sleep(offset_s)
        while True:
            await self.scrape_once(w.backend, w.engine)
            await asyncio.sleep(cap.scrape_interval_s)

    async def scrape_once(self, backend: Backend, engine: InProcessEngine | None = None) -> bool:
        cap = backend.capacity
        name = backend.name
        try:
            if cap.metrics_url:
                status, text = await self._get(cap.metrics_url, cap.scrape_timeout())
                if status != 200:
                    raise MetricsPageError(f"HTTP {status}")
            elif engine is not None:
                text = engine.engine_metrics()
            else:
                return False
            g = parse(text, cap.metrics_format)
        except (aiohttp.ClientError, TimeoutError, MetricsPageError, ValueError) as exc:
            self.scrapes_failed[name] = self.scrapes_failed.get(name, 0) + 1
            if self.scrapes_failed[name] in (1, 10, 100) or self.scrapes_failed[name] % 1000 == 0:
                log.warning("engine metrics of %s unreadable (%s); counted from in-flight once stale", name, exc)
            self.signals.scrape_failed(name, self.clock())
            return False
        self.scrapes_ok[name] = self.scrapes_ok.get(name, 0) + 1
        load = EngineLoad(
            at=self.clock(),
            running=g.running,
            waiting=g.waiting,
            utilisation=g.utilisation(cap.max_concurrency),
            format=g.format,
            kv=g.kv,
        )
        self.signals.engine_load(name, load)
        return True
