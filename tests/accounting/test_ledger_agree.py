"""The two ledgers agree exactly: the same records, written in the same batches (duplicates and retried
attempts included), give the same totals from the in-process ledger and from Redis, to the last
micro-USD, for every dimension. A real redis-server of the test's own on a free loopback port."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterator

import msgspec
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from gateway.accounting.ledger import MemoryLedger
from gateway.accounting.records import DIMENSIONS, UsageRecord, UsageRow
from gateway.accounting.redis_ledger import RedisLedger
from tests.harness.redis_proc import RedisProc

DAY0 = dt.date(2026, 11, 23)
MIDNIGHT_MS = 1_795_392_000_000  # 2026-11-23 00:00 UTC
DAY_MS = 86_400_000

# Costs up to 10^9 micro-USD (1000 USD) per record: sums stay exact as Lua doubles and as Python ints,
# and many of them are not exactly representable as float USD (e.g. 0.1 + 0.2 drifts).
records = st.builds(
    UsageRecord,
    request_id=st.sampled_from(["r1", "r2", "r3", "r4", "r5"]),
    attempt=st.integers(1, 3),
    final=st.booleans(),
    ts_ms=st.integers(0, 3 * DAY_MS - 1).map(lambda off: MIDNIGHT_MS + off),
    tenant=st.sampled_from(["acme", "globex"]),
    key_id=st.sampled_from(["k1", "k2"]),
    route=st.sampled_from(["chat", "embed"]),
    model=st.sampled_from(["m", "n"]),
    deployment=st.sampled_from(["m@a", "m@b", "n@a"]),
    backend=st.just("b"),
    status=st.sampled_from([200, 503]),
    prompt_tokens=st.integers(0, 10**6),
    completion_tokens=st.integers(0, 10**6),
    cached_tokens=st.integers(0, 10**5),
    cache_write_tokens=st.integers(0, 10**5),
    reasoning_tokens=st.integers(0, 10**5),
    cost_micro_usd=st.one_of(st.integers(0, 10**9), st.sampled_from([1, 100_000, 200_000, 300_000, 333_333])),
    cache_hit=st.booleans(),
    tokens_saved=st.integers(0, 10**5),
).map(lambda r: r if r.cache_hit else msgspec.structs.replace(r, tokens_saved=0))  # as the gateway writes them


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisProc]:
    with RedisProc() as server:
        yield server


async def _totals_of_both(port: int, batches: list[list[UsageRecord]]) -> list[tuple[list[UsageRow], list[UsageRow]]]:
    memory = MemoryLedger()
    client = Redis(port=port, socket_timeout=2, socket_connect_timeout=2)
    on_redis = RedisLedger(client)
    tenants = ["acme", "globex"]
    # All three days, then the middle day alone: the per-day sums agree, not only their total.
    spans = [(DAY0, DAY0 + dt.timedelta(days=2)), (DAY0 + dt.timedelta(days=1), DAY0 + dt.timedelta(days=1))]
    try:
        for batch in batches:
            assert await memory.write(batch) == await on_redis.write(batch)
        return [
            (await memory.totals(tenants, since, until, by), await on_redis.totals(tenants, since, until, by))
            for by in DIMENSIONS
            for since, until in spans
        ]
    finally:
        await on_redis.close()
        await client.aclose()


@st.composite
def write_batches(draw: st.DrawFn) -> list[list[UsageRecord]]:
    """Distinct records, then batches drawn from them: a record written again (a retried batch, a spool
    replay) is the same record, so duplicates are exact copies, possibly in a later batch."""
    pool = draw(st.lists(records, min_size=1, max_size=16, unique_by=lambda r: (r.tenant, r.request_id, r.attempt)))
    return draw(st.lists(st.lists(st.sampled_from(pool), min_size=1, max_size=12), min_size=1, max_size=4))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=write_batches())
def test_memory_and_redis_ledgers_agree_exactly(redis_server: RedisProc, batches: list[list[UsageRecord]]) -> None:
    with redis.Redis(port=redis_server.port) as c:
        c.flushall()
    pairs = asyncio.run(_totals_of_both(redis_server.port, batches))
    for mem_rows, redis_rows in pairs:
        assert mem_rows == redis_rows
    # Exact, not approximate: the total is the integer sum of the first write of each record, and USD
    # is that sum converted once.
    first: dict[tuple[str, str, int], UsageRecord] = {}
    for r in (r for batch in batches for r in batch):
        first.setdefault((r.tenant, r.request_id, r.attempt), r)
    by_route_all_days = pairs[0][0]
    assert sum(row.cost_micro_usd for row in by_route_all_days) == sum(r.cost_micro_usd for r in first.values())
    assert sum(row.requests for row in by_route_all_days) == sum(r.final for r in first.values())
    for row in by_route_all_days:
        assert row.cost_usd == row.cost_micro_usd / 1e6
