"""Model-based property test: generated programs of puts (overwrites, mixed TTLs and sizes, with and
without vectors), deletes and clock moves run against a plain reference model, the memory store, and
three Redis store instances (replicas; one fetching two rows per sync) on one real redis-server, all on the same fake clock. After every
step each store must agree with the model on every `get` and on `vectors()` (the Redis replicas each
read through their own in-process copy, so this also checks the sync under arbitrary interleavings).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from gateway.cache.entry import CacheEntry, encode_entry, encode_record, vector_record
from gateway.cache.redis_store import RedisCacheStore
from gateway.cache.store import CacheStore, open_cache_store
from tests.cache.conftest import FakeClock, vec
from tests.harness.redis_proc import RedisProc

pytestmark = pytest.mark.timeout(300)

_programs = itertools.count()
NAMESPACES = 2
KEYS = 5
PAGED = 2  # the third Redis replica fetches at most two rows per sync

put_op = st.tuples(
    st.just("put"),
    st.integers(0, NAMESPACES - 1),
    st.integers(0, KEYS - 1),
    st.sampled_from([1, 50, 1000, 60_000]),  # ttl ms
    st.integers(0, 400),  # body padding: varies the size
    st.booleans(),  # with a vector
    st.integers(0, 2),  # through which replica
)
delete_op = st.tuples(st.just("delete"), st.integers(0, NAMESPACES - 1), st.integers(0, KEYS - 1), st.integers(0, 2))
advance_op = st.tuples(st.just("advance"), st.sampled_from([1, 49, 500, 2000]))
programs = st.lists(st.one_of(put_op, put_op, delete_op, advance_op), min_size=1, max_size=30)


@dataclass
class Row:
    key: str
    entry: CacheEntry
    size: int


class Model:
    """The contract, as plainly as it can be said."""

    def __init__(self) -> None:
        self.rows: dict[str, list[Row]] = {}

    def put(self, ns: str, key: str, entry: CacheEntry, max_entries: int, max_bytes: int, now: int) -> None:
        record = vector_record(entry)
        size = len(encode_entry(entry)) + (len(encode_record(record)) if record else 0) + len(key)
        if entry.expires_ms <= now or size > max_bytes:
            return
        rows = [r for r in self.rows.get(ns, []) if r.entry.expires_ms > now and r.key != key]
        while rows and (len(rows) + 1 > max_entries or sum(r.size for r in rows) + size > max_bytes):
            rows.pop(0)  # oldest first
        self.rows[ns] = [*rows, Row(key, entry, size)]

    def delete(self, ns: str, key: str) -> None:
        self.rows[ns] = [r for r in self.rows.get(ns, []) if r.key != key]

    def get(self, ns: str, key: str, now: int) -> CacheEntry | None:
        return next((r.entry for r in self.rows.get(ns, []) if r.key == key and r.entry.expires_ms > now), None)

    def vector_keys(self, ns: str, now: int) -> tuple[str, ...]:
        return tuple(r.key for r in self.rows.get(ns, []) if r.entry.expires_ms > now and r.entry.vector)


async def run(
    stores: list[CacheStore], clock: FakeClock, program: list[tuple[object, ...]], bounds: tuple[int, int]
) -> None:
    tag = next(_programs)
    names = [f"p{tag}n{i}" for i in range(NAMESPACES)]
    keys = [f"k{i}" for i in range(KEYS)]
    max_entries, max_bytes = bounds
    model = Model()
    for step, op in enumerate(program):
        if op[0] == "put":
            _, n, k, ttl, pad, has_vector, via = op
            assert isinstance(ttl, int) and isinstance(pad, int) and isinstance(via, int)
            entry = CacheEntry(
                body=b'{"step":%d,"pad":"%s"}' % (step, b"x" * pad),
                query=f"q{step}" if has_vector else None,
                vector=vec(float(step), 1.0) if has_vector else None,
                created_ms=clock(),
                expires_ms=clock() + ttl,
            )
            ns, key = names[int(str(n))], keys[int(str(k))]
            model.put(ns, key, entry, max_entries, max_bytes, clock())
            await stores[via % len(stores)].put(ns, key, entry, max_entries=max_entries, max_bytes=max_bytes)
        elif op[0] == "delete":
            _, n, k, via = op
            ns, key = names[int(str(n))], keys[int(str(k))]
            model.delete(ns, key)
            await stores[int(str(via)) % len(stores)].delete(ns, key)
        else:
            clock.advance(int(str(op[1])))
        now = clock()
        for i, store in enumerate(stores):
            for ns in names:
                want = model.vector_keys(ns, now)
                got = (await store.vectors(ns)).keys
                if i == PAGED:
                    # Two rows per reply: after a reload this replica catches up over a few lookups,
                    # each showing a prefix (the oldest rows) of the namespace.
                    for _ in range(KEYS):
                        if got == want:
                            break
                        assert got == want[: len(got)], (step, op)
                        got = (await store.vectors(ns)).keys
                assert got == want, (step, op)
                for key in keys:
                    assert await store.get(ns, key) == model.get(ns, key, now), (step, op, key)
            assert store.errors == 0


bounds = st.tuples(st.integers(1, 4), st.sampled_from([300, 700, 1500, 1 << 30]))


@pytest.fixture(scope="module")
def model_loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(program=programs, limits=bounds)
def test_the_memory_store_matches_the_model(
    model_loop: asyncio.AbstractEventLoop, program: list[tuple[object, ...]], limits: tuple[int, int]
) -> None:
    clock = FakeClock()
    store = open_cache_store("memory", clock=clock, timeout_s=1.0)
    model_loop.run_until_complete(run([store], clock, program, limits))


@pytest.fixture(scope="module")
def model_redis(
    model_loop: asyncio.AbstractEventLoop, redis_server: RedisProc
) -> Iterator[tuple[list[CacheStore], FakeClock]]:
    clock = FakeClock()
    stores = [open_cache_store(redis_server.url, clock=clock, timeout_s=2.0) for _ in range(2)]
    stores.append(RedisCacheStore(Redis.from_url(redis_server.url), timeout_s=2.0, clock=clock, sync_page=2))
    yield stores, clock
    for store in stores:
        model_loop.run_until_complete(store.aclose())


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(program=programs, limits=bounds)
def test_three_redis_replicas_match_the_model(
    model_loop: asyncio.AbstractEventLoop,
    model_redis: tuple[list[CacheStore], FakeClock],
    program: list[tuple[object, ...]],
    limits: tuple[int, int],
) -> None:
    stores, clock = model_redis
    model_loop.run_until_complete(run(stores, clock, program, limits))


served_ops = st.lists(
    st.tuples(
        st.sampled_from(["acme", "globex", "acme-2", "ACME"]),
        st.sampled_from(["r1", "r2", "chatcmpl-3"]),
        st.integers(0, 99),
    ),
    min_size=1,
    max_size=20,
)


async def run_served(store: CacheStore, program: list[tuple[str, str, int]]) -> None:
    """Whatever is remembered, a tenant reads back exactly its own last mapping for a response id."""
    tag = next(_programs)
    model: dict[tuple[str, str], tuple[str, str]] = {}
    for tenant, rid, n in program:
        rid = f"{rid}-{tag}"
        await store.remember_served(tenant, rid, f"ns{n}", f"key{n}", 600)
        model[(tenant, rid)] = (f"ns{n}", f"key{n}")
        for t in ("acme", "globex", "acme-2", "ACME"):
            for r in ("r1", "r2", "chatcmpl-3"):
                assert await store.served(t, f"{r}-{tag}") == model.get((t, f"{r}-{tag}"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(program=served_ops)
def test_a_tenant_reads_only_its_own_served_mappings(
    model_loop: asyncio.AbstractEventLoop,
    model_redis: tuple[list[CacheStore], FakeClock],
    program: list[tuple[str, str, int]],
) -> None:
    stores, clock = model_redis
    memory = open_cache_store("memory", clock=clock, timeout_s=1.0)
    model_loop.run_until_complete(run_served(memory, program))
    model_loop.run_until_complete(run_served(stores[0], program))
