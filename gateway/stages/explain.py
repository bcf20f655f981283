"""Explain: a tenant allowed to (`explain: true`) that sends `x-strait-explain: 1` gets a summary of the
routing decision in the response header of that name, and the whole table is kept for
`GET /admin/decisions/{id}`.

One `Explain` per runtime, shared by the two stages that settle the plan: `route` explains the plan it
decided, and `limits` explains again when a spent budget switches the request to the downgrade plan,
so the header and the kept table always describe the route that finally answers.
"""

from __future__ import annotations

from typing import Final

import msgspec

from gateway.context import RequestContext
from gateway.policy.decisions import DecisionLog
from gateway.policy.engine import Decision, RoutePlan
from gateway.policy.index import PolicyIndex

HEADER: Final = "x-strait-explain"
# Proxies commonly refuse header blocks over 8 KiB; the summary stays well below.
EXPLAIN_HEADER_MAX: Final = 4096

_encode = msgspec.json.encode


def explain_header(decision: Decision) -> str:
    """A header-size-safe summary of the decision: the plan, the ingress region the request entered
    through, what each planned deployment runs on and where, and why each other candidate was excluded;
    the whole table (scores, costs, signals) is at /admin/decisions/{id}. Over EXPLAIN_HEADER_MAX, the
    exclusions, then the hardware and regions, are replaced by their counts."""
    excluded = {r.deployment: r.excluded for r in decision.rows if r.excluded}
    doc: dict[str, object] = {
        "decision": decision.id,
        "route": decision.route,
        "objective": decision.objective,
        "plan": decision.plan,
    }
    if decision.ingress_region is not None:
        doc["ingress_region"] = decision.ingress_region
    spilled = {r.deployment: r.spilled for r in decision.rows if r.spilled}
    if spilled:
        doc["spilled"] = spilled
    fits = {r.deployment: r.spilling for r in decision.rows if r.spilling}
    if fits:
        doc["spilling"] = fits
    stale = [r.deployment for r in decision.rows if r.load == "stale"]
    if stale:
        doc["stale_metrics"] = stale
    if decision.panic:
        doc["panic"] = "every candidate is ejected: tried anyway"
    if decision.affinity is not None:
        doc["affinity"] = decision.affinity
    if decision.canary is not None:
        doc["canary"] = decision.canary
    if decision.shadow is not None:
        doc["shadow"] = decision.shadow
    planned = set(decision.plan)
    where: dict[str, object] = {}
    hardware = {r.deployment: r.hardware for r in decision.rows if r.deployment in planned and r.hardware}
    if hardware:
        where["hardware"] = hardware
    regions = {r.deployment: r.region for r in decision.rows if r.deployment in planned and r.region}
    if regions:
        where["regions"] = regions
    table = {"table": f"/admin/decisions/{decision.id}"}
    for summary in (
        {**doc, **where, "excluded": excluded, **table},
        {**doc, **where, "excluded_count": len(excluded), **table},
        {**doc, "excluded_count": len(excluded), **table},
    ):
        full = _encode(summary)
        if len(full) <= EXPLAIN_HEADER_MAX and full.isascii():
            return full.decode()
    # The last resort, bounded whatever the policy's names (the id is the gateway's own): where the table is.
    return _encode({"decision": decision.id, "excluded_count": len(excluded), **table}).decode("ascii", "replace")


class Explain:
    def __init__(self, index: PolicyIndex, decisions: DecisionLog) -> None:
        # Known once per policy: the tenants allowed to ask.
        self.allowed = frozenset(t.name for t in index.policy.tenants if t.explain)
        # Process-wide (outlives a policy reload), so a table stays readable after a reload.
        self.decisions = decisions

    def asked(self, ctx: RequestContext) -> bool:
        return ctx.headers.get(HEADER) == "1" and ctx.principal is not None and ctx.principal.tenant in self.allowed

    def record(self, ctx: RequestContext, plan: RoutePlan) -> None:
        """Keep the plan's table and summarise it in the response header (replacing an earlier plan's)."""
        self.decisions.put(plan.decision)
        ctx.extra_headers[HEADER] = explain_header(plan.decision)
