"""The stored-responses contract (gateway.responses_store), run over both stores: memory and a real Redis of the
test's own. Tenants apart, TTL, the per-tenant bound (oldest first), delete, and a Redis that is down."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.responses_store import ResponseStore, ResponseStoreUnavailable, open_response_store
from gateway.responses_store.memory import MemoryResponseStore
from tests.harness.redis_proc import RedisProc
from tests.harness.waiting import wait_until

DAY = 86_400


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[ResponseStore]:
    if request.param == "memory":
        found = open_response_store("memory")
    else:
        server: RedisProc = request.getfixturevalue("fresh_redis")
        found = open_response_store(server.url)
    yield found
    await found.aclose()


async def test_a_stored_blob_is_read_back_by_its_own_tenant_only(store: ResponseStore) -> None:
    assert await store.put("alpha", "resp_1", b"one", ttl_s=DAY, max_per_tenant=10)
    assert await store.get("alpha", "resp_1") == b"one"
    assert await store.get("beta", "resp_1") is None  # another tenant: as if it did not exist
    assert await store.get("alpha", "resp_2") is None
    assert not await store.delete("beta", "resp_1")
    assert await store.get("alpha", "resp_1") == b"one"


async def test_delete_says_whether_there_was_one(store: ResponseStore) -> None:
    await store.put("alpha", "resp_1", b"one", ttl_s=DAY, max_per_tenant=10)
    assert await store.delete("alpha", "resp_1")
    assert await store.get("alpha", "resp_1") is None
    assert not await store.delete("alpha", "resp_1")


async def test_a_put_replaces_and_the_tenants_oldest_go_first(store: ResponseStore) -> None:
    for i in range(5):
        assert await store.put("alpha", f"resp_{i}", b"v%d" % i, ttl_s=DAY, max_per_tenant=3)
    await store.put("beta", "resp_0", b"theirs", ttl_s=DAY, max_per_tenant=3)
    assert [await store.get("alpha", f"resp_{i}") for i in range(5)] == [None, None, b"v2", b"v3", b"v4"]
    assert await store.get("beta", "resp_0") == b"theirs"  # one tenant's bound never evicts another's
    await store.put("alpha", "resp_4", b"new", ttl_s=DAY, max_per_tenant=3)
    assert await store.get("alpha", "resp_4") == b"new"


async def test_an_entry_expires_after_its_ttl(store: ResponseStore) -> None:
    await store.put("alpha", "resp_short", b"x", ttl_s=1, max_per_tenant=10)
    await store.put("alpha", "resp_long", b"y", ttl_s=DAY, max_per_tenant=10)
    assert await store.get("alpha", "resp_short") == b"x"

    async def expired() -> bool:
        return await store.get("alpha", "resp_short") is None

    await wait_until(expired, timeout=5)
    assert await store.get("alpha", "resp_long") == b"y"


async def test_the_memory_store_is_bounded_in_total_and_runs_on_its_clock() -> None:
    now = [1_000_000]
    memory = MemoryResponseStore(clock=lambda: now[0], max_total_bytes=10)
    await memory.put("alpha", "resp_1", b"12345", ttl_s=60, max_per_tenant=10)
    await memory.put("beta", "resp_2", b"12345", ttl_s=60, max_per_tenant=10)
    await memory.put("gamma", "resp_3", b"123", ttl_s=60, max_per_tenant=10)
    # Over the total: the oldest entry went, whoever's it was.
    assert await memory.get("alpha", "resp_1") is None and await memory.get("gamma", "resp_3") == b"123"
    assert not await memory.put("alpha", "resp_big", b"x" * 11, ttl_s=60, max_per_tenant=10)
    now[0] += 60_000
    assert await memory.get("beta", "resp_2") is None  # expired at its TTL, by the store's clock


async def test_a_redis_that_is_down_is_unavailable_not_missing(fresh_redis: RedisProc) -> None:
    store = open_response_store(fresh_redis.url, timeout_s=0.5)
    await store.put("alpha", "resp_1", b"one", ttl_s=DAY, max_per_tenant=10)
    fresh_redis.kill()
    with pytest.raises(ResponseStoreUnavailable):
        await store.get("alpha", "resp_1")
    assert not await store.put("alpha", "resp_2", b"two", ttl_s=DAY, max_per_tenant=10)
    await store.aclose()
