"""Fixtures for the cache store contract suite: a real redis-server (free loopback port, stopped by
PID), a fake clock near the real time (Redis applies the absolute expiries we send, so they must lie in
its future), and store factories for `memory` and `redis`."""

from __future__ import annotations

import itertools
import struct
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis

from gateway.cache.entry import CacheEntry
from gateway.cache.store import CacheStore, open_cache_store
from gateway.state.breaker import BreakerConfig
from tests.harness.redis_proc import RedisProc

BACKENDS = ["memory", "redis"]
TTL_MS = 3_600_000
FAST_BREAKER = BreakerConfig(failures=3, cooldown_s=0.2)


class FakeClock:
    """Epoch milliseconds that only move when a test says so. It starts a day ahead of the real time:
    Redis applies the absolute expiries we send (PXAT) on its own clock, so an entry the fake clock
    gives 1 ms must not vanish in Redis before the test reads it (read-time expiry is ours to check)."""

    def __init__(self) -> None:
        self.now_ms = time.time_ns() // 1_000_000 + 86_400_000

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, ms: int) -> None:
        self.now_ms += ms


_ids = itertools.count()


def unique(prefix: str = "ns") -> str:
    """A fresh hex-like namespace or key (as scope.py's digests are)."""
    return f"{prefix}{next(_ids):06d}"


def vec(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def entry(
    clock: FakeClock,
    text: str = "hello",
    *,
    query: str | None = None,
    vector: bytes | None = None,
    ttl_ms: int = TTL_MS,
) -> CacheEntry:
    body = b'{"object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"%s"}}]}' % (
        text.encode()
    )
    return CacheEntry(
        body=body,
        query=query,
        vector=vector,
        created_ms=clock(),
        expires_ms=clock() + ttl_ms,
        prompt_tokens=3,
        completion_tokens=5,
        model="m-1",
        deployment="d-1",
    )


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProc]:
    with RedisProc() as server:
        yield server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


class Backend:
    """Makes stores of one kind on one clock; closes them after the test."""

    def __init__(self, name: str, url: str, clock: FakeClock, port: int | None) -> None:
        self.name = name
        self.url = url
        self.clock = clock
        self.port = port
        self._made: list[CacheStore] = []

    def store(self, **kwargs: Any) -> CacheStore:
        kwargs.setdefault("timeout_s", 2.0)
        store = open_cache_store(self.url, clock=self.clock, **kwargs)
        self._made.append(store)
        return store

    def replicas(self, n: int) -> list[CacheStore]:
        """n clients of one shared cache (memory: one object, it cannot be shared across processes)."""
        if self.name == "memory":
            return [self.store()] * n
        return [self.store() for _ in range(n)]

    def redis(self) -> redis.Redis:
        assert self.port is not None
        return redis.Redis(port=self.port)

    async def close(self) -> None:
        for store in self._made:
            await store.aclose()


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[Backend]:
    if request.param == "memory":
        b = Backend("memory", "memory", clock, None)
    else:
        server: RedisProc = request.getfixturevalue("redis_server")
        with redis.Redis(port=server.port) as c:
            c.flushall()
        b = Backend("redis", server.url, clock, server.port)
    yield b
    await b.close()


@pytest.fixture
async def redis_backend(redis_server: RedisProc, clock: FakeClock) -> AsyncIterator[Backend]:
    """The Redis backend alone, for what only Redis has (key TTLs, raw keys to corrupt)."""
    with redis.Redis(port=redis_server.port) as c:
        c.flushall()
    b = Backend("redis", redis_server.url, clock, redis_server.port)
    yield b
    await b.close()
