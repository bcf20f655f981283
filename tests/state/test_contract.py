"""The store contract: one suite, every implementation (memory, Redis, and Redis Cluster for the limiter).

All tests here run on a fake clock (the Redis scripts take `now_ms` in test mode), so waits are exact
and nothing sleeps.
"""

from __future__ import annotations

import pytest

from gateway.state import Limits, Usage
from tests.state.conftest import LIMITER_BACKENDS, NOON, Backend, FakeClock
from tests.state.helpers import budget, request, rpm, slots, tpm

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("backend", LIMITER_BACKENDS, indirect=True)
async def test_burst_admits_exactly_the_limit_then_refills_smoothly(backend: Backend, clock: FakeClock) -> None:
    store = backend.store(clock=clock)
    limits = Limits(rates=(rpm(100),))
    results = [await store.admit(request(limits)) for _ in range(150)]
    assert [r.allowed for r in results] == [True] * 100 + [False] * 50
    assert [r.checks[0].remaining for r in results[:100]] == list(range(99, -1, -1))
    assert all(not r.degraded for r in results)
    first_denied = results[100].checks[0]
    assert first_denied.retry_after_ms == 600 and first_denied.fits
    # reset: until the bucket is full again, a whole period after a full burst at one instant.
    assert results[99].checks[0].reset_ms == 60_000
    # One emission interval later exactly one more fits: no fixed-window double burst.
    clock.advance(600)
    assert (await store.admit(request(limits))).allowed
    assert not (await store.admit(request(limits))).allowed


@pytest.mark.parametrize("backend", LIMITER_BACKENDS, indirect=True)
async def test_retry_after_is_the_exact_wait(backend: Backend, clock: FakeClock) -> None:
    store = backend.store(clock=clock)
    limits = Limits(rates=(tpm(1000),))
    assert (await store.admit(request(limits, tokens=900))).allowed
    clock.advance(1234)
    denied = await store.admit(request(limits, tokens=500))
    assert not denied.allowed
    wait = denied.retry_after_ms
    assert wait == denied.checks[0].retry_after_ms > 0
    clock.advance(wait - 1)
    assert not (await store.admit(request(limits, tokens=500))).allowed
    clock.advance(1)
    assert (await store.admit(request(limits, tokens=500))).allowed


@pytest.mark.parametrize("backend", LIMITER_BACKENDS, indirect=True)
async def test_all_or_nothing_across_checks(backend: Backend, clock: FakeClock) -> None:
    store = backend.store(clock=clock)
    limits = Limits(rates=(rpm(1, "key"), rpm(10, "tenant"), tpm(1000, "route")))
    ok = await store.admit(request(limits, tokens=100))
    assert ok.allowed
    denied = await store.admit(request(limits, tokens=100))
    assert not denied.allowed
    assert [c.allowed for c in denied.checks] == [False, True, True]
    # The tenant and route checks passed but nothing was consumed: another key sees the same counts.
    other = await store.admit(request(limits, key="k2", tokens=100))
    assert other.allowed
    assert other.checks[1].remaining == 8  # 10 - 2 admitted, the denied one not counted
    assert other.checks[2].remaining == 800


@pytest.mark.parametrize("backend", LIMITER_BACKENDS, indirect=True)
async def test_scopes_and_tenants_are_independent(backend: Backend, clock: FakeClock) -> None:
    store = backend.store(clock=clock)
    limits = Limits(rates=(rpm(2, "route"),))
    for _ in range(2):
        assert (await store.admit(request(limits, route="chat"))).allowed
    assert not (await store.admit(request(limits, route="chat"))).allowed
    # Another route of the same tenant, and the same route of another tenant, have their own buckets.
    assert (await store.admit(request(limits, route="embed"))).allowed
    assert (await store.admit(request(limits, tenant="globex", route="chat"))).allowed
    # Identifiers with separators and braces neither collide nor break the cluster hash tag.
    hostile = Limits(rates=(rpm(1, "key"),))
    assert (await store.admit(request(hostile, tenant="a}:{b", key="k:1"))).allowed
    assert (await store.admit(request(hostile, tenant="a", key="}:{b:k:1"))).allowed
    assert not (await store.admit(request(hostile, tenant="a}:{b", key="k:1"))).allowed


