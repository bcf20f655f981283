"""The usage ledger: idempotent writes, aggregates by dimension, spool while Redis is away and replay
exactly once when it returns. Real redis-server processes; nothing touches the machine's own Redis."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import msgspec
import pytest
import redis
from redis.asyncio import Redis

from gateway.accounting.counts import TokenCounts, cost_micro_usd
from gateway.accounting.ledger import Ledger, MemoryLedger
from gateway.accounting.meter import completion_tokens_of
from gateway.accounting.records import UsageRecord
from gateway.accounting.redis_ledger import RedisLedger
from gateway.accounting.spool import Spool
from gateway.accounting.writer import UsageWriter
from gateway.policy.model import Price
from tests.harness.redis_proc import RedisProc

NOON = 1_795_521_600_000  # 2026-11-24 12:00 UTC
DAY = dt.date(2026, 11, 24)


def rec(request_id: str, attempt: int = 1, *, tenant: str = "acme", final: bool = True, **kw: object) -> UsageRecord:
    base: dict[str, object] = dict(
        request_id=request_id,
        attempt=attempt,
        final=final,
        ts_ms=NOON,
        tenant=tenant,
        key_id="k1",
        route="chat",
        model="m",
        deployment="m@b",
        backend="b",
        status=200,
        prompt_tokens=10,
        completion_tokens=5,
        cost_micro_usd=70,
    )
    base.update(kw)
    return UsageRecord(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisProc]:
    with RedisProc() as server:
        yield server


@pytest.fixture(params=["memory", "redis"])
async def ledger(request: pytest.FixtureRequest, redis_server: RedisProc) -> AsyncIterator[Ledger]:
    if request.param == "memory":
        yield MemoryLedger()
        return
    with redis.Redis(port=redis_server.port) as c:
        c.flushall()
    client = Redis(port=redis_server.port, socket_timeout=1, socket_connect_timeout=1)
    yield RedisLedger(client)
    await client.aclose()


async def test_writes_are_idempotent_per_request_and_attempt(ledger: Ledger) -> None:
    assert await ledger.write([rec("r1"), rec("r2"), rec("r1")]) == 2
    assert (
        await ledger.write(
            [rec("r1"), rec("r2", attempt=2, final=False, prompt_tokens=0, completion_tokens=0, cost_micro_usd=0)]
        )
        == 1
    )
    rows = await ledger.totals(["acme"], DAY, DAY, "route")
    assert [(r.value, r.requests, r.prompt_tokens, r.completion_tokens) for r in rows] == [("chat", 2, 20, 10)]
    assert rows[0].cost_usd == pytest.approx(140e-6)


async def test_totals_carry_every_token_kind(ledger: Ledger) -> None:
    parts = {"cached_tokens": 3, "cache_write_tokens": 2, "reasoning_tokens": 4}
    await ledger.write([rec("k1", **parts), rec("k2", **parts), rec("k3", attempt=2, final=False, **parts)])
    for by in ("route", "model", "deployment", "key"):
        rows = await ledger.totals(["acme"], DAY, DAY, by)  # type: ignore[arg-type]
        got = [(r.requests, r.prompt_tokens, r.cached_tokens, r.cache_write_tokens, r.reasoning_tokens) for r in rows]
        assert got == [(2, 30, 9, 6, 12)], by


async def test_totals_by_dimension_and_tenant_isolation(ledger: Ledger) -> None:
    await ledger.write([rec("a", route="chat"), rec("b", route="embed"), rec("c", tenant="other", route="chat")])
    by_route = await ledger.totals(["acme"], DAY, DAY, "route")
    assert {r.value for r in by_route} == {"chat", "embed"}
    assert all(r.tenant == "acme" for r in by_route)
    by_key = await ledger.totals(["acme", "other"], DAY, DAY, "key")
    assert [(r.tenant, r.value, r.requests) for r in by_key] == [("acme", "k1", 2), ("other", "k1", 1)]
    assert await ledger.totals(["acme"], DAY + dt.timedelta(days=1), DAY + dt.timedelta(days=3), "route") == []


async def test_redis_keys_all_expire(redis_server: RedisProc) -> None:
    with redis.Redis(port=redis_server.port) as c:
        c.flushall()
    client = Redis(port=redis_server.port)
    await RedisLedger(client).write([rec("x"), rec("y", tenant="t2")])
    await client.aclose()
    with redis.Redis(port=redis_server.port) as c:
        keys = list(c.scan_iter("strait:*"))
        assert keys and all(c.ttl(k) > 0 for k in keys)
        # Each tenant's keys share one hash slot (Redis Cluster) and never another tenant's.
        assert {k.split(b"}")[0] for k in keys} == {b"strait:{t:acme", b"strait:{t:t2"}


async def test_writer_spools_while_redis_is_down_and_replays_exactly_once(tmp_path: Path) -> None:
    server = RedisProc().start()
    try:
        client = Redis(port=server.port, socket_timeout=0.2, socket_connect_timeout=0.2)
        writer = UsageWriter(RedisLedger(client), Spool(tmp_path / "spool"), interval_s=0.01)
        for i in range(5):
            writer.submit(rec(f"before-{i}"))
        await writer.flush()
        assert writer.written == 5
        server.freeze()  # SIGSTOP: the connection stays open, nothing answers (the `docker pause` case)
        for i in range(7):
            writer.submit(rec(f"during-{i}"))
        writer.submit(rec("before-0"))  # a duplicate of an already written record
        await writer.flush()
        assert writer.spooled == 8 and writer.spool.pending()
        server.thaw()
        replayed = await writer.replay()
        # The batch's EVALSHA reached the frozen Redis before the client gave up on it, so Redis may run
        # it after the thaw (before or after the replay's call): either way each record lands once, and
        # the duplicate, written before the outage, never counts again.
        assert replayed in (0, 7)
        assert not writer.spool.pending()
        assert await writer.replay() == 0  # replaying again writes nothing
        rows = await RedisLedger(client).totals(["acme"], DAY, DAY, "route")
        assert rows[0].requests == 12 and rows[0].prompt_tokens == 120
        await client.aclose()
    finally:
        server.cleanup()


async def test_stop_flushes_everything_queued(tmp_path: Path) -> None:
    ledger = MemoryLedger()
    writer = UsageWriter(ledger, Spool(tmp_path), interval_s=10)
    await writer.start()
    for i in range(1200):
        writer.submit(rec(f"r{i}"))
    await writer.stop()
    rows = await ledger.totals(["acme"], DAY, DAY, "route")
    assert rows[0].requests == 1200


async def test_stop_while_a_batch_is_being_written_loses_none_of_it(tmp_path: Path) -> None:
    """A shutdown that lands while the background loop is writing a batch (records already taken from
    the queue) lets that write finish: it used to cancel it, and the batch was lost."""

    class SlowLedger(MemoryLedger):
        def __init__(self) -> None:
            super().__init__()
            self.writing = asyncio.Event()
            self.release = asyncio.Event()

        async def write(self, records: Sequence[UsageRecord]) -> int:
            self.writing.set()
            await self.release.wait()
            return await super().write(records)

    ledger = SlowLedger()
    writer = UsageWriter(ledger, Spool(tmp_path), interval_s=0.001)
    await writer.start()
    for i in range(3):
        writer.submit(rec(f"r{i}"))
    await ledger.writing.wait()  # the loop took the batch and is writing it
    assert writer.queued() == 0
    loop_task = writer._task
    assert loop_task is not None
    # The write may go on only once stop has cancelled the loop (the case that lost the batch).
    loop_task.add_done_callback(lambda _: ledger.release.set())
    await writer.stop()
    assert loop_task.cancelled()
    rows = await ledger.totals(["acme"], DAY, DAY, "route")
    assert rows[0].requests == 3


def test_full_spool_drops_and_counts(tmp_path: Path) -> None:
    one = len(msgspec.json.encode(rec("a"))) + 1
    spool = Spool(tmp_path, max_bytes=2 * one + 10)
    assert spool.append([rec("a"), rec("b")]) == 2
    assert spool.append([rec("c"), rec("d")]) == 0
    assert spool.dropped == 2


def test_cost_uses_cached_price_and_is_never_negative() -> None:
    price = Price(input_per_mtok=2.5, output_per_mtok=10.0, cached_input_per_mtok=1.25)
    assert cost_micro_usd(price, TokenCounts(prompt=1000, completion=100)) == 2500 + 1000
    assert cost_micro_usd(price, TokenCounts(prompt=1000, completion=100, cached=400)) == 600 * 2.5 + 400 * 1.25 + 1000
    # cached never exceeds the prompt
    assert cost_micro_usd(price, TokenCounts(prompt=100, cached=400)) == 100 * 1.25


def test_estimated_completion_tokens_count_text_and_tool_arguments() -> None:
    chunks = [
        b'{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}',
        b'{"choices":[{"index":0,"delta":{"content":"hello world"}}]}',
        b'{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\\"a\\": 1}"}}]}}]}',
        b"not json",
    ]
    assert completion_tokens_of(chunks, "cl100k_base") == 2 + 6
    body = b'{"choices":[{"index":0,"message":{"role":"assistant","content":"hello world"}}]}'
    assert completion_tokens_of([body], "cl100k_base") == 2
    # A custom (freeform) tool's call: its input is what the model produced.
    custom = b'{"choices":[{"index":0,"message":{"tool_calls":[{"type":"custom","custom":{"input":"hello world"}}]}}]}'
    assert completion_tokens_of([custom], "cl100k_base") == 2


def _data_commands(c: redis.Redis) -> dict[str, int]:
    """Calls per command since the last CONFIG RESETSTAT, without connection handshakes and our own
    INFO / CONFIG calls (and SCRIPT LOAD: whether the script was already cached depends on test order)."""
    skip = {"hello", "info", "config|resetstat", "script|load"}
    calls = {k.removeprefix("cmdstat_"): v["calls"] for k, v in c.info("commandstats").items()}
    return {k: v for k, v in calls.items() if k not in skip}


async def test_a_batch_is_a_fixed_number_of_commands_plus_one_xadd_per_record(redis_server: RedisProc) -> None:
    """25 records of one route, model, deployment and key: the script reads and writes the markers and
    the aggregates once each (not an HINCRBY per field, nor a marker key per record), XADDs each record,
    sets TTLs only on keys it created; several tenants and days in one batch each get their own sums."""
    client = Redis(port=redis_server.port, socket_timeout=1, socket_connect_timeout=1)
    ledger = RedisLedger(client)
    with redis.Redis(port=redis_server.port) as c:
        c.flushall()
        # Loaded as a running gateway has it (whichever test ran before on this server): counted below is the
        # steady state, not the first call's NOSCRIPT and reload.
        c.script_load(ledger._source)
        c.config_resetstat()
    try:
        batch = [rec(f"b{i}") for i in range(25)]
        assert await ledger.write(batch) == 25
        with redis.Redis(port=redis_server.port) as c:
            stats = _data_commands(c)
        # One round trip: no SCRIPT EXISTS before it (redis-py sends one before every scripted pipeline).
        assert stats == {"evalsha": 1, "hmget": 2, "hset": 2, "xadd": 25, "expire": 3}
        with redis.Redis(port=redis_server.port) as c:
            c.config_resetstat()
        assert await ledger.write([*batch[:5], rec("b25")]) == 1
        with redis.Redis(port=redis_server.port) as c:
            stats = _data_commands(c)
            assert c.ttl("strait:{t:acme}:v2:seen:2026-11-24") > 0
        assert stats == {"evalsha": 1, "hmget": 2, "hset": 2, "xadd": 1}
        mixed = [rec("m1", tenant="t2"), rec("m2"), rec("m3", tenant="t2", ts_ms=NOON + 86_400_000), rec("b0")]
        assert await ledger.write(mixed) == 3  # b0 is a duplicate
        rows = await ledger.totals(["acme"], DAY, DAY, "route")
        assert [(r.requests, r.prompt_tokens, r.completion_tokens) for r in rows] == [(27, 270, 135)]
        rows = await ledger.totals(["t2"], DAY, DAY + dt.timedelta(days=1), "route")
        assert [(r.requests, r.prompt_tokens) for r in rows] == [(2, 20)]
    finally:
        await client.aclose()
