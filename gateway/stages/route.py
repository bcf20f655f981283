"""Stage `route`: the policy engine decides where the request may run and in which order.

This stage gathers what the pure engine needs (prompt token estimate, capabilities used, the
client's narrowing preferences, live signals) and writes `ctx.route`, `ctx.plan` and `ctx.route_plan`
(whose decision table is only built if explain asks for it, and which carries the tenant's budget
downgrade plan: `limits` switches to it without running this stage again). The prompt is tokenized only
when the decision may depend on its exact size (gateway.policy.features.exact_prompt_needed); otherwise
the engine is given its cheap upper bound (UTF-8 bytes), which decides the same.

Observers (gateway.stages.observers: the feature log, the shadow policy) are told each decision, a
refusal included, and act on none.

Explain (gateway.stages.explain) is recorded here for the plan decided; `limits` records it again if
it switches to the downgrade plan, so the header and the kept table are those of the route that
finally answers.
"""

from __future__ import annotations

import logging
import time

from gateway.context import RequestContext
from gateway.errors import GatewayError
from gateway.pipeline import RequestOnly
from gateway.policy.engine import RequestFeatures, RoutePlan, decide
from gateway.policy.features import exact_prompt_needed, extract, preferences
from gateway.policy.index import PolicyIndex
from gateway.policy.live import LiveState
from gateway.stages.explain import Explain
from gateway.stages.observers import DecisionObserver
from gateway.upstream.signals import LiveSignals

log = logging.getLogger("strait.route")

# Sent when spillover moved a backend behind the others for this request: which, and why.
SPILL_HEADER = "x-strait-spill"


def spill_header(plan: RoutePlan) -> str:
    """`backend: reason; ...` (ASCII, bounded: backend names come from the policy)."""
    text = "; ".join(f"{name}: {why}" for name, why in sorted(plan.spilled.items()))
    return text[:512].encode("ascii", "replace").decode("ascii")


class RouteStage(RequestOnly):
    name = "route"

    def __init__(
        self,
        index: PolicyIndex,
        signals: LiveSignals,
        explain: Explain,
        observers: tuple[DecisionObserver, ...] = (),
        ingress_region: str | None = None,
    ) -> None:
        self.index = index
        self.signals = signals
        self.explain = explain
        # This replica's STRAIT_REGION: tenants may require it, routes may prefer deployments in it.
        self.ingress_region = ingress_region
        # The feature log and the shadow policy (gateway.stages.observers): told every decision, act on none.
        self.observers = observers

    async def on_request(self, ctx: RequestContext) -> None:
        assert ctx.principal is not None and ctx.request is not None
        request, prompt = ctx.request, ctx.prompt_tokens
        prefs = preferences(request, ctx.headers)
        # Counted only if the decision may depend on it; otherwise its cheap upper bound decides the same.
        bound = prompt.bound()
        explain = ctx.headers.get("x-strait-explain") == "1"
        if exact_prompt_needed(self.index, request, ctx.route_name, bound, prefs, explain) or self._downgrades(ctx):
            tokens = await prompt.count()
        else:
            tokens = bound
        features = extract(
            request, ctx.headers, tokens, route=ctx.route_name, prefs=prefs, ingress_region=self.ingress_region
        )
        live = self.signals.snapshot(time.monotonic())
        if self.observers:
            try:
                plan = decide(self.index, ctx.principal, features, live, decision_id=ctx.decision_id)
            except GatewayError as exc:
                self._observe(ctx, features, live, exc)
                raise
            self._observe(ctx, features, live, plan)
        else:
            plan = decide(self.index, ctx.principal, features, live, decision_id=ctx.decision_id)
        if plan.route.spillover is not None:
            changes = plan.spill_changes
            if changes:
                # Remembered for the next decisions: a spilled backend comes back only below the lower mark.
                self.signals.set_spilling(changes)
            if plan.spilled:
                ctx.extra_headers[SPILL_HEADER] = spill_header(plan)
        ctx.route = plan.route
        ctx.plan = plan.targets
        ctx.route_plan = plan
        if self.explain.asked(ctx):
            self.explain.record(ctx, plan)

    def _observe(
        self, ctx: RequestContext, features: RequestFeatures, live: LiveState, plan: RoutePlan | GatewayError
    ) -> None:
        for observer in self.observers:
            try:
                observer.observe(ctx, features, live, plan)
            except Exception:  # an observer never fails a request
                log.exception("decision observer %s failed", type(observer).__name__)

    def _downgrades(self, ctx: RequestContext) -> bool:
        """A tenant that downgrades on a spent budget gets exact counts: the plan's downgrade is decided
        from these features (a bound could exclude a downgrade candidate the prompt really fits), and its
        budgets make `limits` count the prompt anyway (counted once, remembered)."""
        assert ctx.principal is not None
        tables = self.index.tenant_tables.get(ctx.principal.tenant)  # compiled: downgrade_route or None
        return tables is not None and tables.downgrade_route is not None