@pytest.mark.parametrize("backend", LIMITER_BACKENDS, indirect=True)
async def test_hostile_identifiers_keep_slots_and_budgets_apart_through_a_sweep(
    backend: Backend, clock: FakeClock
) -> None:
    """Names with the layout's separators (`|`, `:`, braces, spaces) or that spell another name's
    percent-encoding hold slots and budget reservations of their own, and the sweep of expired ones
    (which parses field names) frees exactly theirs."""
    store = backend.store(clock=clock)
    limits = Limits(concurrency=(slots(1, "key"),), budgets=(budget(100, "key"),))
    names = [("a}|b", "k| 1"), ("a", "}|b k| 1"), ("a", "k| 1"), ("a}|b", "k%7C%201"), ("a%7D%7Cb", "k| 1")]
    for tenant, key in names:
        assert (await store.admit(request(limits, tenant=tenant, key=key, cost=60, lease_s=1))).allowed
        denied = await store.admit(request(limits, tenant=tenant, key=key, cost=10))
        assert [c.allowed for c in denied.checks] == [False, True] and denied.checks[1].remaining == 30
    clock.advance(1_000)  # every lease ended: the next call sweeps each tenant's state
    for tenant, key in names:
        again = await store.admit(request(limits, tenant=tenant, key=key, cost=60, lease_s=1))
        assert again.allowed and [c.remaining for c in again.checks] == [0, 40], (tenant, key)


@pytest.mark.parametrize("backend", LIMITER_BACKENDS, indirect=True)
async def test_tpm_reserves_max_tokens_and_reconcile_releases_the_unused_part(
    backend: Backend, clock: FakeClock
) -> None:
    store = backend.store(clock=clock)
    limits = Limits(rates=(tpm(1000),))
    first = await store.admit(request(limits, tokens=600))
    assert first.allowed and first.ticket is not None
    assert not (await store.admit(request(limits, tokens=600))).allowed
    done = await store.reconcile(first.ticket, Usage(tokens=150))
    assert done.applied
    # 150 used, 850 left, at the same instant.
    second = await store.admit(request(limits, tokens=600))
    assert second.allowed and second.checks[0].remaining == 250
    # A duplicate reconcile books nothing (idempotent per request id).
    assert not (await store.reconcile(first.ticket, Usage(tokens=0))).applied
    assert not (await store.admit(request(limits, tokens=300))).allowed


@pytest.mark.parametrize("backend", LIMITER_BACKENDS, indirect=True)
async def test_reconcile_charges_overuse(backend: Backend, clock: FakeClock) -> None:
    store = backend.store(clock=clock)
    limits = Limits(rates=(tpm(1000),))
    adm = await store.admit(request(limits, tokens=100))
    assert adm.ticket is not None
    await store.reconcile(adm.ticket, Usage(tokens=700))
    check = (await store.admit(request(limits, tokens=0))).checks[0]
    assert check.remaining == 300


@pytest.mark.parametrize("backend", LIMITER_BACKENDS, indirect=True)
async def test_request_larger_than_capacity_never_fits(backend: Backend, clock: FakeClock) -> None:
    store = backend.store(clock=clock)
    adm = await store.admit(request(Limits(rates=(tpm(1000),)), tokens=1001))
    assert not adm.allowed
    assert not adm.checks[0].fits and adm.checks[0].remaining == 1000
    assert adm.retry_after_ms == 0


@pytest.mark.parametrize("backend", LIMITER_BACKENDS, indirect=True)
async def test_concurrency_slots_release_on_reconcile(backend: Backend, clock: FakeClock) -> None:
    store = backend.store(clock=clock)
    limits = Limits(concurrency=(slots(2, "tenant"),))
    a = await store.admit(request(limits))
    b = await store.admit(request(limits))
    assert a.allowed and b.allowed and a.ticket is not None
    assert b.checks[0].remaining == 0
    third = await store.admit(request(limits))
    assert not third.allowed and 0 < third.retry_after_ms <= 1000
    assert (await store.reconcile(a.ticket, Usage(tokens=0))).applied
    assert (await store.admit(request(limits))).allowed


