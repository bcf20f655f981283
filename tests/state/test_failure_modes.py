"""R-08 and friends: the declared failure mode when Redis is killed, frozen, restarted or never there.

Rate and concurrency limits fail open (`degraded=True`, no rate checks so no rate-limit headers) within
the timeout; the breaker opens after k failures so a dead Redis then costs ~nothing; budgets fall back
to the local share; the same store object recovers when Redis comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, TypeVar

import pytest

from gateway.state import Admission, BreakerConfig, Limits, Store, StoreConfigError, Usage, open_store
from gateway.state.breaker import Breaker
from tests.harness.procs import free_port
from tests.harness.redis_proc import RedisProc
from tests.harness.waiting import timed, wait_until
from tests.state.conftest import FAST_BREAKER, Backend
from tests.state.helpers import budget, request, rpm, slots, tpm

pytestmark = pytest.mark.timeout(60)
T = TypeVar("T")

# Generous enough that a healthy Redis answers in time on a loaded 2-core CI machine (first calls also
# load the scripts); the bounds below are all relative to it.
TIMEOUT_S = 0.25
# What a degraded call may cost beyond the timeout on a busy 2-core machine (event loop, scheduling).
MARGIN_S = 0.15  # scheduling slack on a busy 2-core machine; still far below "hangs with Redis"
LIMITS = Limits(rates=(rpm(1000), tpm(100_000, "tenant")), concurrency=(slots(10),))


def store_for(url: str, **kw: Any) -> Store:
    kw.setdefault("timeout_s", TIMEOUT_S)
    kw.setdefault("breaker", FAST_BREAKER)
    return open_store(url, **kw)


async def test_killed_redis_fails_open_then_the_breaker_skips_it(fresh_redis: RedisProc) -> None:
    store = store_for(fresh_redis.url, breaker=BreakerConfig(failures=3, cooldown_s=30))
    try:
        healthy = await store.admit(request(LIMITS, tokens=10))
        assert healthy.allowed and not healthy.degraded and len(healthy.checks) == 3
        fresh_redis.kill()
        for _ in range(3):
            adm, took = await timed(lambda: store.admit(request(LIMITS, tokens=10)))
            assert adm.allowed and adm.degraded
            # No rate checks at all, so the HTTP layer sends no rate-limit headers.
            assert adm.checks == () and adm.headline("requests") is None
            assert took < TIMEOUT_S + MARGIN_S
        status = store.status()
        assert status.breaker == "open" and status.failures == 3
        # Open: Redis is not even tried.
        adm, took = await timed(lambda: store.admit(request(LIMITS, tokens=10)))
        assert adm.degraded and took < 0.005
        assert store.status().skipped == 1 and store.status().failures == 3
    finally:
        await store.close()


async def test_frozen_redis_costs_at_most_the_timeout(fresh_redis: RedisProc) -> None:
    store = store_for(fresh_redis.url, breaker=BreakerConfig(failures=3, cooldown_s=0.3))
    try:
        assert (await store.admit(request(LIMITS))).allowed
        fresh_redis.freeze()
        # 20 concurrent admissions against a Redis that accepts TCP but never answers.
        timed_results = await asyncio.gather(*(timed(lambda: store.admit(request(LIMITS))) for _ in range(20)))
        assert all(r.allowed and r.degraded for r, _ in timed_results)
        took = max(t for _, t in timed_results)
        assert TIMEOUT_S * 0.9 <= took < TIMEOUT_S + MARGIN_S
        assert store.status().breaker == "open"
        adm, took = await timed(lambda: store.admit(request(LIMITS)))
        assert adm.degraded and took < 0.005
        # Thawed: after the cool-down one probe goes through and closes the breaker; same store object.
        fresh_redis.thaw()

        async def healthy() -> bool:
            return not (await store.admit(request(LIMITS))).degraded

        await wait_until(healthy)
        assert store.status().breaker == "closed"
    finally:
        if fresh_redis.frozen:
            fresh_redis.thaw()
        await store.close()


async def test_restart_recovers_without_recreating_the_store(fresh_redis: RedisProc) -> None:
    store = store_for(fresh_redis.url)
    try:
        limits = Limits(rates=(rpm(2),))
        assert (await store.admit(request(limits))).allowed
        fresh_redis.kill()
        assert (await store.admit(request(limits))).degraded
        fresh_redis.start()  # same port, empty

        async def healthy() -> bool:
            return not (await store.admit(request(limits))).degraded

        await wait_until(healthy)
        # Enforcing again (the restarted server is empty: one admitted by `healthy`, one more fits).
        assert (await store.admit(request(limits))).allowed
        denied = await store.admit(request(limits))
        assert not denied.allowed and not denied.degraded
        assert await store.ping()
    finally:
        await store.close()


async def test_starting_with_redis_down_works_and_connects_later() -> None:
    port = free_port()
    store = store_for(f"redis://127.0.0.1:{port}/0")
    server = RedisProc(port)
    try:
        adm, took = await timed(lambda: store.admit(request(LIMITS)))
        assert adm.allowed and adm.degraded and took < TIMEOUT_S + MARGIN_S
        assert not await store.ping()
        server.start()

        async def healthy() -> bool:
            return not (await store.admit(request(LIMITS))).degraded

        await wait_until(healthy)
        assert await store.ping()
    finally:
        await store.close()
        server.cleanup()


async def test_budgets_fall_back_to_the_local_share(fresh_redis: RedisProc) -> None:
    store = store_for(fresh_redis.url, replicas_hint=2, breaker=BreakerConfig(failures=1, cooldown_s=30))
    try:
        limits = Limits(rates=(rpm(1000),), budgets=(budget(1_000, "tenant"), budget(10_000, "key")))
        up = await store.admit(request(limits, cost=200))
        assert up.allowed and up.ticket is not None
        assert [c.remaining for c in up.checks[1:]] == [800, 9_800]
        assert (await store.reconcile(up.ticket, Usage(tokens=1, cost_micro_usd=200))).applied
        fresh_redis.kill()
        # Redis last said 800 and 9_800 remain; this replica's share is half of that: 400 and 4_900.
        results = [await store.admit(request(limits, cost=150)) for _ in range(3)]
        assert [r.allowed for r in results] == [True, True, False]
        assert all(r.degraded for r in results)
        assert [c.limit.limit for c in results[2].checks] == [400, 4_900]
        assert results[2].checks[0].remaining == 100 and not results[2].checks[0].allowed
        # A local ticket reconciles locally: 150 reserved becomes 20 spent.
        first = results[0].ticket
        assert first is not None and first.local
        done = await store.reconcile(first, Usage(tokens=1, cost_micro_usd=20))
        assert done.applied and done.degraded
        assert (await store.admit(request(limits, cost=200))).allowed  # 20 + 150 + 200 <= 400
        # A budget Redis never reported: the whole limit split across replicas.
        fresh = Limits(budgets=(budget(1_000, "key"),))
        never_seen = await store.admit(request(fresh, key="other", cost=600))
        assert not never_seen.allowed and never_seen.checks[0].limit.limit == 500
    finally:
        await store.close()


async def test_reconcile_while_redis_is_down_is_reported(fresh_redis: RedisProc) -> None:
    store = store_for(fresh_redis.url)
    try:
        adm = await store.admit(request(Limits(concurrency=(slots(1),)), lease_s=30))
        assert adm.ticket is not None and not adm.ticket.local
        fresh_redis.kill()
        ticket = adm.ticket
        done, took = await timed(lambda: store.reconcile(ticket, Usage(tokens=0)))
        assert not done.applied and done.degraded
        assert took < TIMEOUT_S + MARGIN_S
        assert not await store.renew(adm.ticket, 30)
    finally:
        await store.close()


async def test_a_cancelled_probe_does_not_wedge_the_breaker(fresh_redis: RedisProc) -> None:
    store = store_for(fresh_redis.url, breaker=BreakerConfig(failures=1, cooldown_s=0.05))
    try:
        fresh_redis.freeze()
        assert (await store.admit(request(LIMITS))).degraded
        assert store.status().breaker == "open"
        probe: asyncio.Task[Admission] | None = None

        async def probe_in_flight() -> bool:
            # Start an admission and let it run to its first real wait: once the cool-down has passed
            # it is the half-open probe, stuck on the frozen Redis.
            nonlocal probe
            task = probe = asyncio.ensure_future(store.admit(request(LIMITS)))
            await asyncio.sleep(0)
            if store.status().breaker == "half-open" and not task.done():
                return True
            await task
            return False

        await wait_until(probe_in_flight)
        assert probe is not None
        probe.cancel()  # the client went away mid-probe: no outcome is ever reported
        with pytest.raises(asyncio.CancelledError):
            await probe
        fresh_redis.thaw()

        async def healthy() -> bool:
            return not (await store.admit(request(LIMITS))).degraded

        await wait_until(healthy)
        assert store.status().breaker == "closed"
    finally:
        if fresh_redis.frozen:
            fresh_redis.thaw()
        await store.close()


@pytest.mark.parametrize("backend", ["redis", "cluster"], indirect=True)
async def test_an_admission_whose_caller_left_gives_its_slot_back(backend: Backend) -> None:
    import redis

    store = backend.store(timeout_s=2.0)
    nodes = [redis.Redis(port=p) for p in backend.ports]
    try:
        assert await store.ping()
        limits = Limits(rates=(rpm(10),), concurrency=(slots(1),))
        assert (await store.admit(request(limits, tenant="warm"))).allowed  # connections and slot map ready
        for node in nodes:
            node.client_pause(300, all=False)  # writes (our script) wait 300 ms in Redis
        task = asyncio.ensure_future(store.admit(request(limits)))

        async def in_redis() -> bool:
            return sum(int(n.info("clients")["blocked_clients"]) for n in nodes) == 1

        await wait_until(in_redis)
        task.cancel()  # the client disconnected while its admission sat in Redis
        with pytest.raises(asyncio.CancelledError):
            await task

        def acme_fields() -> set[str]:
            """The fields of acme's state hash (layout.py), wherever its slot lives."""
            found: set[str] = set()
            for n in nodes:
                for k in n.scan_iter(match="strait:{t:acme}:*"):
                    assert k == b"strait:{t:acme}:v2:st"
                    found.update(f.decode() for f in n.hkeys(k))
            return found

        async def settled() -> bool:
            held = [f for f in acme_fields() if f.startswith(("h|", "t|", "c|"))]
            return not held and not store._background  # type: ignore[attr-defined]

        await wait_until(settled)
        if backend.name == "cluster":
            # Shielded: the admission did run (one request counted), then gave back slot and ticket.
            assert acme_fields() - {"n", "x"} == {"g|k:k1|req|60"}
        assert (await store.admit(request(limits))).allowed
        assert store.status().breaker == "closed" and store.status().failures == 0
    finally:
        for node in nodes:
            node.close()


