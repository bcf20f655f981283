"""The cache store contract, run over the memory store and a real redis-server alike."""

from __future__ import annotations

import msgspec
import pytest

from gateway.cache.entry import encode_entry
from gateway.cache.redis_store import namespace_prefix, safe_part, served_key
from gateway.cache.store import CacheStoreConfigError, open_cache_store
from tests.cache.conftest import TTL_MS, Backend, entry, unique, vec

pytestmark = pytest.mark.timeout(60)
BIG = 1 << 30


async def test_put_then_get_round_trips_the_entry(backend: Backend) -> None:
    store = backend.store()
    ns, key = unique(), unique("k")
    e = entry(backend.clock, "Paris", query="capital of France?", vector=vec(0.6, 0.8))
    assert await store.get(ns, key) is None
    await store.put(ns, key, e, max_entries=10, max_bytes=BIG)
    assert await store.get(ns, key) == e
    assert await store.get(ns, unique("k")) is None
    assert store.errors == 0


async def test_an_entry_expires_at_its_absolute_time_whatever_the_reads(backend: Backend) -> None:
    store, clock = backend.store(), backend.clock
    ns, key = unique(), unique("k")
    e = entry(clock, query="q", vector=vec(1.0, 0.0))
    await store.put(ns, key, e, max_entries=10, max_bytes=BIG)
    clock.advance(TTL_MS - 1)
    assert await store.get(ns, key) == e  # reads do not move the expiry ...
    assert (await store.vectors(ns)).keys == (key,)
    clock.advance(1)
    assert await store.get(ns, key) is None  # ... which is checked at read time, store or not
    assert len(await store.vectors(ns)) == 0


async def test_an_expired_or_oversized_entry_is_not_stored(backend: Backend) -> None:
    store, clock = backend.store(), backend.clock
    ns = unique()
    stale = entry(clock, ttl_ms=0)
    await store.put(ns, "k1", stale, max_entries=10, max_bytes=BIG)
    fat = entry(clock, "x" * 5000)
    await store.put(ns, "k2", fat, max_entries=10, max_bytes=4000)
    assert await store.get(ns, "k1") is None
    assert await store.get(ns, "k2") is None


async def test_redis_expiry_is_the_entrys_absolute_time_and_reads_do_not_renew_it(redis_backend: Backend) -> None:
    backend = redis_backend
    store, clock = backend.store(), backend.clock
    ns, key = unique(), unique("k")
    e = entry(clock, query="q", vector=vec(1.0, 0.0))
    await store.put(ns, key, e, max_entries=10, max_bytes=BIG)
    prefix = namespace_prefix(ns)
    with backend.redis() as r:
        keys = [prefix + "e:" + key, *(prefix + s for s in ("meta", "seq", "exp", "size", "vec"))]
        assert [r.pexpiretime(k) for k in keys] == [e.expires_ms] * len(keys)
        for _ in range(3):
            clock.advance(1000)
            assert await store.get(ns, key) == e
            await store.vectors(ns)
        assert [r.pexpiretime(k) for k in keys] == [e.expires_ms] * len(keys)
        # A later, shorter-lived entry leaves the index's expiry at the longest-lived entry's.
        short = entry(clock, ttl_ms=10_000)
        await store.put(ns, unique("k"), short, max_entries=10, max_bytes=BIG)
        assert r.pexpiretime(prefix + "meta") == e.expires_ms
        # Every key the cache wrote has a TTL (none can outlive its entries, none can pin memory).
        assert all(r.pttl(k) > 0 for k in r.scan_iter(match="strait:cache:*"))


async def test_a_namespace_keeps_its_newest_entries_within_max_entries(backend: Backend) -> None:
    store = backend.store()
    ns = unique()
    for i in range(5):
        await store.put(
            ns, f"k{i}", entry(backend.clock, f"a{i}", query=f"q{i}", vector=vec(i, 1)), max_entries=3, max_bytes=BIG
        )
    assert [await store.get(ns, f"k{i}") is not None for i in range(5)] == [False, False, True, True, True]
    assert (await store.vectors(ns)).keys == ("k2", "k3", "k4")


