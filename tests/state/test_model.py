"""R-05: model-based property test. Generated (time, key, cost) sequences, with bursts, long gaps and
reconciles, run against the pure reference GCRA (`gateway.state.gcra`), the memory store and the Redis
Lua scripts on the same fake time (`now_ms` in test mode). All three must agree on every decision:
allowed, remaining, reset and retry-after, to the millisecond. Each admission checks a per-key and a
per-tenant limit together, so all-or-nothing is part of the model.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.state import Limits, RateLimit, Store, Ticket, Usage, open_store
from gateway.state.gcra import GcraState, adjust, decide
from tests.harness.redis_proc import RedisProc
from tests.state.conftest import NOON, FakeClock, flush
from tests.state.helpers import request

pytestmark = pytest.mark.timeout(120)

_tenants = itertools.count()
# (gap ms, key index, cost, action, actual tokens when reconciling)
Op = tuple[int, int, int, str, int]

rate_limits = st.builds(
    lambda unit, limit, period, burst_factor: RateLimit(
        scope="key", unit=unit, limit=limit, period_s=period, burst=int(limit * burst_factor)
    ),
    st.sampled_from(["requests", "tokens"]),
    st.integers(1, 60),
    st.sampled_from([1, 7, 60, 3600]),
    st.sampled_from([0, 0.5, 1, 3]),
)

gaps = st.one_of(st.just(0), st.integers(0, 50), st.integers(0, 5_000), st.integers(0, 4_000_000))
ops = st.lists(
    st.tuples(
        gaps,
        st.integers(0, 2),  # key index
        st.integers(0, 200),  # cost (tokens; requests cost 1)
        st.sampled_from(["admit", "admit", "admit", "reconcile"]),
        st.integers(0, 400),  # actual tokens when reconciling
    ),
    min_size=1,
    max_size=40,
)


async def _run(
    store: Store, clock: FakeClock, key_rates: list[RateLimit], tenant_rate: RateLimit, program: list[Op]
) -> None:
    tenant = f"model-{next(_tenants)}"
    tenant_rate = RateLimit(
        scope="tenant",
        unit=tenant_rate.unit,
        limit=tenant_rate.limit,
        period_s=tenant_rate.period_s,
        burst=tenant_rate.burst,
    )
    model: dict[str, GcraState | None] = {}
    pending: dict[int, list[tuple[Ticket, int]]] = {0: [], 1: [], 2: []}
    clock.now_ms = NOON
    for gap, idx, cost_in, action, actual in program:
        clock.advance(gap)
        now = clock.now_ms
        key_rate = key_rates[idx]
        rates = (key_rate, tenant_rate)
        names = (f"k{idx}", "tenant")
        if action == "reconcile":
            if not pending[idx]:
                continue
            ticket, reserved = pending[idx].pop(0)
            done = await store.reconcile(ticket, Usage(tokens=actual))
            assert done.applied
            for rate, name in zip(rates, names, strict=True):
                if rate.unit == "tokens":
                    model[name] = adjust(
                        model.get(name), now, actual - reserved, limit=rate.limit, period_ms=rate.period_ms
                    )
            continue

        tokens = cost_in
        expected = [
            decide(
                model.get(name),
                now,
                1 if rate.unit == "requests" else tokens,
                limit=rate.limit,
                period_ms=rate.period_ms,
                capacity=rate.capacity,
            )
            for rate, name in zip(rates, names, strict=True)
        ]
        adm = await store.admit(
            request(Limits(rates=rates), tenant=tenant, key=f"k{idx}", tokens=tokens, lease_s=10_000_000)
        )
        allowed = all(e.allowed for e in expected)
        assert adm.allowed == allowed
        assert not adm.degraded
        for got, want in zip(adm.checks, expected, strict=True):
            assert (got.allowed, got.remaining, got.reset_ms, got.retry_after_ms, got.fits) == (
                want.allowed,
                want.remaining,
                want.reset_ms,
                want.retry_after_ms,
                want.fits,
            )
        for want, rate, name in zip(expected, rates, names, strict=True):
            if not want.allowed and want.fits:
                # Retry-After is the true wait: passes exactly then, not a millisecond before; as a
                # header (whole seconds, rounded up) it is >= the wait and < the wait + 1 s.
                cost = 1 if rate.unit == "requests" else tokens
                state = model.get(name)
                params = {"limit": rate.limit, "period_ms": rate.period_ms, "capacity": rate.capacity}
                wait = want.retry_after_ms
                assert decide(state, now + wait, cost, **params).allowed
                assert not decide(state, now + wait - 1, cost, **params).allowed
                header = math.ceil(wait / 1000)
                assert wait <= header * 1000 < wait + 1000
        if allowed:
            for want, name in zip(expected, names, strict=True):
                if want.new_state is not None:
                    model[name] = want.new_state
            if adm.ticket is not None:
                pending[idx].append((adm.ticket, tokens))


@pytest.fixture(scope="module")
def model_loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key_rates=st.lists(rate_limits, min_size=3, max_size=3), tenant_rate=rate_limits, program=ops)
def test_memory_store_matches_the_reference(
    model_loop: asyncio.AbstractEventLoop,
    key_rates: list[RateLimit],
    tenant_rate: RateLimit,
    program: list[Op],
) -> None:
    clock = FakeClock()
    store = open_store("memory", clock=clock)
    model_loop.run_until_complete(_run(store, clock, key_rates, tenant_rate, program))


@pytest.fixture(scope="module")
def model_redis(model_loop: asyncio.AbstractEventLoop, redis_server: RedisProc) -> Iterator[tuple[Store, FakeClock]]:
    flush([redis_server.port])
    clock = FakeClock()
    store = open_store(redis_server.url, clock=clock, timeout_s=2.0)
    yield store, clock
    model_loop.run_until_complete(store.close())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key_rates=st.lists(rate_limits, min_size=3, max_size=3), tenant_rate=rate_limits, program=ops)
def test_redis_scripts_match_the_reference(
    model_loop: asyncio.AbstractEventLoop,
    model_redis: tuple[Store, FakeClock],
    key_rates: list[RateLimit],
    tenant_rate: RateLimit,
    program: list[Op],
) -> None:
    store, clock = model_redis
    model_loop.run_until_complete(_run(store, clock, key_rates, tenant_rate, program))