async def test_saturation_fails_open_without_tripping_the_breaker(fresh_redis: RedisProc) -> None:
    import redis

    # An explicit clock: the scripts take our time, so no background Redis TIME probe joins the 10 calls.
    store = store_for(
        fresh_redis.url,
        max_connections=2,
        breaker=BreakerConfig(failures=3, cooldown_s=30),
        clock=lambda: int(time.time() * 1000),
    )
    try:
        assert await store.ping()
        with redis.Redis(port=fresh_redis.port) as sync:
            # Far longer than any bound below: a call that waited for Redis would show.
            sync.client_pause(20_000, all=False)
        # 2 calls get the 2 connections and time out in Redis; 8 never get a connection in time.
        results = await asyncio.gather(*(timed(lambda: store.admit(request(LIMITS))) for _ in range(10)))
        assert all(r.degraded for r, _ in results)
        # Bounded by the deadline (plus scheduling on a loaded machine), not by the 20 s pause.
        assert max(t for _, t in results) < TIMEOUT_S + 2.0
        status = store.status()
        # The two calls that took the connections at once had the whole deadline in Redis: failures.
        # Calls that waited for a connection are saturation, unless scheduling on a loaded machine
        # started one late enough to get a connection with half its deadline left (then Redis, paused,
        # is rightly blamed). So: at least 2 failures, some saturation, every call accounted for once.
        assert status.failures >= 2 and status.saturated >= 1
        assert status.failures + status.saturated == 10
        assert status.breaker == ("open" if status.failures >= 3 else "closed")
    finally:
        with redis.Redis(port=fresh_redis.port) as sync:
            sync.execute_command("CLIENT", "UNPAUSE")
        await store.close()