async def test_a_namespace_keeps_its_newest_entries_within_max_bytes(backend: Backend) -> None:
    store = backend.store()
    ns = unique()
    one = entry(backend.clock, "x" * 100)
    size = len(encode_entry(one)) + len("k0")  # an entry counts its encoded bytes and its key
    for i in range(4):
        await store.put(ns, f"k{i}", one, max_entries=100, max_bytes=2 * size + size // 2)
    assert [await store.get(ns, f"k{i}") is not None for i in range(4)] == [False, False, True, True]


async def test_namespaces_are_isolated(backend: Backend) -> None:
    store = backend.store()
    a, b = unique(), unique()
    await store.put(
        a, "same", entry(backend.clock, "from A", query="qa", vector=vec(1, 0)), max_entries=10, max_bytes=BIG
    )
    await store.put(
        b, "same", entry(backend.clock, "from B", query="qb", vector=vec(0, 1)), max_entries=10, max_bytes=BIG
    )
    got_a, got_b = await store.get(a, "same"), await store.get(b, "same")
    assert got_a is not None and b"from A" in got_a.body
    assert got_b is not None and b"from B" in got_b.body
    assert (await store.vectors(a)).queries == ("qa",)
    await store.delete(a, "same")
    assert await store.get(a, "same") is None
    assert await store.get(b, "same") is not None
    # One namespace's bound never evicts another's entries.
    for i in range(3):
        await store.put(a, f"k{i}", entry(backend.clock), max_entries=1, max_bytes=BIG)
    assert await store.get(b, "same") is not None
    assert (await store.vectors(b)).queries == ("qb",)


async def test_vectors_hold_the_entries_that_have_one(backend: Backend) -> None:
    store = backend.store()
    ns = unique()
    await store.put(ns, "k1", entry(backend.clock, query="one", vector=vec(1, 0, 0)), max_entries=10, max_bytes=BIG)
    await store.put(ns, "k2", entry(backend.clock), max_entries=10, max_bytes=BIG)  # exact tier only
    await store.put(ns, "k3", entry(backend.clock, query="three", vector=vec(0, 0, 1)), max_entries=10, max_bytes=BIG)
    vs = await store.vectors(ns)
    assert vs.keys == ("k1", "k3") and vs.queries == ("one", "three")
    assert vs.vectors == (vec(1, 0, 0), vec(0, 0, 1)) and vs.dims == 3
    assert len(await store.vectors(unique())) == 0


async def test_an_overwrite_replaces_the_entry_and_its_row(backend: Backend) -> None:
    store = backend.store()
    ns = unique()
    await store.put(ns, "k", entry(backend.clock, "old", query="old", vector=vec(1, 0)), max_entries=10, max_bytes=BIG)
    assert (await store.vectors(ns)).queries == ("old",)
    new = entry(backend.clock, "new", query="new", vector=vec(0, 1))
    await store.put(ns, "k", new, max_entries=10, max_bytes=BIG)
    assert await store.get(ns, "k") == new
    assert (await store.vectors(ns)).queries == ("new",)
    await store.put(ns, "k", entry(backend.clock, "plain"), max_entries=10, max_bytes=BIG)
    assert len(await store.vectors(ns)) == 0


async def test_replicas_see_each_others_entries_deletions_and_evictions(backend: Backend) -> None:
    one, two = backend.replicas(2)
    ns = unique()
    put = {"max_entries": 4, "max_bytes": BIG}
    await one.put(ns, "k1", entry(backend.clock, query="q1", vector=vec(1, 0)), **put)
    assert (await two.vectors(ns)).keys == ("k1",)
    await one.put(ns, "k2", entry(backend.clock, query="q2", vector=vec(0, 1)), **put)
    await two.put(ns, "k3", entry(backend.clock, query="q3", vector=vec(1, 1)), **put)
    assert (await two.vectors(ns)).keys == ("k1", "k2", "k3")
    assert (await one.vectors(ns)).keys == ("k1", "k2", "k3")
    await two.delete(ns, "k2")
    assert (await one.vectors(ns)).keys == ("k1", "k3")
    assert await one.get(ns, "k2") is None
    for i in range(4, 7):  # three more with room for four: k1 and k3 are evicted
        await two.put(ns, f"k{i}", entry(backend.clock, query=f"q{i}", vector=vec(i, 1)), **put)
    assert (await one.vectors(ns)).keys == ("k3", "k4", "k5", "k6")
    assert (await two.vectors(ns)).keys == ("k3", "k4", "k5", "k6")
    await one.put(ns, "k7", entry(backend.clock, query="q7", vector=vec(7, 1)), **put)
    assert (await two.vectors(ns)).keys == ("k4", "k5", "k6", "k7")
    assert await two.get(ns, "k3") is None


async def test_an_unchanged_namespace_returns_the_same_snapshot(backend: Backend) -> None:
    store = backend.store()
    ns = unique()
    await store.put(ns, "k1", entry(backend.clock, query="q1", vector=vec(1, 0)), max_entries=10, max_bytes=BIG)
    first = await store.vectors(ns)
    assert await store.vectors(ns) is first  # nothing rebuilt (a cached numpy matrix stays valid)
    await store.put(ns, "k2", entry(backend.clock, query="q2", vector=vec(0, 1)), max_entries=10, max_bytes=BIG)
    assert (await store.vectors(ns)) is not first


async def test_bad_hits_count_per_namespace_and_expire(backend: Backend) -> None:
    store, clock = backend.store(), backend.clock
    a, b = unique(), unique()
    assert await store.bad_hits(a) == 0
    assert await store.add_bad_hit(a) == 1
    assert await store.add_bad_hit(a) == 2
    assert await store.bad_hits(a) == 2 and await store.bad_hits(b) == 0
    if backend.name == "redis":
        with backend.redis() as r:
            counter = namespace_prefix(a) + "bad"
            expiry = r.pexpiretime(counter)
            assert expiry > 0
            await store.add_bad_hit(a)
            assert r.pexpiretime(counter) == expiry  # set by the first report, not moved by later ones
    else:
        clock.advance(7 * 86_400_000)
        assert await store.bad_hits(a) == 0
        assert await store.add_bad_hit(a) == 1


async def test_served_mappings_are_tenant_scoped_and_expire(backend: Backend) -> None:
    store, clock = backend.store(), backend.clock
    await store.remember_served("acme", "chatcmpl-1", "ns-a", "key-a", ttl_s=600)
    assert await store.served("acme", "chatcmpl-1") == ("ns-a", "key-a")
    assert await store.served("globex", "chatcmpl-1") is None  # another tenant, same response id
    assert await store.served("acme", "chatcmpl-2") is None
    if backend.name == "redis":
        with backend.redis() as r:
            assert 0 < r.pttl(served_key("acme", "chatcmpl-1")) <= 600_000
    else:
        clock.advance(600_000)
        assert await store.served("acme", "chatcmpl-1") is None


async def test_odd_namespace_and_key_text_stays_inside_its_namespace(backend: Backend) -> None:
    """Non-digest text (braces, colons, unicode, very long) is hashed into the key, never spliced in."""
    store = backend.store()
    weird = ["a}{b", "x:e:y", "é" * 300, "", "{ns}"]
    for i, ns in enumerate(weird):
        await store.put(ns, ns, entry(backend.clock, f"v{i}"), max_entries=10, max_bytes=BIG)
    for i, ns in enumerate(weird):
        got = await store.get(ns, ns)
        assert got is not None and f"v{i}".encode() in got.body
    assert safe_part("a}{b") != "a}{b" and len(safe_part("é" * 300)) == 64


def test_open_cache_store_refuses_bad_settings() -> None:
    with pytest.raises(CacheStoreConfigError):
        open_cache_store("memcached://x", timeout_s=0.1)
    with pytest.raises(CacheStoreConfigError):
        open_cache_store("memory", timeout_s=0)


def test_entries_round_trip_through_msgpack() -> None:
    from gateway.cache.entry import decode_entry
    from tests.cache.conftest import FakeClock

    e = entry(FakeClock(), query="q", vector=vec(0.5, 0.5))
    assert decode_entry(encode_entry(e)) == e
    assert decode_entry(b"\xc1garbage") is None
    assert decode_entry(msgspec.msgpack.encode({"body": 1})) is None
