"""CPU cost of one admission: memory store, and Redis store (one script call). Not a test (not collected).

    .venv/bin/python -m tests.state.bench_admission [--n 5000]

Starts its own redis-server on a free loopback port. "CPU" is this process's user+system time per call
(`time.process_time`); "redis" is the server's own time per script (`INFO commandstats`, evalsha).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable

import redis

from gateway.state import Limits, Store, Usage, open_store
from tests.harness.redis_proc import RedisProc
from tests.state.helpers import budget, request, rpm, slots, tpm

ONE_RPM = Limits(rates=(rpm(10**9),))
TYPICAL = Limits(
    rates=(rpm(10**9, "key"), tpm(10**9, "key"), rpm(10**9, "tenant"), tpm(10**9, "route")),
    concurrency=(slots(10**6, "key"),),
    budgets=(budget(10**12, "tenant"), budget(10**12, "key", "usd", "month")),
)


async def measure(label: str, n: int, once: Callable[[int], Awaitable[object]]) -> None:
    for i in range(min(500, n)):
        await once(i)
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
        await once(i)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"  {label:52s} cpu {cpu / n * 1e6:7.1f} us   wall {wall / n * 1e6:7.1f} us")


async def concurrent(label: str, n: int, store: Store, limits: Limits, width: int = 64) -> None:
    async def worker(k: int) -> None:
        for _ in range(k):
            await store.admit(request(limits, tokens=100, cost=10))

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(n // width) for _ in range(width)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    done = n // width * width
    print(f"  {label:52s} cpu {cpu / done * 1e6:7.1f} us   {done / wall:8.0f} admissions/s")


def redis_usec_per_script(port: int) -> float:
    with redis.Redis(port=port) as c:
        stats = c.info("commandstats")
        return float(stats.get("cmdstat_evalsha", {}).get("usec_per_call", 0.0))


async def main(n: int) -> None:
    print("memory store")
    mem = open_store("memory")
    await measure("admit, 1 RPM check", n, lambda i: mem.admit(request(ONE_RPM)))
    await measure("admit, 4 rates + 1 slot + 2 budgets", n, lambda i: mem.admit(request(TYPICAL, tokens=100, cost=10)))

    async def admit_reconcile(store: Store) -> None:
        adm = await store.admit(request(TYPICAL, tokens=100, cost=10))
        assert adm.ticket is not None
        await store.reconcile(adm.ticket, Usage(tokens=50, cost_micro_usd=5))

    await measure("admit + reconcile, typical limits", n, lambda i: admit_reconcile(mem))

    with RedisProc() as server:
        print(f"redis store (redis-server {server.port}, redis-py asyncio + hiredis)")
        store = open_store(server.url, timeout_s=1.0)
        await store.ping()
        with redis.Redis(port=server.port) as c:
            c.config_resetstat()
        await measure("PING round trip (redis-py floor)", n, lambda i: store.ping())
        await measure("admit, 1 RPM check", n, lambda i: store.admit(request(ONE_RPM)))
        one = redis_usec_per_script(server.port)
        with redis.Redis(port=server.port) as c:
            c.config_resetstat()
        await measure(
            "admit, 4 rates + 1 slot + 2 budgets", n, lambda i: store.admit(request(TYPICAL, tokens=100, cost=10))
        )
        typical = redis_usec_per_script(server.port)
        await measure("admit + reconcile, typical limits", n, lambda i: admit_reconcile(store))
        await concurrent("admit, typical, 64 in flight", n, store, TYPICAL)
        print(f"  redis-server time per admit script: 1 RPM {one:.1f} us, typical {typical:.1f} us")
        await store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=5000)
    asyncio.run(main(parser.parse_args().n))
