"""Recent decision tables kept for `GET /admin/decisions/{id}` (explain), bounded in memory per process.

Bounded per tenant: each tenant has its own least-recently-kept queue, so a tenant that asks for
explain on every request evicts only its own tables, never another tenant's. The number of tenants
is bounded by the policy (tenants are policy entries), so the total is too.
"""

from __future__ import annotations

from collections import OrderedDict

from gateway.policy.engine import Decision


class DecisionLog:
    def __init__(self, per_tenant: int = 512) -> None:
        self.per_tenant = per_tenant
        self._by_tenant: dict[str, OrderedDict[str, Decision]] = {}

    def put(self, decision: Decision) -> None:
        items = self._by_tenant.setdefault(decision.tenant, OrderedDict())
        items[decision.id] = decision
        if len(items) > self.per_tenant:
            items.popitem(last=False)

    def get(self, tenant: str, decision_id: str) -> Decision | None:
        """Only the asking tenant's own decisions are visible: another tenant's id is simply unknown."""
        items = self._by_tenant.get(tenant)
        return None if items is None else items.get(decision_id)
