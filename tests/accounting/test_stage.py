"""The accounting stage's lease keepalive: a long stream renews its ticket by a timer, never per event,
and the timer stops with the stream."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from gateway.accounting.ledger import MemoryLedger
from gateway.accounting.spool import Spool
from gateway.accounting.writer import UsageWriter
from gateway.context import RequestContext
from gateway.contracts import End
from gateway.stages.accounting import RENEW_EVERY_S, AccountingStage
from gateway.state import AdmissionRequest, Limits, MemoryStore, Ticket
from gateway.telemetry import Metrics


class RecordingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.renewed: list[tuple[str, float]] = []

    async def renew(self, ticket: Ticket, lease_s: float) -> bool:
        self.renewed.append((ticket.request.request_id, lease_s))
        return True


class ManualTimers:
    """The stage's scheduler, fired by the test (no waiting): each timer's delay and callback."""

    def __init__(self) -> None:
        self.timers: list[tuple[float, Callable[[], None], asyncio.Handle]] = []

    def schedule(self, delay: float, callback: Callable[[], None]) -> asyncio.Handle:
        handle = asyncio.get_running_loop().call_later(3600, lambda: None)  # never fires by itself
        self.timers.append((delay, callback, handle))
        return handle

    def live(self) -> list[tuple[float, Callable[[], None], asyncio.Handle]]:
        """Timers neither fired nor cancelled."""
        return [t for t in self.timers if not t[2].cancelled()]

    def fire(self) -> None:
        """The one live timer's delay is over."""
        [(_, callback, handle)] = self.live()
        handle.cancel()  # spent, like a timer that ran
        callback()


def make(tmp_path: Path) -> tuple[AccountingStage, RecordingStore, ManualTimers, RequestContext]:
    store = RecordingStore()
    timers = ManualTimers()
    stage = AccountingStage(UsageWriter(MemoryLedger(), Spool(tmp_path)), store, Metrics(), schedule=timers.schedule)
    request = AdmissionRequest(request_id="r1", tenant="t", key="k", route="chat", limits=Limits(), lease_s=300)
    ctx = RequestContext(request_id="r1", operation="chat", started=0.0, headers={}, route_name="chat")
    ctx.ticket = Ticket(request=request, day="2026-11-28", month="2026-11")
    return stage, store, timers, ctx


async def test_a_stream_renews_its_lease_every_interval_until_it_ends(tmp_path: Path) -> None:
    stage, store, timers, ctx = make(tmp_path)
    stage.on_start(ctx)
    [(delay, _, _)] = timers.live()
    assert delay == RENEW_EVERY_S and store.renewed == []
    timers.fire()  # the first interval is over
    await stage.drain()
    assert store.renewed == [("r1", 300)]
    [(delay, _, _)] = timers.live()  # re-armed for the next interval
    assert delay == RENEW_EVERY_S
    timers.fire()
    await stage.drain()
    assert store.renewed == [("r1", 300), ("r1", 300)]
    stage.on_end(ctx, End("completed", 200, stream=True))
    assert timers.live() == [] and ctx.lease_timer is None  # the stream is over: no more renewals


async def test_no_ticket_no_timer_and_a_released_ticket_stops_renewing(tmp_path: Path) -> None:
    stage, store, timers, ctx = make(tmp_path)
    ticket = ctx.ticket
    ctx.ticket = None
    stage.on_start(ctx)
    assert timers.timers == []
    ctx.ticket = ticket
    stage.on_start(ctx)
    ctx.ticket = None  # released meanwhile
    timers.fire()
    await stage.drain()
    assert store.renewed == [] and ctx.lease_timer is None and timers.live() == []
