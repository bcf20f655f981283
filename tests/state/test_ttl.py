"""R-07: every key the scripts write expires. After a mixed run (admissions, denials, reconciles,
duplicates, renewals, orphans and admissions cancelled at random points) `SCAN` finds no `strait:` key
without a TTL, and every key name follows the documented layout (full dates in window names). The
memory store's state drains to nothing once every TTL has passed.
"""

from __future__ import annotations

import asyncio
import random
import re

import pytest

from gateway.state import Admission, Limits, Usage, open_store
from tests.state.conftest import Backend, FakeClock
from tests.state.helpers import budget, request, rpm, slots, tpm

pytestmark = pytest.mark.timeout(60)

LIMITS = Limits(
    rates=(rpm(40, "key"), tpm(20_000, "tenant"), rpm(200, "route")),
    concurrency=(slots(6, "key"), slots(30, "tenant")),
    budgets=(
        budget(2_000_000, "tenant"),
        budget(300_000, "key"),
        budget(50_000_000, "tenant", "usd", "month"),
        budget(400_000, "key", "tokens", "month"),
    ),
)

LAYOUT = re.compile(r"strait:\{t:[^}]+\}:v2:(st|bud:(k:[^:|]+|t):(usd|tokens):(\d{4}-\d{2}-\d{2}|\d{4}-\d{2}))")
# The fields of a tenant's state hash (gateway/state/layout.py).
SID = r"(k:[^:|]+|t|r:[^:|]+)"
BNAME = r"(k:[^:|]+|t)\|(usd|tokens)\|(\d{4}-\d{2}-\d{2}|\d{4}-\d{2})"
FIELDS = re.compile(rf"g\|{SID}\|(req|tok)\|\d+|c\|{SID}|h\|{SID}\|[^|]+|v\|{BNAME}|r\|{BNAME}\|[^|]+|t\|[^|]+|n|x")


async def _workload(backend: Backend, rng: random.Random) -> int:
    stores = backend.replicas(2)
    tickets = []
    admitted = 0

    async def admit(i: int) -> Admission | None:
        req = request(
            LIMITS,
            tenant=f"tenant-{i % 4}",
            key=f"key-{i % 7}",
            route=rng.choice(["chat", "embed/v1"]),
            tokens=rng.randint(0, 3_000),
            cost=rng.randint(0, 40_000),
            lease_s=rng.choice([1.0, 30.0]),
        )
        coro = stores[i % 2].admit(req)
        if rng.random() < 0.2:
            # A client disconnect at a random point of the call.
            try:
                return await asyncio.wait_for(coro, timeout=rng.uniform(0, 0.003))
            except TimeoutError:
                return None
        return await coro

    for wave in range(6):
        results = await asyncio.gather(*(admit(wave * 100 + i) for i in range(60)))
        for adm in results:
            if adm is not None and adm.allowed:
                admitted += 1
                assert adm.ticket is not None
                tickets.append(adm.ticket)
        rng.shuffle(tickets)
        keep = []
        for ticket in tickets:
            roll = rng.random()
            store = rng.choice(stores)
            if roll < 0.5:
                usage = Usage(tokens=rng.randint(0, ticket.request.tokens + 50), cost_micro_usd=rng.randint(0, 50_000))
                await store.reconcile(ticket, usage)
                if roll < 0.1:
                    await store.reconcile(ticket, usage)  # duplicate delivery
            elif roll < 0.6:
                await store.renew(ticket, rng.choice([0.5, 20.0]))
                keep.append(ticket)
            elif roll < 0.8:
                keep.append(ticket)
            # else: an orphan (the replica "died"); its lease and ticket TTL clean up after it
        tickets = keep
    return admitted


@pytest.mark.parametrize("backend", ["redis", "cluster"], indirect=True)
async def test_no_key_without_ttl_after_a_mixed_run(backend: Backend) -> None:
    admitted = await _workload(backend, random.Random(5))
    assert admitted > 50
    keys = backend.key_ttls()
    assert len(keys) > 12  # the run wrote every kind of key
    names = [k.decode() for k in keys]
    assert [n for n in names if not LAYOUT.fullmatch(n)] == []
    kinds = {n.split("}:v2:", 1)[1].split(":", 1)[0] for n in names}
    assert kinds == {"st", "bud"}
    assert [n for n, ttl in zip(names, keys.values(), strict=True) if ttl == -1] == []
    import redis

    fields: set[str] = set()
    for port in backend.ports:
        with redis.Redis(port=port) as c:
            for name in c.scan_iter(match="strait:*:v2:st", count=1000):
                fields.update(f.decode() for f in c.hkeys(name))
    assert [f for f in fields if not FIELDS.fullmatch(f)] == []
    assert {f.split("|", 1)[0] for f in fields} >= {"g", "c", "h", "v", "r", "t", "n", "x"}
    assert "r:embed%2Fv1" in " ".join(fields)  # identifiers are encoded, never raw separators


@pytest.mark.parametrize("backend", ["cluster"], indirect=True)
async def test_cluster_keeps_a_tenant_in_one_slot_and_spreads_tenants(backend: Backend) -> None:
    import redis

    await _workload(backend, random.Random(9))
    where: dict[str, set[int]] = {}
    for port in backend.ports:
        with redis.Redis(port=port) as c:
            for key in c.scan_iter(match="strait:*", count=1000):
                tenant = key.decode().split("}", 1)[0]
                where.setdefault(tenant, set()).add(port)
    assert len(where) == 4
    assert all(len(ports) == 1 for ports in where.values())  # every key of a tenant on one node
    assert len({p for ports in where.values() for p in ports}) > 1  # and tenants on several nodes


async def test_memory_state_drains_when_ttls_pass() -> None:
    clock = FakeClock()
    store = open_store("memory", clock=clock)
    rng = random.Random(1)
    for i in range(300):
        adm = await store.admit(request(LIMITS, tenant=f"t{i % 5}", key=f"k{i % 9}", tokens=rng.randint(0, 500)))
        if adm.ticket is not None and rng.random() < 0.5:
            await store.reconcile(adm.ticket, Usage(tokens=10, cost_micro_usd=5))
        clock.advance(rng.randint(0, 2_000))
    assert store.live_keys() > 20  # type: ignore[attr-defined]
    clock.advance(70 * 86_400_000)  # past every window, lease and grace period
    assert store.live_keys() == 0  # type: ignore[attr-defined]
