"""The accounting stage's lease keepalive: a long stream renews its ticket, not on every event."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gateway.accounting.ledger import MemoryLedger
from gateway.accounting.spool import Spool
from gateway.accounting.writer import UsageWriter
from gateway.context import RequestContext
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


async def test_keepalive_renews_once_per_interval(tmp_path: Path) -> None:
    store = RecordingStore()
    stage = AccountingStage(UsageWriter(MemoryLedger(), Spool(tmp_path)), store, Metrics())
    request = AdmissionRequest(request_id="r1", tenant="t", key="k", route="chat", limits=Limits(), lease_s=300)
    ctx = RequestContext(request_id="r1", operation="chat", started=0.0, headers={}, route_name="chat")
    ctx.ticket = Ticket(request=request, day="2026-11-28", month="2026-11")
    ctx.lease_renewed = 1000.0
    for now in (1001.0, 1000.0 + RENEW_EVERY_S - 1):
        stage.keepalive(ctx, now)
    await stage.drain()
    assert store.renewed == []
    stage.keepalive(ctx, 1000.0 + RENEW_EVERY_S + 1)
    stage.keepalive(ctx, 1000.0 + RENEW_EVERY_S + 2)
    await stage.drain()
    assert store.renewed == [("r1", 300)]
    ctx.ticket = None
    stage.keepalive(ctx, 5000.0)
    await asyncio.sleep(0)
    assert len(store.renewed) == 1