async def test_scripts_reload_after_script_flush(fresh_redis: RedisProc) -> None:
    import redis

    store = store_for(fresh_redis.url)
    try:
        limits = Limits(rates=(rpm(5),))
        assert not (await store.admit(request(limits))).degraded
        with redis.Redis(port=fresh_redis.port) as sync:
            sync.script_flush()
        adm = await store.admit(request(limits))  # NOSCRIPT -> SCRIPT LOAD -> EVALSHA, transparently
        assert adm.allowed and not adm.degraded and adm.checks[0].remaining == 3
    finally:
        await store.close()


def test_breaker_opens_probes_once_and_recovers() -> None:
    now = [0.0]
    b = Breaker(BreakerConfig(failures=2, cooldown_s=5), monotonic=lambda: now[0])
    assert b.allow()
    assert not b.failure()
    assert b.failure() and b.state == "open"
    assert not b.allow()
    now[0] = 5.0
    assert (b.allow(), b.state) == (True, "half-open")
    assert not b.allow()  # one probe at a time
    assert b.failure() and b.state == "open"  # the probe failed: another cool-down
    now[0] = 9.9
    assert not b.allow()
    now[0] = 10.0
    assert b.allow()
    b.abandon()  # cancelled probe
    assert b.allow()
    b.success()
    assert b.state == "closed" and b.allow()
    assert not b.failure()  # the count restarted


def test_misconfiguration_is_loud() -> None:
    with pytest.raises(StoreConfigError, match="per process"):
        open_store("memory", replicas_hint=3)
    with pytest.raises(StoreConfigError, match="unknown state URL"):
        open_store("memcached://127.0.0.1:11211")
    with pytest.raises(StoreConfigError):
        rpm(0)
    assert open_store("memory").status().shared is False