@pytest.mark.parametrize("backend", LIMITER_BACKENDS, indirect=True)
async def test_orphaned_slots_expire_with_their_lease_and_renew_extends_it(backend: Backend, clock: FakeClock) -> None:
    store = backend.store(clock=clock)
    limits = Limits(concurrency=(slots(1),))
    orphan = await store.admit(request(limits, lease_s=5))
    assert orphan.allowed
    # The replica holding it "died": no reconcile. The slot frees when the lease runs out.
    clock.advance(4_999)
    denied = await store.admit(request(limits))
    assert not denied.allowed
    assert denied.retry_after_ms == 1  # the orphan's lease ends in 1 ms: the exact wait, not the 1 s hint
    clock.advance(1)
    long_running = await store.admit(request(limits, lease_s=5))
    assert long_running.allowed and long_running.ticket is not None
    clock.advance(4_000)
    assert await store.renew(long_running.ticket, 10)
    clock.advance(9_000)
    assert not (await store.admit(request(limits))).allowed
    clock.advance(1_000)
    assert (await store.admit(request(limits))).allowed
    # Renewing a reconciled ticket is refused.
    assert (await store.reconcile(long_running.ticket, Usage(tokens=0))).applied
    assert not await store.renew(long_running.ticket, 10)


async def test_denied_checks_consume_no_slot_and_no_budget(backend: Backend, clock: FakeClock) -> None:
    store = backend.store(clock=clock)
    limits = Limits(rates=(rpm(1),), concurrency=(slots(5, "tenant"),), budgets=(budget(1_000),))
    assert (await store.admit(request(limits, cost=300))).allowed
    denied = await store.admit(request(limits, cost=300))
    assert [c.allowed for c in denied.checks] == [False, True, True]
    other = await store.admit(request(limits, key="k2", cost=300))
    assert other.allowed
    assert other.checks[1].remaining == 3  # 5 slots - 2 held
    assert other.checks[2].remaining == 400  # 1000 - 2 x 300 reserved


async def test_budget_reserves_then_reconciles_to_actual(backend: Backend, clock: FakeClock) -> None:
    store = backend.store(clock=clock)
    limits = Limits(budgets=(budget(1_000_000, "tenant"), budget(600_000, "key")))
    a = await store.admit(request(limits, cost=400_000))
    b = await store.admit(request(limits, key="k2", cost=400_000))
    assert a.allowed and b.allowed and a.ticket is not None
    c = await store.admit(request(limits, key="k3", cost=400_000))
    assert not c.allowed
    assert [x.allowed for x in c.checks] == [False, True]
    assert c.checks[0].remaining == 200_000
    # Budget denials name the end of the window (midnight UTC, 12 h after NOON).
    assert c.retry_after_ms == 12 * 3_600_000
    assert (await store.reconcile(a.ticket, Usage(tokens=10, cost_micro_usd=100_000))).applied
    c2 = await store.admit(request(limits, key="k3", cost=400_000))
    assert c2.allowed and c2.checks[0].remaining == 100_000  # 1M - 100k spent - 2 x 400k reserved
    # The per-key budget alone: k1 spent 100k of 600k, so a 500k estimate fits and 500_001 does not.
    key_only = Limits(budgets=(budget(600_000, "key"),))
    assert not (await store.admit(request(key_only, cost=500_001))).allowed
    assert (await store.admit(request(key_only, cost=500_000))).allowed


async def test_token_budget_per_month(backend: Backend, clock: FakeClock) -> None:
    store = backend.store(clock=clock)
    limits = Limits(budgets=(budget(10_000, "key", "tokens", "month"),))
    a = await store.admit(request(limits, tokens=8_000))
    assert a.allowed and a.ticket is not None
    await store.reconcile(a.ticket, Usage(tokens=3_000))
    clock.advance(3 * 86_400_000)  # later the same month
    check = (await store.admit(request(limits, tokens=7_000))).checks[0]
    assert check.allowed and check.remaining == 0
    assert not (await store.admit(request(limits, tokens=1))).allowed


