"""Stage `route`: the policy engine decides where the request may run and in which order.

This stage gathers what the pure engine needs (prompt token estimate, capabilities used, the
client's narrowing preferences, live signals) and writes `ctx.route`, `ctx.plan` and `ctx.route_plan`
(whose decision table is only built if explain asks for it, and which carries the tenant's budget
downgrade plan: `limits` switches to it without running this stage again).

Explain (gateway.stages.explain) is recorded here for the plan decided; `limits` records it again if
it switches to the downgrade plan, so the header and the kept table are those of the route that
finally answers.
"""

from __future__ import annotations

import asyncio
import time

from gateway.context import RequestContext
from gateway.pipeline import RequestOnly
from gateway.policy.engine import decide
from gateway.policy.features import count_texts, extract, texts_of
from gateway.policy.index import PolicyIndex
from gateway.stages.explain import Explain
from gateway.upstream.signals import LiveSignals

# Prompts larger than this (characters) are counted in a worker thread, off the event loop.
OFFLOAD_CHARS = 20_000


class RouteStage(RequestOnly):
    name = "route"

    def __init__(self, index: PolicyIndex, signals: LiveSignals, explain: Explain) -> None:
        self.index = index
        self.signals = signals
        self.explain = explain

    async def on_request(self, ctx: RequestContext) -> None:
        assert ctx.principal is not None
        payload, op = ctx.payload, ctx.operation
        texts, vision = texts_of(payload, op)
        if sum(len(t) for t in texts) > OFFLOAD_CHARS:
            ctx.prompt_tokens = await asyncio.to_thread(count_texts, texts, op)
        else:
            ctx.prompt_tokens = count_texts(texts, op)
        features = extract(payload, op, ctx.headers, ctx.prompt_tokens, route=ctx.route_name, vision=vision)
        plan = decide(
            self.index, ctx.principal, features, self.signals.snapshot(time.monotonic()), decision_id=ctx.decision_id
        )
        ctx.route = plan.route
        ctx.plan = plan.targets
        ctx.route_plan = plan
        if self.explain.asked(ctx):
            self.explain.record(ctx, plan)
