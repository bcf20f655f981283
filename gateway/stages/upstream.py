"""Stage `upstream` (terminal): the Dispatcher walks the plan; its answer becomes the client's Reply.

Error accounting lives here: an upstream that cannot be reached (the GatewayError the Dispatcher
raises) or a client that leaves while waiting (cancelled) is recorded and its reservation released
before the error propagates, so every request that reached an upstream is accounted exactly once.
"""

from __future__ import annotations

import asyncio

from gateway.context import RequestContext
from gateway.errors import GatewayError
from gateway.reply import Reply
from gateway.stages.accounting import AccountingStage
from gateway.stages.respond import finish, respond
from gateway.telemetry import Metrics
from gateway.upstream.dispatch import Dispatcher
from gateway.upstream.signals import LiveSignals


async def settled(ctx: RequestContext) -> None:
    """Wait until the request's concurrency slots are given back (before the answer's last byte)."""
    if ctx.settling is not None:
        await asyncio.shield(ctx.settling)


class UpstreamStage:
    name = "upstream"

    def __init__(
        self, dispatcher: Dispatcher, metrics: Metrics, signals: LiveSignals, accounting: AccountingStage
    ) -> None:
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.signals = signals
        self.accounting = accounting

    async def call(self, ctx: RequestContext) -> Reply:
        try:
            upstream = await self.dispatcher.call(ctx)
        except GatewayError as exc:
            finish(self.accounting, ctx, status=exc.status, usage=None)
            await settled(ctx)
            raise
        except BaseException:
            # The client left while waiting (cancelled): record the attempts, release the reservation.
            finish(self.accounting, ctx, status=499, usage=None, partial=True)
            raise
        reply = respond(ctx, upstream, self.metrics, self.signals, self.accounting)
        if reply.stream is None:
            await settled(ctx)
        return reply
