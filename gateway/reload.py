"""Hot reload of the policy: on SIGHUP and when a policy file changes.

A new policy is validated whole and its runtime compiled in worker threads, then swapped in with one
assignment on the event loop, which never waits for the policy's size; requests already running finish
on the runtime they started with. The replaced runtime is then freed in small steps on the loop
(gateway.teardown), once no request started on it is running (`Runtime.held`), not in one deallocation
of the whole policy. The worker threads never hold the GIL for long in one step (gateway.policy.load:
no collection over all a load allocated, no whole-document C call or deallocation) and pass it within
1 ms while a reload runs (`gil_handoff`). The reload's log line says how long it held the event loop
and the longest stall of the loop while it ran (`LoopStalls`). An invalid policy is refused with its
reasons (logged, counted in `strait_policy_reloads_total{result="rejected"}`, and
`strait_policy_last_reload_successful` 0 until a reload succeeds) and the running one keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Coroutine, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gateway.accounting.unpriced import report_unpriced
from gateway.cache.errors import CacheDependencyError, EmbedderError
from gateway.cache.pool import open_embedders
from gateway.contracts import Adapter, AdapterFactory
from gateway.policy.index import PolicyIndex
from gateway.policy.load import PolicyError, Problem, check_policy, collector_paused, freeze_loaded, load_policy
from gateway.policy.model import PolicySet
from gateway.runtime import Gateway, Runtime, compile_runtime, configure_signals
from gateway.teardown import dismantle

log = logging.getLogger("strait.reload")

# How often policy files are checked for changes (seconds); a stat per file, nothing more.
WATCH_INTERVAL_S = 1.0
# Adapters dropped by a reload are closed after this grace, so streams still using them can finish.
CLOSE_GRACE_S = 120.0
# How often the stall watch ticks while a reload runs (seconds).
STALL_TICK_S = 0.005
# The interpreter's switch interval while a reload's worker threads run (`gil_handoff`; default 5 ms).
RELOAD_SWITCH_S = 0.001
# How often a replaced runtime still held by requests is looked at again before it is taken apart.
RETIRE_POLL_S = 0.1


@contextmanager
def gil_handoff(interval_s: float = RELOAD_SWITCH_S) -> Iterator[None]:
    """The interpreter's switch interval lowered to `interval_s` while a reload's worker threads run: a
    thread that wants the GIL (the event loop, after each wait for I/O) asks the running one to pass it
    and gets it within the interval. At the default 5 ms the loop waits up to 5 ms each time it wakes
    while a CPU-bound check runs, several times per request. Process-wide; the previous value comes
    back when the reload ends (reloads run one at a time)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, interval_s))
    try:
        yield
    finally:
        sys.setswitchinterval(before)


class LoopStalls:
    """The longest the event loop went without running a 5 ms ticker while a reload ran, beyond the
    tick: what a request arriving then waited at most before the loop got to it. Logged with the reload
    (on a shared machine it also counts the time the process was not scheduled at all)."""

    def __init__(self) -> None:
        self.max_s = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(STALL_TICK_S)
            self.max_s = max(self.max_s, time.perf_counter() - before - STALL_TICK_S)

    async def __aenter__(self) -> LoopStalls:
        self._task = asyncio.ensure_future(self._tick())
        return self

    async def __aexit__(self, *exc: object) -> None:
        # One more tick first: a stall that ended the watched work (freeing the replaced policy, when no
        # request holds it any more) is counted too.
        await asyncio.sleep(2 * STALL_TICK_S)
        if self._task is not None:
            self._task.cancel()


def _fingerprint(path: Path) -> tuple[tuple[str, int, int], ...]:
    files = sorted(path.glob("*.y*ml")) if path.is_dir() else [path]
    out = []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        out.append((str(f), st.st_mtime_ns, st.st_size))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Rejected:
    """A reload that was refused: when, and why (each error as `file:line:col: reason`)."""

    at: float
    errors: tuple[str, ...]