async def test_budget_windows_roll_over_at_utc_midnight(backend: Backend, clock: FakeClock) -> None:
    store = backend.store(clock=clock)
    limits = Limits(budgets=(budget(1_000, "tenant", "usd", "day"),))
    clock.now_ms = NOON + 12 * 3_600_000 - 1  # 23:59:59.999
    a = await store.admit(request(limits, cost=1_000))
    assert a.allowed and a.ticket is not None and a.ticket.day == "2026-11-24"
    clock.advance(2)  # 00:00:00.001 the next day
    assert (await store.admit(request(limits, cost=1_000))).allowed
    # A late reconcile books into the day it reserved in, not today.
    await store.reconcile(a.ticket, Usage(tokens=1, cost_micro_usd=1_000))
    assert not (await store.admit(request(limits, cost=1))).allowed  # today: 1000 reserved
    if backend.name != "memory":
        import redis

        # The 24th's spend is in its own window's counter; the 25th's reservation in the tenant's state.
        assert set(backend.key_ttls()) == {b"strait:{t:acme}:v2:bud:t:usd:2026-11-24", b"strait:{t:acme}:v2:st"}
        with redis.Redis(port=backend.ports[0]) as c:
            assert c.hget("strait:{t:acme}:v2:bud:t:usd:2026-11-24", "s") == b"1000"
            assert c.hget("strait:{t:acme}:v2:st", "v|t|usd|2026-11-25") == b"1000"


async def test_orphaned_budget_reservations_are_given_back(backend: Backend, clock: FakeClock) -> None:
    store = backend.store(clock=clock)
    limits = Limits(budgets=(budget(1_000),))
    assert (await store.admit(request(limits, cost=1_000, lease_s=30))).allowed
    assert not (await store.admit(request(limits, cost=1))).allowed
    clock.advance(30_000)
    assert (await store.admit(request(limits, cost=1_000))).allowed


async def test_late_reconcile_after_lease_books_actual_spend_once(backend: Backend, clock: FakeClock) -> None:
    store = backend.store(clock=clock)
    limits = Limits(budgets=(budget(1_000),))
    a = await store.admit(request(limits, cost=500, lease_s=10))
    assert a.ticket is not None
    clock.advance(20_000)  # the reservation expired (nobody renewed), the ticket has not
    assert (await store.reconcile(a.ticket, Usage(tokens=1, cost_micro_usd=400))).applied
    assert not (await store.reconcile(a.ticket, Usage(tokens=1, cost_micro_usd=400))).applied
    check = (await store.admit(request(limits, cost=0))).checks[0]
    assert check.remaining == 600


async def test_headline_picks_the_binding_rate(backend: Backend, clock: FakeClock) -> None:
    store = backend.store(clock=clock)
    limits = Limits(rates=(rpm(100, "tenant"), rpm(3, "key"), tpm(5000, "key"), tpm(9000, "tenant")))
    adm = await store.admit(request(limits, tokens=10))
    requests, tokens = adm.headline("requests"), adm.headline("tokens")
    assert requests is not None and requests.limit.limit == 3 and requests.remaining == 2
    assert tokens is not None and tokens.limit.limit == 5000 and tokens.remaining == 4990
    assert (await store.ping()) is True
    assert store.status().shared is (backend.name != "memory")


@pytest.mark.parametrize("backend", LIMITER_BACKENDS, indirect=True)
async def test_reconcile_many_applies_a_batch_once(backend: Backend, clock: FakeClock) -> None:
    store = backend.store(clock=clock)
    limits = Limits(rates=(tpm(1000, "tenant"),), concurrency=(slots(3, "tenant"),))
    admitted = [await store.admit(request(limits, tokens=300)) for _ in range(3)]
    assert all(a.allowed and a.ticket is not None for a in admitted)
    assert not (await store.admit(request(limits, tokens=10))).allowed  # no slot left
    batch = [(a.ticket, Usage(tokens=100)) for a in admitted if a.ticket is not None]
    assert await store.reconcile_many(batch) == 3
    assert await store.reconcile_many(batch) == 0  # idempotent: nothing applies twice
    # Slots are free again and 3 x 200 unused tokens came back: 1000 - 3 x 100 = 700 available.
    assert not (await store.admit(request(limits, tokens=701))).allowed
    again = await store.admit(request(limits, tokens=700))
    assert again.allowed and again.checks[0].remaining == 0


