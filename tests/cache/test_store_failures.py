"""A cache store failure is a miss or a no-op within the timeout, never an exception: Redis killed,
frozen, never there, or holding garbage. And the replica sync's own promises (one round trip when
current; a namespace that lost its data is rebuilt, not merged)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import redis
import redis.asyncio

from gateway.cache.redis_store import RedisCacheStore, namespace_prefix
from gateway.cache.store import open_cache_store
from gateway.cache.vectors import VectorIndex
from gateway.state.breaker import BreakerConfig
from tests.cache.conftest import FAST_BREAKER, Backend, FakeClock, entry, unique, vec
from tests.harness.procs import free_port
from tests.harness.redis_proc import RedisProc
from tests.harness.waiting import timed, wait_until

pytestmark = pytest.mark.timeout(60)
T = TypeVar("T")

# Generous enough that a healthy Redis answers in time on a loaded 2-core machine.
TIMEOUT_S = 0.25
# What a failed call may cost beyond the timeout on a busy machine (scheduling), far below "hangs".
MARGIN_S = 0.15
BIG = 1 << 30


def redis_store(url: str, clock: FakeClock, breaker: BreakerConfig = FAST_BREAKER) -> RedisCacheStore:
    store = open_cache_store(url, timeout_s=TIMEOUT_S, clock=clock, breaker=breaker)
    assert isinstance(store, RedisCacheStore)
    return store


async def every_call_misses(store: RedisCacheStore, clock: FakeClock, ns: str) -> list[float]:
    """Each operation once against a failed store: a miss / no-op, no exception; the time each took."""
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: store.get(ns, "k1"),
        lambda: store.vectors(ns),
        lambda: store.put(ns, "k9", entry(clock, query="q", vector=vec(1, 0)), max_entries=10, max_bytes=BIG),
        lambda: store.delete(ns, "k1"),
        lambda: store.add_bad_hit(ns),
        lambda: store.bad_hits(ns),
        lambda: store.remember_served("acme", "r1", ns, "k1", 60),
        lambda: store.served("acme", "r1"),
    ]
    expected: list[Any] = [None, 0, None, None, 0, 0, None, None]
    took = []
    for call, want in zip(calls, expected, strict=True):
        result, seconds = await timed(call)
        assert (len(result) if want == 0 and hasattr(result, "keys") else result) == want
        took.append(seconds)
    return took


async def test_killed_redis_misses_within_the_timeout_then_the_breaker_skips_it(
    fresh_redis: RedisProc, clock: FakeClock
) -> None:
    store = redis_store(fresh_redis.url, clock, BreakerConfig(failures=3, cooldown_s=30))
    ns = unique()
    try:
        await store.put(ns, "k1", entry(clock, query="q", vector=vec(1, 0)), max_entries=10, max_bytes=BIG)
        assert await store.get(ns, "k1") is not None and len(await store.vectors(ns)) == 1
        fresh_redis.kill()
        took = await every_call_misses(store, clock, ns)
        assert max(took) < TIMEOUT_S + MARGIN_S
        assert store.errors == 3 and store.breaker_state == "open"
        assert store.skipped == 5  # after three failures the breaker skipped the other five calls
        _, seconds = await timed(lambda: store.get(ns, "k1"))
        assert seconds < TIMEOUT_S / 2 and store.skipped == 6
    finally:
        await store.aclose()


async def test_frozen_redis_costs_at_most_the_timeout_and_recovers(fresh_redis: RedisProc, clock: FakeClock) -> None:
    store = redis_store(fresh_redis.url, clock)
    ns = unique()
    try:
        await store.put(ns, "k1", entry(clock), max_entries=10, max_bytes=BIG)
        fresh_redis.freeze()
        took = await every_call_misses(store, clock, ns)
        assert max(took) < TIMEOUT_S + MARGIN_S
        assert store.errors >= 3
        fresh_redis.thaw()

        async def back() -> bool:
            return await store.get(ns, "k1") is not None

        await wait_until(back)  # the same store object recovers once the breaker's cool-down passed
        assert store.breaker_state == "closed"
        fresh_redis.freeze()
        _, seconds = await timed(store.aclose)  # shutting down never hangs on a frozen server
        assert seconds < 1.0 + MARGIN_S
    finally:
        if fresh_redis.frozen:
            fresh_redis.thaw()
        await store.aclose()


async def test_a_store_opened_with_redis_never_there_misses(clock: FakeClock) -> None:
    store = redis_store(f"redis://127.0.0.1:{free_port()}/0", clock)
    try:
        took = await every_call_misses(store, clock, unique())
        assert max(took) < TIMEOUT_S + MARGIN_S and store.errors >= 1
    finally:
        await store.aclose()


async def test_garbage_in_redis_is_a_miss_and_counted(redis_backend: Backend) -> None:
    store = redis_backend.store()
    assert isinstance(store, RedisCacheStore)
    clock = redis_backend.clock
    ns = unique()
    prefix = namespace_prefix(ns)
    await store.put(ns, "good", entry(clock, query="q", vector=vec(1, 0)), max_entries=10, max_bytes=BIG)
    await store.put(ns, "bad", entry(clock, query="q2", vector=vec(0, 1)), max_entries=10, max_bytes=BIG)
    with redis_backend.redis() as r:
        r.set(prefix + "e:bad", b"\xc1 not msgpack", keepttl=True)
        r.hset(prefix + "vec", "bad", b"\x00garbage")
        r.hset(prefix + "e:wrongtype", "a", "b")  # WRONGTYPE on GET: a server error, not garbage bytes
        r.set(prefix + "bad", b"many")
        r.set("strait:cache:served:{x}:y", b"junk")
    assert await store.get(ns, "bad") is None and store.errors == 1
    assert (await store.vectors(ns)).keys == ("good",) and store.errors == 2
    assert await store.get(ns, "wrongtype") is None and store.errors == 3
    assert await store.bad_hits(ns) == 0 and store.errors == 4
    assert await store.get(ns, "good") is not None


async def test_a_current_replica_pays_one_round_trip_per_lookup(redis_backend: Backend) -> None:
    store, clock = redis_backend.store(), redis_backend.clock
    ns = unique()
    for i in range(20):
        await store.put(ns, f"k{i}", entry(clock, query=f"q{i}", vector=vec(i, 1)), max_entries=100, max_bytes=BIG)
    assert len(await store.vectors(ns)) == 20
    with redis_backend.redis() as r:
        before = r.info("commandstats")
        for _ in range(5):
            assert len(await store.vectors(ns)) == 20
        after = r.info("commandstats")
    changed = {k: after[k]["calls"] - before.get(k, {"calls": 0})["calls"] for k in after}
    changed = {k: v for k, v in changed.items() if v and k != "cmdstat_info"}
    # One EVALSHA per lookup (commandstats also counts the script's own HMGET inside it; nothing else,
    # so the current copy was answered without fetching a row).
    assert changed == {"cmdstat_evalsha": 5, "cmdstat_hmget": 5}


async def test_many_concurrent_lookups_of_one_namespace_share_one_sync(redis_backend: Backend) -> None:
    store, clock = redis_backend.store(), redis_backend.clock
    ns = unique()
    await store.put(ns, "k", entry(clock, query="q", vector=vec(1, 0)), max_entries=10, max_bytes=BIG)
    with redis_backend.redis() as r:
        before = r.info("commandstats")["cmdstat_evalsha"]["calls"]
        sets = await asyncio.gather(*(store.vectors(ns) for _ in range(50)))
        after = r.info("commandstats")["cmdstat_evalsha"]["calls"]
    assert all(s.keys == ("k",) for s in sets)
    assert after - before == 1


async def test_a_namespace_that_lost_its_data_is_rebuilt_not_merged(redis_backend: Backend) -> None:
    """Redis restarted empty (or the namespace expired whole): new entries reuse sequence numbers, so a
    replica must notice the new life (`born`) and drop what it had."""
    one, two = redis_backend.replicas(2)
    clock = redis_backend.clock
    ns = unique()
    await one.put(ns, "old1", entry(clock, query="old1", vector=vec(1, 0)), max_entries=10, max_bytes=BIG)
    await one.put(ns, "old2", entry(clock, query="old2", vector=vec(1, 0)), max_entries=10, max_bytes=BIG)
    assert (await two.vectors(ns)).keys == ("old1", "old2")
    with redis_backend.redis() as r:
        r.flushall()
    assert len(await two.vectors(ns)) == 0
    await one.put(ns, "new1", entry(clock, query="new1", vector=vec(0, 1)), max_entries=10, max_bytes=BIG)
    await one.put(ns, "new2", entry(clock, query="new2", vector=vec(0, 1)), max_entries=10, max_bytes=BIG)
    await one.put(ns, "new3", entry(clock, query="new3", vector=vec(0, 1)), max_entries=10, max_bytes=BIG)
    assert (await two.vectors(ns)).keys == ("new1", "new2", "new3")
    # Without an intermediate look, too: the replica's copy (new1..3, sequences 1..3) vs a new life.
    with redis_backend.redis() as r:
        r.flushall()
    for name in ("x1", "x2", "x3", "x4"):
        await one.put(ns, name, entry(clock, query=name, vector=vec(0, 1)), max_entries=10, max_bytes=BIG)
    assert (await two.vectors(ns)).keys == ("x1", "x2", "x3", "x4")


async def test_expired_rows_leave_each_replica_by_its_clock(redis_backend: Backend) -> None:
    one, two = redis_backend.replicas(2)
    clock = redis_backend.clock
    ns = unique()
    await one.put(ns, "short", entry(clock, query="s", vector=vec(1, 0), ttl_ms=1000), max_entries=10, max_bytes=BIG)
    await one.put(ns, "long", entry(clock, query="l", vector=vec(0, 1), ttl_ms=60_000), max_entries=10, max_bytes=BIG)
    assert (await two.vectors(ns)).keys == ("short", "long")
    clock.advance(1000)
    assert (await two.vectors(ns)).keys == ("long",)
    # The writer purges the expired entry from the index on its next put (nothing left behind).
    await one.put(ns, "later", entry(clock, query="x", vector=vec(1, 1)), max_entries=10, max_bytes=BIG)
    with redis.Redis(port=redis_backend.port) as r:
        assert r.zrange(namespace_prefix(ns) + "seq", 0, -1) == [b"long", b"later"]


async def test_in_process_copies_are_bounded_and_reload_when_needed(redis_server: RedisProc, clock: FakeClock) -> None:
    store = RedisCacheStore(
        redis.asyncio.Redis.from_url(redis_server.url), timeout_s=2.0, clock=clock, max_views=2, max_rows=5
    )
    try:
        names = [unique() for _ in range(3)]
        for ns in names:
            for k in range(3):
                await store.put(ns, f"k{k}", entry(clock, query="q", vector=vec(k, 1)), max_entries=10, max_bytes=BIG)
        for ns in names:
            assert (await store.vectors(ns)).keys == ("k0", "k1", "k2")
            # Never more than max_views copies, never more rows than max_rows beyond the current one's.
            assert len(store._views) <= 2 and store._rows == sum(len(v.rows) for v in store._views.values())
        assert names[0] not in store._views
        assert (await store.vectors(names[0])).keys == ("k0", "k1", "k2")  # reloaded in full
    finally:
        await store.aclose()


async def test_a_replica_new_to_a_big_namespace_catches_up_a_page_per_lookup(
    redis_server: RedisProc, clock: FakeClock
) -> None:
    writer = open_cache_store(redis_server.url, timeout_s=2.0, clock=clock)
    reader = RedisCacheStore(redis.asyncio.Redis.from_url(redis_server.url), timeout_s=2.0, clock=clock, sync_page=3)
    ns = unique()
    try:
        for i in range(10):
            await writer.put(ns, f"k{i}", entry(clock, query=f"q{i}", vector=vec(i, 1)), max_entries=20, max_bytes=BIG)
        sizes = [len(await reader.vectors(ns)) for _ in range(5)]
        assert sizes == [3, 6, 9, 10, 10]
        assert (await reader.vectors(ns)).keys == tuple(f"k{i}" for i in range(10))
    finally:
        await writer.aclose()
        await reader.aclose()


async def test_a_delete_reaches_replicas_through_the_log_without_a_reload(
    redis_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.cache import redis_store

    one, two = redis_backend.replicas(2)
    assert isinstance(two, RedisCacheStore)
    clock = redis_backend.clock
    ns = unique()
    for i in range(6):
        await one.put(ns, f"k{i}", entry(clock, query=f"q{i}", vector=vec(i, 1)), max_entries=20, max_bytes=BIG)
    assert len(await two.vectors(ns)) == 6
    view = two._views[ns]
    await one.delete(ns, "k3")
    await one.delete(ns, "k0")
    reloads = 0
    reset = VectorIndex.reset

    def counting_reset(self: VectorIndex, born: str, removed: str) -> None:
        nonlocal reloads
        reloads += self is view
        reset(self, born, removed)

    monkeypatch.setattr(VectorIndex, "reset", counting_reset)
    assert (await two.vectors(ns)).keys == ("k1", "k2", "k4", "k5") and reloads == 0
    # More deletions than the log keeps: the replica starts over, and is still right.
    monkeypatch.setattr(redis_store, "DELETION_LOG", 2)
    for key in ("k1", "k2", "k4"):
        await one.delete(ns, key)
    assert (await two.vectors(ns)).keys == ("k5",) and reloads == 1


async def test_a_hits_calls_go_out_on_the_pipelined_connection(redis_backend: Backend) -> None:
    """A lookup, the served mapping and the bad-hit count skip redis-py's per-call path (pool, per-item
    encoding, observability hooks: it made a hit cost more CPU than a miss's whole upstream call); the
    lookups of one loop turn leave in one write and each gets its own reply."""
    store, clock = redis_backend.store(), redis_backend.clock
    assert isinstance(store, RedisCacheStore)
    ns = unique()
    for i in range(3):
        await store.put(ns, f"k{i}", entry(clock, text=f"answer {i}"), max_entries=10, max_bytes=BIG)

    async def refused(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"redis-py's execute_command was called: {args[:1]}")

    store._client.execute_command = refused  # type: ignore[method-assign]
    found = await asyncio.gather(*(store.get(ns, f"k{i}") for i in (2, 0, 1, 7)))
    assert [e.body.decode().split('"content":"')[1].split('"')[0] if e else None for e in found] == [
        "answer 2",
        "answer 0",
        "answer 1",
        None,
    ]
    await store.remember_served("acme", "chatcmpl-1", ns, "k1", 60)
    assert await store.served("acme", "chatcmpl-1") == (ns, "k1")
    assert await store.served("other", "chatcmpl-1") is None
    assert await store.bad_hits(ns) == 0
    assert store.errors == 0
