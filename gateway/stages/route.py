"""Stage `route`: the policy engine decides where the request may run and in which order.

This stage gathers what the pure engine needs (prompt token estimate, capabilities used, the
client's narrowing preferences, live signals) and writes `ctx.route`, `ctx.plan` and `ctx.route_plan`
(whose decision table is only built if explain asks for it).
"""

from __future__ import annotations

import asyncio
import time

from gateway.context import RequestContext
from gateway.policy.engine import decide
from gateway.policy.features import count_texts, extract, texts_of
from gateway.policy.index import PolicyIndex
from gateway.upstream.signals import LiveSignals

# Prompts larger than this (characters) are counted in a worker thread, off the event loop.
OFFLOAD_CHARS = 20_000


class RouteStage:
    name = "route"

    def __init__(self, index: PolicyIndex, signals: LiveSignals) -> None:
        self.index = index
        self.signals = signals

    async def on_request(self, ctx: RequestContext) -> None:
        assert ctx.principal is not None
        payload, op = ctx.payload, ctx.operation
        texts, vision = texts_of(payload, op)
        if sum(len(t) for t in texts) > OFFLOAD_CHARS:
            ctx.prompt_tokens = await asyncio.to_thread(count_texts, texts, op)
        else:
            ctx.prompt_tokens = count_texts(texts, op)
        # The route may differ from the body's `model`: a budget downgrade re-runs this stage.
        features = extract(payload, op, ctx.headers, ctx.prompt_tokens, route=ctx.route_name, vision=vision)
        plan = decide(
            self.index, ctx.principal, features, self.signals.snapshot(time.monotonic()), decision_id=ctx.decision_id
        )
        ctx.route = plan.route
        ctx.plan = plan.targets
        ctx.route_plan = plan
