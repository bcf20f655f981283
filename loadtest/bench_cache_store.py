"""The cache store's calls alone, on a throwaway redis-server (free loopback port, stopped by PID) and on
the memory store: latency per call (p50 / p99, one client, sequential), so the stage's lookup cost can be
read apart from embedding and HTTP.

    .venv/bin/python -m loadtest.bench_cache_store [--rows 1000] [--dims 384] [--calls 2000]

Rows: one namespace of `rows` entries, each with a `dims`-float vector and a ~1 KB body.
- get (hit)                    the exact tier: one GET
- vectors (current copy)       one EVALSHA answering "nothing new"
- vectors (1 new entry)        one EVALSHA returning one row (after another replica's put)
- vectors (new replica)        a replica's first lookup of the namespace (one page of rows), and the
                               total over the lookups it takes to catch up with the whole namespace
- matrix build                 numpy (rows, dims) from the raw bytes, once per changed snapshot
- put                          one EVALSHA (bounds, index, expiry)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import struct
import time
from collections.abc import Awaitable, Callable

from gateway.cache.entry import CacheEntry
from gateway.cache.store import open_cache_store
from tests.harness.redis_proc import RedisProc


def _entry(i: int, dims: int) -> CacheEntry:
    now = time.time_ns() // 1_000_000
    vector = struct.pack(f"<{dims}f", *([1.0 / dims**0.5] * dims))
    return CacheEntry(
        body=b'{"object":"chat.completion","pad":"' + b"x" * 1000 + b'"}',
        query=f"question number {i}",
        vector=vector,
        created_ms=now,
        expires_ms=now + 3_600_000,
    )


async def _timed(n: int, fn: Callable[[int], Awaitable[object]]) -> tuple[float, float]:
    took = []
    for i in range(n):
        t = time.perf_counter()
        await fn(i)
        took.append((time.perf_counter() - t) * 1000)
    took.sort()
    return statistics.median(took), took[int(len(took) * 0.99) - 1]


async def bench(url: str, rows: int, dims: int, calls: int) -> list[tuple[str, float, float]]:
    one = open_cache_store(url, timeout_s=1.0)
    two = open_cache_store(url, timeout_s=1.0) if url != "memory" else one
    out: list[tuple[str, float, float]] = []
    try:
        ns = f"bench{time.time_ns()}"
        bound = {"max_entries": rows + calls + 10, "max_bytes": 1 << 34}
        for i in range(rows):
            await one.put(ns, f"k{i}", _entry(i, dims), **bound)
        out.append(("get (hit)", *await _timed(calls, lambda i: one.get(ns, f"k{i % rows}"))))
        await two.vectors(ns)
        out.append(("vectors (current copy)", *await _timed(calls, lambda i: two.vectors(ns))))

        async def new_then_look(i: int) -> None:
            await one.put(ns, f"n{i}", _entry(i, dims), **bound)
            t = time.perf_counter()
            await two.vectors(ns)
            lookups.append((time.perf_counter() - t) * 1000)

        lookups: list[float] = []
        await _timed(min(calls, 500), new_then_look)
        lookups.sort()
        out.append(("vectors (1 new entry)", statistics.median(lookups), lookups[int(len(lookups) * 0.99) - 1]))
        out.append(("put", *await _timed(min(calls, 500), lambda i: one.put(ns, f"p{i}", _entry(i, dims), **bound))))
        if url != "memory":
            firsts, catchups, lookups_needed = [], [], 0
            total = len(await two.vectors(ns))
            for _ in range(10):
                fresh = open_cache_store(url, timeout_s=5.0)
                t = time.perf_counter()
                await fresh.vectors(ns)
                firsts.append((time.perf_counter() - t) * 1000)
                lookups_needed = 1
                while len(await fresh.vectors(ns)) < total:
                    lookups_needed += 1
                catchups.append((time.perf_counter() - t) * 1000)
                await fresh.aclose()
            firsts.sort()
            catchups.sort()
            out.append(("vectors (new replica: first page)", statistics.median(firsts), firsts[-1]))
            out.append(
                (
                    f"  whole namespace ({total} rows, {lookups_needed} lookups)",
                    statistics.median(catchups),
                    catchups[-1],
                )
            )
        builds = []
        for _ in range(20):
            vs = await two.vectors(ns)
            vs._matrix = None
            t = time.perf_counter()
            _ = vs.matrix
            builds.append((time.perf_counter() - t) * 1000)
        builds.sort()
        out.append((f"matrix build ({len(vs)} x {dims})", statistics.median(builds), builds[-1]))
    finally:
        await one.aclose()
        if two is not one:
            await two.aclose()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--dims", type=int, default=384)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    with RedisProc() as server:
        for name, url in (("memory", "memory"), ("redis", server.url)):
            results = asyncio.run(bench(url, args.rows, args.dims, args.calls))
            print(f"\n{name}: {args.rows} rows x {args.dims} dims")
            print(f"{'call':<40} {'p50 ms':>8} {'p99 ms':>8}")
            for label, p50, p99 in results:
                print(f"{label:<40} {p50:8.3f} {p99:8.3f}")


if __name__ == "__main__":
    main()
