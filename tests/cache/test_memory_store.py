"""What only the memory store has: a bound across namespaces (entries and bytes), oldest out first."""

from __future__ import annotations

from gateway.cache.memory import MemoryCacheStore
from tests.cache.conftest import FakeClock, entry, vec

BIG = 1 << 30


async def test_the_total_entry_bound_evicts_the_oldest_across_namespaces() -> None:
    clock = FakeClock()
    store = MemoryCacheStore(clock=clock, max_total_entries=3)
    for i in range(5):
        await store.put(
            f"ns{i % 2}", f"k{i}", entry(clock, query=f"q{i}", vector=vec(i, 1)), max_entries=10, max_bytes=BIG
        )
    assert store.total_entries == 3
    present = [await store.get(f"ns{i % 2}", f"k{i}") is not None for i in range(5)]
    assert present == [False, False, True, True, True]
    assert (await store.vectors("ns0")).keys == ("k2", "k4")
    assert (await store.vectors("ns1")).keys == ("k3",)


async def test_the_total_byte_bound_holds() -> None:
    clock = FakeClock()
    one = entry(clock, "y" * 1000)
    store = MemoryCacheStore(clock=clock, max_total_bytes=3500)
    for i in range(10):
        await store.put(f"ns{i}", "k", one, max_entries=10, max_bytes=BIG)
    assert 0 < store.total_bytes <= 3500
    assert await store.get("ns9", "k") is not None and await store.get("ns0", "k") is None


async def test_expired_entries_leave_when_their_namespace_is_written() -> None:
    clock = FakeClock()
    store = MemoryCacheStore(clock=clock)
    await store.put("ns", "a", entry(clock, ttl_ms=10), max_entries=10, max_bytes=BIG)
    await store.put("ns", "b", entry(clock, ttl_ms=10_000), max_entries=10, max_bytes=BIG)
    clock.advance(10)
    await store.put("ns", "c", entry(clock), max_entries=10, max_bytes=BIG)
    assert store.total_entries == 2


async def test_served_mappings_and_bad_hit_counters_are_bounded() -> None:
    from gateway.cache import memory

    clock = FakeClock()
    store = MemoryCacheStore(clock=clock)
    limit = memory._MAX_COUNTERS
    for i in range(limit + 10):
        await store.remember_served("t", f"r{i}", "ns", "k", 60)
    assert await store.served("t", "r0") is None and await store.served("t", f"r{limit + 9}") == ("ns", "k")
    assert len(store._served) == limit