async def test_deadline_holds_even_when_a_cancellation_is_swallowed() -> None:
    from gateway.state.deadline import Deadline

    async def swallows_one_cancel() -> None:
        # What asyncio.wait_for can do on Python 3.11 when its operation completes as the cancel lands.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(10)
        await asyncio.sleep(10)

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with Deadline(0.05):
            await swallows_one_cancel()
    assert time.monotonic() - started < 0.05 + MARGIN_S
    current = asyncio.current_task()
    assert current is not None and current.cancelling() == 0

    # An outer cancellation is not mistaken for the deadline.
    async def outer() -> None:
        async with Deadline(5):
            await asyncio.sleep(10)

    task = asyncio.ensure_future(outer())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_an_admission_given_up_on_does_not_take_effect_when_redis_resumes(fresh_redis: RedisProc) -> None:
    """Measured before the fix: admissions that timed out while Redis was frozen still ran when it
    resumed and held their concurrency slots for the whole lease (the tenant got 429 on everything
    for 5 minutes). The script now checks its deadline against Redis TIME and does nothing when late."""
    import redis as sync_redis

    store = store_for(fresh_redis.url, breaker=BreakerConfig(failures=50, cooldown_s=0.2), timeout_s=0.2)
    limits = Limits(concurrency=(slots(2),))
    direct = sync_redis.Redis(port=fresh_redis.port)
    try:
        first = await store.admit(request(limits, tenant="frozen-t"))
        assert first.allowed and not first.degraded and first.ticket is not None
        assert await store.reconcile(first.ticket, Usage(tokens=0))
        fresh_redis.freeze()
        # Sent to a Redis that accepts the bytes but does not run them; each caller gives up.
        late = await asyncio.gather(*(store.admit(request(limits, tenant="frozen-t")) for _ in range(4)))
        assert all(a.allowed and a.degraded for a in late)
        fresh_redis.thaw()
        my_id = direct.client_id()

        def backlog_done() -> bool:
            # The abandoned connections are gone once Redis has read (and run) what they sent.
            return [str(c["id"]) for c in direct.client_list()] == [str(my_id)]

        deadline = time.monotonic() + 10
        while not backlog_done():
            assert time.monotonic() < deadline, direct.client_list()
            await asyncio.sleep(0.02)  # polling an observable condition, with a deadline
        held = [f for f in direct.hkeys("strait:{t:frozen-t}:v2:st") if f.startswith((b"h|", b"c|"))]
        assert held == [], "a late admission took a slot"
        again = await store.admit(request(limits, tenant="frozen-t"))
        assert again.allowed and not again.degraded
        assert again.checks[0].remaining == 1
    finally:
        if fresh_redis.frozen:
            fresh_redis.thaw()
        direct.close()
        await store.close()


async def test_a_redis_that_comes_back_empty_is_noticed_by_every_replica(fresh_redis: RedisProc) -> None:
    first, second = store_for(fresh_redis.url), store_for(fresh_redis.url)
    try:
        assert await first.check_epoch() is False  # nothing seen before: a fresh deployment, not a reset
        assert await second.check_epoch() is False
        assert await first.check_epoch() is False
        fresh_redis.restart()  # empty: no persistence

        async def reachable() -> bool:
            return await first.ping() and await second.ping()

        await wait_until(reachable)
        assert await first.check_epoch() is True
        # The other replica sees the epoch the first one set, which is not the one it knew.
        assert await second.check_epoch() is True
        assert await first.check_epoch() is False and await second.check_epoch() is False
    finally:
        await first.close()
        await second.close()


async def test_a_deadline_whose_timer_fires_early_still_waits_its_whole_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvloop's timers may fire early (millisecond resolution, a cached "now"); a store call that gave up
    before its deadline could still see its admission run (the script checks the deadline, not us)."""
    from gateway.state.deadline import Deadline

    loop = asyncio.get_running_loop()
    call_later = loop.call_later
    monkeypatch.setattr(loop, "call_later", lambda delay, cb, *args: call_later(delay / 4, cb, *args))
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with Deadline(0.08):
            await asyncio.sleep(10)
    assert time.monotonic() - started >= 0.08


async def test_an_admissions_deadline_falls_before_its_caller_gives_up(fresh_redis: RedisProc) -> None:
    """The script's deadline (Redis clock) is a few milliseconds before the call's own bound, so that
    whole-millisecond clocks cannot let a script run in the millisecond its caller gave up."""
    store = store_for(fresh_redis.url, timeout_s=0.2)
    try:
        assert (await store.admit(request(LIMITS, tokens=1))).allowed  # learns Redis's clock offset
        offset = store._offset_ms
        assert offset is not None
        assert int(store._deadline(1_000_000)) == 1_000_000 + offset + 200 - 5
    finally:
        await store.close()