class PolicyReloader:
    def __init__(self, gateway: Gateway, policy_path: str, factories: Mapping[str, AdapterFactory]) -> None:
        self.gateway = gateway
        self.path = Path(policy_path)
        self.factories = factories
        # What the console shows (gateway.api.console): when the policy in force was loaded (wall clock),
        # and the last refused reload (None: none since start; kept after a later success, which is newer).
        self.loaded_at = time.time()
        self.last_rejected: Rejected | None = None
        self._seen = _fingerprint(self.path)
        # The files as the last reload (or the start) read them: the watcher's tick that saw a change a
        # SIGHUP's reload has since read finds nothing left to do (one change, one reload).
        self._read = self._seen
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[object]] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        except (NotImplementedError, RuntimeError, ValueError):
            log.warning("SIGHUP reload is not available in this process; file watching still works")
        self._spawn(self._watch())

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()

    def _spawn(self, coro: Coroutine[None, None, object]) -> None:
        task: asyncio.Task[object] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_sighup(self) -> None:
        log.warning("SIGHUP: reloading policy %s", self.path)
        self._spawn(self.reload())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            current = await asyncio.to_thread(_fingerprint, self.path)
            if current != self._seen:
                self._seen = current
                await self.reload(only_if_changed=True)

    async def reload(self, *, only_if_changed: bool = False) -> bool:
        """Validate and swap; True when the new policy is in force. Everything that grows with the policy
        runs in worker threads; the event loop only swaps and starts tasks (`LoopStalls` measures it).
        `only_if_changed` (the file watcher): nothing is done when the files are as the last reload read
        them (a SIGHUP's reload got there first); a SIGHUP always reloads."""
        async with self._lock:
            current = await asyncio.to_thread(_fingerprint, self.path)
            if only_if_changed and current == self._read:
                return False
            if only_if_changed:
                log.warning("policy files changed: reloading %s", self.path)
            self._read = self._seen = current
            async with LoopStalls() as stalls:
                with gil_handoff():
                    done = await self._reload()
                if done is not None and not done[3][0].held.count:
                    # Taken apart now, in the stall watch's window (and before the log line says "in force").
                    await dismantle(done[3])
                elif done is not None:
                    self._spawn(self._retire(done[3]))
            if done is None:
                return False
            version, on_loop_ms, on_loop_cpu_ms, _ = done
            log.warning(
                "policy %s in force (version %s; %.0f ms of it on the event loop, %.0f ms CPU; longest "
                "event-loop stall during the reload %.0f ms)",
                self.path,
                version,
                on_loop_ms,
                on_loop_cpu_ms,
                stalls.max_s * 1000,
            )
            await self._reload_shadow()
            return True

    async def _reload(self) -> tuple[str, float, float, list[Runtime]] | None:
        """The reload itself: (the new policy's version, ms of wall clock and of CPU on the event loop,
        the replaced runtime in a list that holds its only reference, for `dismantle`), or None when it
        is refused."""
        metrics = self.gateway.metrics
        services = self.gateway.services
        policy, problems = await asyncio.to_thread(self._check)
        if policy is None:
            errors = tuple(str(p) for p in problems if p.severity == "error")
            for error in errors:
                log.error("policy reload refused: %s", error)
            self.last_rejected = Rejected(time.time(), errors)
            metrics.policy_reloads.labels("rejected").inc()
            metrics.policy_reload_ok.set(0)
            return None
        old = self.gateway.runtime
        try:
            # A new embedder loads its model in a worker thread first, never on the event loop.
            await asyncio.to_thread(open_embedders, policy, services.embedders)
            # The runtime is compiled in a worker thread too (its index was built with the check): adapters,
            # stages and limit tables are tens of ms at enterprise size, a stall of every request on the loop.
            new = await asyncio.to_thread(self._compile, policy, old)
            # On the event loop, what belongs to it (timed below): the cache's warm-up, the live signals'
            # settings, the swap and the health monitor's tasks.
            started, started_cpu = time.perf_counter(), time.thread_time()
            if new.cache is not None:
                await new.cache.warm()
        except (ValueError, CacheDependencyError, EmbedderError) as exc:  # e.g. an api_key env var that is not set
            log.error("policy reload refused: %s", exc)
            self.last_rejected = Rejected(time.time(), (f"{self.path}: {exc}",))
            metrics.policy_reloads.labels("rejected").inc()
            metrics.policy_reload_ok.set(0)
            return None
        configure_signals(policy, services.signals)
        self.gateway.use(new)
        self.loaded_at = time.time()
        # Wall clock, and this thread's CPU (steadier on a busy machine; both include the cache's warm-up).
        on_loop_ms = (time.perf_counter() - started) * 1000
        on_loop_cpu_ms = (time.thread_time() - started_cpu) * 1000
        metrics.policy_reloads.labels("applied").inc()
        metrics.policy_reload_ok.set(1)
        # Thousands of gauge series at enterprise size: set off the loop (prometheus_client locks them).
        await asyncio.to_thread(report_unpriced, policy, metrics)
        dropped = [a for name, a in old.adapters.items() if new.adapters.get(name) is not a]
        if dropped:
            self._spawn(self._close_later(dropped))
        replaced = [old]
        del old
        return new.index.version, on_loop_ms, on_loop_cpu_ms, replaced

    async def _retire(self, replaced: list[Runtime]) -> None:
        """Take the replaced runtime apart once the last request started on it has ended (a stream can
        run for minutes; a runtime nobody holds is taken apart at once, by `reload`)."""
        while replaced[0].held.count:
            await asyncio.sleep(RETIRE_POLL_S)
        await dismantle(replaced)

    def _compile(self, policy: PolicySet, old: Runtime) -> Runtime:
        """In the worker thread: the runtime of `policy` (gateway.runtime.compile_runtime), built with the
        cyclic collector held to young passes over bounded batches (a collection over all the build
        allocated would hold the GIL, a loop stall) and frozen out of its reach before the collector
        resumes, like the checked policy."""
        with collector_paused():
            runtime = compile_runtime(policy, self.factories, self.gateway.services, previous=old)
            freeze_loaded()
        return runtime

    def _check(self) -> tuple[PolicySet | None, list[Problem]]:
        """In the worker thread: check the policy (its index is built then, and reused by build_runtime)
        and freeze what it built out of the cyclic collector's reach (gateway.policy.load.freeze_loaded)
        before the collector resumes: its first pass would otherwise scan every object the check
        allocated, 50-60 ms holding the GIL at S=50."""
        with collector_paused():
            policy, problems = check_policy(self.path, adapters=self.factories.keys())
            if policy is not None:
                freeze_loaded()
        return policy, problems

    async def _reload_shadow(self) -> None:
        """The shadow policy (if any) is read again with the live one, off the event loop; a shadow that
        no longer loads is refused with its reasons and the previous one keeps shadowing."""
        shadow = self.gateway.services.shadow
        if shadow is None:
            return
        try:
            index = await asyncio.to_thread(lambda: PolicyIndex(load_policy(shadow.path)))
        except PolicyError as exc:
            log.error("shadow policy reload refused: %s", exc)
            return
        shadow.replace(index)
        log.warning("shadow policy %s in force (version %s)", shadow.path, index.version)

    async def _close_later(self, adapters: list[Adapter]) -> None:
        await asyncio.sleep(CLOSE_GRACE_S)
        for adapter in adapters:
            await adapter.aclose()
