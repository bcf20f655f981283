"""The longest event-loop stall while a runtime of an enterprise-size policy is put in force, the old way
against the reloader's: `python -m loadtest.policy_swap [--size 50] [--rounds 6]`.

In one process (no server, no clients), two S-block policies of `loadtest.policy_scale` are put in force
in turn on one `Gateway` (its health monitor running), each swap watched by the reloader's `LoopStalls` (a
5 ms ticker): "on the loop" builds the runtime and sets the unpriced gauges on the event loop, as reloads
did before; "worker thread" compiles it and sets the gauges in worker threads and then drops the replaced
runtime, freed in one cascade, as `gateway.reload` did before the teardown; "worker + teardown" frees it
with `gateway.teardown.dismantle` instead, as `gateway.reload` does now. The three alternate, so all see
the same machine load; an idle watch of the same length gives the floor the machine itself sets. Every
swap gets a freshly checked policy (parse, decode, index: in a thread, before the watch, not measured
here; `loadtest.policy_reload` measures a whole reload under traffic) that nothing else holds, so the
replaced runtime's policy is freed with it, as in a reload. Also prints `gc.get_freeze_count()` after
each round (what `freeze_loaded` keeps out of the collector: it must not grow with every reload).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import tempfile
from collections.abc import Mapping
from pathlib import Path

from gateway.accounting.unpriced import report_unpriced
from gateway.contracts import AdapterFactory
from gateway.policy.decisions import DecisionLog
from gateway.policy.load import check_policy, collector_paused, freeze_loaded
from gateway.policy.model import PolicySet
from gateway.registry import discover_adapters
from gateway.reload import LoopStalls
from gateway.runtime import Gateway, Runtime, Services, build_runtime, compile_runtime, configure_signals
from gateway.state.memory import MemoryStore
from gateway.teardown import dismantle
from gateway.telemetry import Metrics
from gateway.upstream.signals import LiveSignals
from loadtest.policy_reload import policy_text


class _NoAccounting:
    def refused(self, *args: object) -> None:
        return None


async def measure(size: int, rounds: int) -> None:
    factories = discover_adapters()
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for seed in (7, 8):
            path = Path(tmp) / f"{seed}.yaml"
            path.write_text(policy_text(size, seed))
            paths.append(path)
        await _measure(paths, size, rounds, factories)


async def _measure(paths: list[Path], size: int, rounds: int, factories: Mapping[str, AdapterFactory]) -> None:
    def checked(path: Path) -> PolicySet:
        # Every swap gets a freshly checked policy that nothing else holds, as a reload does: the replaced
        # runtime's policy is then freed with it.
        with collector_paused():
            policy, _ = check_policy(path, adapters=factories.keys(), fresh=True)
            assert policy is not None
            freeze_loaded()
        return policy

    services = Services(
        metrics=Metrics(),
        signals=LiveSignals(),
        store=MemoryStore(),
        accounting=_NoAccounting(),  # type: ignore[arg-type]
        decisions=DecisionLog(),
        decode=lambda p: None,  # type: ignore[arg-type,return-value]
    )
    gateway = Gateway(build_runtime(checked(paths[0]), factories, services), services, None, None)  # type: ignore[arg-type]
    await gateway.health.start()
    freeze_loaded()

    def compiled(policy: PolicySet, old: Runtime) -> Runtime:
        # As the reloader does: frozen before the collector resumes.
        with collector_paused():
            runtime = compile_runtime(policy, factories, services, previous=old)
            freeze_loaded()
        return runtime

    ways = ["on the loop", "worker thread", "worker + teardown"]
    stalls: dict[str, list[float]] = {way: [] for way in (*ways, "idle")}
    frozen: list[int] = []
    for i in range(rounds):
        for k, way in enumerate(ways[i % 3 :] + ways[: i % 3]):
            # The reloader's check (parse, decode, index) in its thread: done here before, for every way.
            policy = await asyncio.to_thread(checked, paths[(i * len(ways) + k + 1) % 2])
            await asyncio.sleep(0.3)
            async with LoopStalls() as watch:
                await asyncio.sleep(0.02)  # the ticker runs before the work starts
                if way == "on the loop":
                    new = build_runtime(policy, factories, services, previous=gateway.runtime)
                    gateway.use(new)
                    report_unpriced(policy, services.metrics)
                else:
                    new = await asyncio.to_thread(compiled, policy, gateway.runtime)
                    configure_signals(policy, services.signals)
                    replaced = [gateway.runtime]
                    gateway.use(new)
                    await asyncio.to_thread(report_unpriced, policy, services.metrics)
                    if way == "worker + teardown":
                        await dismantle(replaced)
                    del replaced
                del new, policy
            stalls[way].append(watch.max_s * 1000)
        async with LoopStalls() as watch:
            await asyncio.sleep(0.3)
        stalls["idle"].append(watch.max_s * 1000)
        frozen.append(gc.get_freeze_count())
    await gateway.health.aclose()
    print(f"S={size}: longest event-loop stall per swap (ms)")
    for way, values in stalls.items():
        print(f"  {way:<18} median {statistics.median(values):5.0f}  runs {[round(v) for v in values]}")
    print(f"  gc.get_freeze_count() after each round: {frozen}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=50, help="block count S of the generated policies")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    asyncio.run(measure(args.size, args.rounds))


if __name__ == "__main__":
    main()
