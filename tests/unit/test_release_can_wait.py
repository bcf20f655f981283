"""A slot release waits for the batched reconciles only when the limit is far from reached
(gateway.stages.limits.release_can_wait), so that a client sending one request at a time is never refused
for its own previous request's slot, while the common case (a limit far above what is in flight) costs
no wait before the answer's last byte and no round trip of its own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

from hypothesis import example, given
from hypothesis import strategies as st

from gateway.accounting.ledger import MemoryLedger
from gateway.accounting.spool import Spool
from gateway.accounting.writer import UsageWriter
from gateway.context import RequestContext
from gateway.stages.accounting import RELEASE_CAN_WAIT_FOR_S, AccountingStage
from gateway.stages.limits import SLOT_ROOM_MIN, release_can_wait
from gateway.state import AdmissionRequest, Limits, Ticket
from gateway.state import Usage as StoreUsage
from gateway.state.base import Admission, BudgetLimit, CheckResult, ConcurrencyLimit, RateLimit
from gateway.telemetry import Metrics


def slots(limit: int, in_use_after: int) -> CheckResult:
    """A concurrency check that admitted: `in_use_after` slots held, this request's included."""
    return CheckResult(
        limit=ConcurrencyLimit(scope="tenant", limit=limit), allowed=True, remaining=limit - in_use_after, reset_ms=0
    )


RATE = CheckResult(limit=RateLimit(scope="key", unit="requests", limit=60), allowed=True, remaining=10, reset_ms=1000)
BUDGET = CheckResult(
    limit=BudgetLimit(scope="tenant", metric="usd", window="day", limit=10**6), allowed=True, remaining=5, reset_ms=9
)


def test_the_table() -> None:
    assert release_can_wait(Admission(allowed=True, checks=(RATE, slots(100_000, 32), BUDGET)))
    assert release_can_wait(Admission(allowed=True, checks=(slots(10, 1),)))
    assert not release_can_wait(Admission(allowed=True, checks=(slots(10, 6),)))  # past half
    assert not release_can_wait(Admission(allowed=True, checks=(slots(2, 1),)))  # fewer than SLOT_ROOM_MIN free
    assert not release_can_wait(Admission(allowed=True, checks=(slots(100, 1), slots(4, 1))))  # every limit counts
    # No concurrency check reported (no such limit, or a degraded admission that never asked the store).
    assert not release_can_wait(Admission(allowed=True, checks=(RATE, BUDGET)))
    assert not release_can_wait(Admission(allowed=True, degraded=True, checks=(BUDGET,)))


@example([(8, 4)])  # exactly half: still room for the doubled others and the next request
@given(st.lists(st.tuples(st.integers(1, 10_000), st.integers(1, 10_000)), min_size=1, max_size=4))
def test_a_release_waits_only_while_every_limit_is_at_most_half_used(limits: Sequence[tuple[int, int]]) -> None:
    checks = tuple(slots(limit, min(used, limit)) for limit, used in limits)
    can_wait = release_can_wait(Admission(allowed=True, checks=(RATE, *checks)))
    roomy = all(c.remaining >= SLOT_ROOM_MIN and 2 * c.remaining >= c.limit.limit for c in checks)
    assert can_wait == roomy
    if can_wait:
        # The slot still held while the release waits refuses a sequential client's next request only
        # if the others in flight more than double meanwhile: its old slot, twice the others and the
        # next request itself still fit every limit.
        for limit, used in limits:
            in_use = min(used, limit)
            assert 1 + 2 * (in_use - 1) + 1 <= limit


class BatchStore:
    """A shared store seen from accounting: what it was asked to reconcile, batch by batch."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    async def reconcile_many(self, batch: Sequence[tuple[Ticket, StoreUsage]]) -> None:
        self.batches.append([t.request.request_id for t, _ in batch])


def _stage(tmp_path: Path) -> tuple[AccountingStage, BatchStore]:
    store = BatchStore()
    writer = UsageWriter(MemoryLedger(), Spool(tmp_path))
    return AccountingStage(writer, store, Metrics()), store  # type: ignore[arg-type]


def _ctx(rid: str, can_wait: bool, *, age_s: float = 0.0) -> RequestContext:
    limits = Limits(concurrency=(ConcurrencyLimit(scope="tenant", limit=100),))
    request = AdmissionRequest(request_id=rid, tenant="t", key="k", route="chat", limits=limits)
    started = time.perf_counter() - age_s
    ctx = RequestContext(request_id=rid, operation="chat", started=started, headers={}, route_name="chat")
    ctx.ticket = Ticket(request=request, day="2026-12-07", month="2026-12")
    ctx.release_can_wait = can_wait
    return ctx


async def test_an_urgent_release_is_awaited_and_a_roomy_one_goes_with_the_batch(tmp_path: Path) -> None:
    stage, store = _stage(tmp_path)
    urgent, roomy = _ctx("urgent", False), _ctx("roomy", True)
    stage.release(roomy, 10, 0)
    stage.release(urgent, 10, 0)
    assert roomy.settling is None  # nothing for the answer's last byte to wait for
    assert urgent.settling is not None
    await urgent.settling  # sent at the next turn, taking what was queued along
    assert store.batches == [["urgent", "roomy"]]
    later = _ctx("later", True)
    stage.release(later, 10, 0)
    assert later.settling is None and store.batches == [["urgent", "roomy"]]  # queued for the batch
    await stage.drain()
    assert store.batches == [["urgent", "roomy"], ["later"]]
    assert all(ctx.ticket is None for ctx in (urgent, roomy, later))


async def test_a_roomy_release_alone_is_sent_within_the_batching_delay(tmp_path: Path) -> None:
    stage, store = _stage(tmp_path)
    stage.release(_ctx("r1", True), 1, 0)
    flusher = stage._flusher
    assert flusher is not None and store.batches == []
    await asyncio.wait_for(flusher, timeout=30)  # its own timer sends it (RECONCILE_EVERY_S), no drain needed
    assert store.batches == [["r1"]]


async def test_a_long_requests_release_is_awaited_even_if_its_admission_found_room(tmp_path: Path) -> None:
    """What the admission saw ages with the request: a stream that lasted longer than RELEASE_CAN_WAIT_FOR_S
    may end with the tenant at its limit, so its release goes before its last byte, as without room."""
    stage, store = _stage(tmp_path)
    long = _ctx("long", True, age_s=RELEASE_CAN_WAIT_FOR_S + 5)
    stage.release(long, 10, 0)
    assert long.settling is not None
    await long.settling
    assert store.batches == [["long"]]