@pytest.mark.parametrize("backend", LIMITER_BACKENDS, indirect=True)
async def test_admitting_the_same_request_id_twice_holds_one_slot_and_one_reservation(
    backend: Backend, clock: FakeClock
) -> None:
    store = backend.store(clock=clock)
    limits = Limits(concurrency=(slots(2, "tenant"),), budgets=(budget(1_000),))
    first = await store.admit(request(limits, cost=300, request_id="dup"))
    again = await store.admit(request(limits, cost=300, request_id="dup"))
    assert first.allowed and again.allowed and first.ticket is not None and again.ticket is not None
    # The second admission counts its own slot as used (remaining 0 of 2) but holds no second one.
    assert [c.remaining for c in again.checks] == [0, 400]
    other = await store.admit(request(limits, cost=300))
    assert other.allowed and [c.remaining for c in other.checks] == [0, 400]  # 1000 - 2 x 300 reserved
    assert not (await store.admit(request(limits, cost=0))).allowed  # both slots held: dup + other
    assert (await store.reconcile(first.ticket, Usage(tokens=1, cost_micro_usd=100))).applied
    assert not (await store.reconcile(again.ticket, Usage(tokens=1, cost_micro_usd=100))).applied
    check = await store.admit(request(limits, cost=0))
    assert check.allowed and check.checks[1].remaining == 600  # 100 spent + 300 reserved by `other`


@pytest.mark.parametrize("backend", ["redis", "cluster"], indirect=True)
async def test_orphans_leave_the_state_hash_once_their_expiry_passes(backend: Backend, clock: FakeClock) -> None:
    """A dead replica's slots, reservations and tickets are swept by the next call after they expire,
    so the tenant's hash holds live state only (plus GCRA states and its two markers)."""
    import redis

    store = backend.store(clock=clock)
    limits = Limits(rates=(tpm(1_000_000, "key"),), concurrency=(slots(100, "tenant"),), budgets=(budget(10**9),))
    for i in range(40):
        assert (await store.admit(request(limits, key=f"k{i % 4}", tokens=10, cost=10, lease_s=1))).allowed

    def fields() -> dict[str, bytes]:
        for port in backend.ports:
            with redis.Redis(port=port) as c:
                for key in c.scan_iter(match="strait:{t:acme}:v2:st"):  # on the node that owns its slot
                    return {k.decode(): v for k, v in c.hgetall(key).items()}
        return {}

    def kinds(f: dict[str, bytes]) -> dict[str, int]:
        out: dict[str, int] = {}
        for name in f:
            out[name.split("|", 1)[0]] = out.get(name.split("|", 1)[0], 0) + 1
        return out

    assert kinds(fields()) == {"g": 4, "c": 1, "h": 40, "v": 1, "r": 40, "t": 40, "n": 1, "x": 1}
    clock.advance(1_000)  # every lease has ended; tickets live on (a late reconcile still books once)
    live = await store.admit(request(limits, tokens=10, cost=10, lease_s=1))
    assert live.allowed and [c.remaining for c in live.checks[1:]] == [99, 10**9 - 10]
    after = fields()
    assert kinds(after) == {"g": 4, "c": 1, "h": 1, "v": 1, "r": 1, "t": 41, "n": 1, "x": 1}
    assert after["c|t"] == b"1" and after["v|t|usd|2026-11-24"] == b"10"
    clock.advance(62_000)  # past every ticket of the orphans (2 x lease + 60 s)
    assert (await store.admit(request(limits, tokens=10, cost=10, lease_s=1))).allowed
    assert kinds(fields())["t"] == 1


@pytest.mark.parametrize("backend", LIMITER_BACKENDS, indirect=True)
async def test_reconcile_many_spanning_tenants(backend: Backend, clock: FakeClock) -> None:
    store = backend.store(clock=clock)
    limits = Limits(concurrency=(slots(1, "tenant"),), budgets=(budget(1_000),))
    tickets = []
    for tenant in ("t-a", "t-b", "t-c"):
        adm = await store.admit(request(limits, tenant=tenant, cost=600))
        assert adm.allowed and adm.ticket is not None
        tickets.append(adm.ticket)
        assert not (await store.admit(request(limits, tenant=tenant, cost=0))).allowed  # its one slot is held
    if backend.name == "redis":
        import redis

        with redis.Redis(port=backend.ports[0]) as c:
            c.script_flush()  # the batch's EVALSHAs get NOSCRIPT: loaded and run again, once each
    batch = [(t, Usage(tokens=1, cost_micro_usd=100)) for t in tickets]
    assert await store.reconcile_many(batch) == 3
    assert await store.reconcile_many(batch) == 0
    for tenant in ("t-a", "t-b", "t-c"):
        again = await store.admit(request(limits, tenant=tenant, cost=0))
        assert again.allowed and again.checks[1].remaining == 900  # 100 spent, reservation given back
