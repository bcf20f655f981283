"""Fixtures for the store contract suite: real redis-server processes, a fake clock, store factories.

`backend` parametrises a test over the implementations: `memory`, `redis` (one server) and, where a
test opts in with `@pytest.mark.parametrize("backend", LIMITER_BACKENDS, indirect=True)`, `cluster`
(3 primaries). The servers are started once per session and emptied before each test.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from gateway.state import BreakerConfig, Store, open_store
from tests.harness.redis_proc import RedisClusterProcs, RedisProc

CONTRACT_BACKENDS = ["memory", "redis"]
LIMITER_BACKENDS = ["memory", "redis", "cluster"]

# 2026-11-24 12:00:00 UTC in epoch ms: far from midnight and month ends unless a test moves it.
NOON = 1_795_521_600_000


class FakeClock:
    """Epoch milliseconds that only move when a test says so."""

    def __init__(self, now_ms: int = NOON) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, ms: int) -> None:
        self.now_ms += ms


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProc]:
    with RedisProc() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterProcs]:
    with RedisClusterProcs() as cluster:
        yield cluster


def flush(ports: list[int]) -> None:
    for port in ports:
        with redis.Redis(port=port) as c:
            c.flushall()


def strait_keys(ports: list[int]) -> dict[bytes, int]:
    """Every `strait:*` key on these servers with its PTTL (-1: no TTL)."""
    found: dict[bytes, int] = {}
    for port in ports:
        with redis.Redis(port=port) as c:
            for key in c.scan_iter(match="strait:*", count=1000):
                found[key] = int(c.pttl(key))
    return found


class Backend:
    """Makes stores of one kind; every store a test makes here is closed after it."""

    def __init__(self, name: str, url: str, ports: list[int]) -> None:
        self.name = name
        self.url = url
        self.ports = ports
        self._made: list[Store] = []
        self._shared_memory: Store | None = None

    def store(self, *, clock: Callable[[], int] | None = None, **kwargs: Any) -> Store:
        # Generous: these tests are about what the store answers, not how fast; 500 racing calls to a
        # three-node cluster on a loaded two-core machine took over 2 s (every admission degraded). The
        # tests of timeouts and failing open set their own (test_failure_modes.py).
        kwargs.setdefault("timeout_s", 20.0)
        store = open_store(self.url, clock=clock, **kwargs)
        self._made.append(store)
        return store

    def replicas(self, n: int, **kwargs: Any) -> list[Store]:
        """n independent clients of one shared store (memory: one store object, it cannot be shared)."""
        if self.name == "memory":
            one = self.store(**kwargs)
            return [one] * n
        return [self.store(**kwargs) for _ in range(n)]

    def key_ttls(self) -> dict[bytes, int]:
        return strait_keys(self.ports)

    async def close(self) -> None:
        for store in self._made:
            await store.close()


_ids = itertools.count()


@pytest.fixture(params=CONTRACT_BACKENDS)
async def backend(request: pytest.FixtureRequest) -> Any:
    name = request.param
    if name == "memory":
        b = Backend("memory", "memory", [])
    elif name == "redis":
        server: RedisProc = request.getfixturevalue("redis_server")
        flush([server.port])
        b = Backend("redis", server.url, [server.port])
    else:
        cluster: RedisClusterProcs = request.getfixturevalue("redis_cluster")
        ports = [n.port for n in cluster.nodes]
        flush(ports)
        b = Backend("cluster", cluster.url, ports)
    yield b
    await b.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


FAST_BREAKER = BreakerConfig(failures=3, cooldown_s=0.2)


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}"
