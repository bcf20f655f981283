"""The Redis store on Redis Cluster (3 primaries): every key of a namespace carries its hash tag, so the
scripts (which evict keys they find, not only those declared) and the pipelines run on one slot."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gateway.cache.redis_store import RedisCacheStore
from gateway.cache.store import open_cache_store
from tests.cache.conftest import FakeClock, entry, vec
from tests.harness.redis_proc import RedisClusterProcs

pytestmark = pytest.mark.timeout(120)
BIG = 1 << 30


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterProcs]:
    with RedisClusterProcs() as procs:
        yield procs


async def test_the_store_works_on_a_cluster(cluster: RedisClusterProcs) -> None:
    clock = FakeClock()
    one, two = (open_cache_store(cluster.url, clock=clock, timeout_s=2.0) for _ in range(2))
    assert isinstance(one, RedisCacheStore)
    try:
        # Namespaces spread over slots (and so nodes); each keeps its newest two.
        names = [f"{i:02x}" * 16 for i in range(12)]
        for ns in names:
            for k in range(3):
                await one.put(ns, f"k{k}", entry(clock, query=f"q{k}", vector=vec(k, 1)), max_entries=2, max_bytes=BIG)
        for ns in names:
            assert await one.get(ns, "k0") is None and await one.get(ns, "k2") is not None
            assert (await two.vectors(ns)).keys == ("k1", "k2")
        await two.delete(names[0], "k2")
        assert (await one.vectors(names[0])).keys == ("k1",)
        assert await one.add_bad_hit(names[1]) == 1 and await two.bad_hits(names[1]) == 1
        await one.remember_served("acme", "r1", names[2], "k1", 60)
        assert await two.served("acme", "r1") == (names[2], "k1") and await two.served("other", "r1") is None
        assert one.errors == 0 and two.errors == 0
    finally:
        await one.aclose()
        await two.aclose()
