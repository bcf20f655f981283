"""Stage `route`: the policy engine decides where the request may run and in which order.

This stage gathers what the pure engine needs (prompt tokens, capabilities used, the client's narrowing
preferences, live signals) and writes `ctx.route`, `ctx.plan` and `ctx.route_plan`
(whose decision table is only built if explain asks for it). The prompt is tokenized only when the
decision may depend on its exact size (gateway.policy.features.exact_prompt_needed); otherwise the
engine is given its cheap upper bound (UTF-8 bytes), which decides the same.

Explain: a tenant allowed to (`explain: true`) that sends `x-strait-explain: 1` gets a summary of the
decision in the response header of that name, and the whole table is kept for
`GET /admin/decisions/{id}`. Done here, not after `limits`, because a budget downgrade re-runs this
stage: the header and the kept table are those of the route that finally answers.
"""

from __future__ import annotations

import time

import msgspec

from gateway.context import RequestContext
from gateway.pipeline import RequestOnly
from gateway.policy.decisions import DecisionLog
from gateway.policy.engine import Decision, decide
from gateway.policy.features import exact_prompt_needed, extract, preferences
from gateway.policy.index import PolicyIndex
from gateway.upstream.signals import LiveSignals

# Proxies commonly refuse header blocks over 8 KiB; the summary stays well below.
EXPLAIN_HEADER_MAX = 4096

_encode = msgspec.json.encode


def explain_header(decision: Decision) -> str:
    """A header-size-safe summary of the decision: the plan and why each other candidate was excluded;
    the whole table (scores, costs, signals) is at /admin/decisions/{id}."""
    excluded = {r.deployment: r.excluded for r in decision.rows if r.excluded}
    doc = {"decision": decision.id, "route": decision.route, "objective": decision.objective, "plan": decision.plan}
    full = _encode({**doc, "excluded": excluded, "table": f"/admin/decisions/{decision.id}"})
    if len(full) <= EXPLAIN_HEADER_MAX and full.isascii():
        return full.decode()
    return _encode({**doc, "excluded_count": len(excluded), "table": f"/admin/decisions/{decision.id}"}).decode(
        "ascii", "replace"
    )


class RouteStage(RequestOnly):
    name = "route"

    def __init__(self, index: PolicyIndex, signals: LiveSignals, decisions: DecisionLog) -> None:
        self.index = index
        self.signals = signals
        # Process-wide (outlives a policy reload), so a table stays readable after a reload.
        self.decisions = decisions

    async def on_request(self, ctx: RequestContext) -> None:
        assert ctx.principal is not None and ctx.request is not None
        request, prompt = ctx.request, ctx.prompt_tokens
        prefs = preferences(request, ctx.headers)
        # Counted only if the decision may depend on it; otherwise its cheap upper bound decides the same.
        bound = prompt.bound()
        explain = ctx.headers.get("x-strait-explain") == "1"
        if exact_prompt_needed(self.index, request, ctx.route_name, bound, prefs, explain):
            tokens = await prompt.count()
        else:
            tokens = bound
        # The route may differ from the body's `model`: a budget downgrade re-runs this stage.
        features = extract(request, ctx.headers, tokens, route=ctx.route_name, prefs=prefs)
        plan = decide(
            self.index, ctx.principal, features, self.signals.snapshot(time.monotonic()), decision_id=ctx.decision_id
        )
        ctx.route = plan.route
        ctx.plan = plan.targets
        ctx.route_plan = plan
        if ctx.headers.get("x-strait-explain") == "1":
            tenant = self.index.tenants.get(ctx.principal.tenant)
            if tenant is not None and tenant.explain:
                self.decisions.put(plan.decision)
                ctx.extra_headers["x-strait-explain"] = explain_header(plan.decision)
