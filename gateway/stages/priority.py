"""Stage `priority`: the request's priority class, and load shedding by it.

It runs right after `auth` and before `decode`, so a refused request costs no body read: the class
comes from the header `x-strait-priority` (`interactive` or `batch`), else the tenant's default; a class
the tenant's policy does not allow is refused with 403 (not lowered: a client that believes it is
interactive should learn at once that it is not, rather than be shed as batch under load). Then, when
the policy caps the replica's requests in flight (`server.shedding.max_in_flight`), a request whose
class is at its cap is refused with 503 and `Retry-After`: `batch` at `batch_share` of the cap,
`interactive` at the cap, so interactive traffic keeps the rest while batch is shed. The check is one
comparison with the replica's count (gateway.inflight, which counts this request too).

The pipeline holds this stage only when it has something to do: a cap, or a tenant that may not use
every class (gateway.runtime).
"""

from __future__ import annotations

import math
from typing import Final

from gateway.context import RequestContext
from gateway.errors import InvalidRequest, Overloaded, PermissionDenied
from gateway.inflight import InFlight
from gateway.pipeline import RequestOnly
from gateway.policy.index import ANONYMOUS, PolicyIndex
from gateway.policy.model import PRIORITY_CLASSES, PriorityClass, Shedding, Tenant
from gateway.telemetry import Metrics

PRIORITY_HEADER: Final = "x-strait-priority"


def class_caps(shedding: Shedding) -> dict[PriorityClass, int] | None:
    """How many requests may be in flight (this one included) for a request of each class to be
    admitted; None without a cap. Batch gets at least one, and never more than interactive."""
    cap = shedding.max_in_flight
    if cap == 0:
        return None
    return {"interactive": cap, "batch": max(1, math.floor(cap * shedding.batch_share))}


def needed(index: PolicyIndex) -> bool:
    """Whether a policy needs the stage: it caps requests in flight, or some tenant may not use every class."""
    return index.policy.server.shedding.max_in_flight > 0 or any(
        set(t.priority.allowed) != set(PRIORITY_CLASSES) or t.priority.default_class != PRIORITY_CLASSES[0]
        for t in index.policy.tenants
    )


class _TenantClasses:
    __slots__ = ("allowed", "default")

    def __init__(self, tenant: Tenant) -> None:
        self.allowed = frozenset(tenant.priority.allowed)
        self.default: PriorityClass = tenant.priority.default_class


class PriorityStage(RequestOnly):
    name = "priority"

    def __init__(self, index: PolicyIndex, inflight: InFlight, metrics: Metrics) -> None:
        self._inflight = inflight
        shedding = index.policy.server.shedding
        self._caps = class_caps(shedding)
        self._retry_after_s = shedding.retry_after_s
        self._tenants = {name: _TenantClasses(t) for name, t in index.tenants.items()}
        self._open = _TenantClasses(index.open_tenant)
        self._shed = {c: metrics.child(metrics.shed, c) for c in PRIORITY_CLASSES}

    async def on_request(self, ctx: RequestContext) -> None:
        principal = ctx.principal
        classes = self._open if principal is None or principal is ANONYMOUS else self._tenants[principal.tenant]
        asked = ctx.headers.get(PRIORITY_HEADER)
        if asked is None:
            priority = classes.default
        else:
            priority = self._parse(asked)
            if priority not in classes.allowed:
                raise PermissionDenied(
                    f"Priority class '{priority}' is not allowed for your tenant "
                    f"(allowed: {', '.join(c for c in PRIORITY_CLASSES if c in classes.allowed)}).",
                    code="priority_not_allowed",
                )
        caps = self._caps
        if caps is not None and self._inflight.count > caps[priority]:
            self._shed[priority].inc()
            raise Overloaded(
                f"The gateway is at capacity for {priority} requests; retry after {self._retry_after_s} s.",
                headers={"retry-after": str(self._retry_after_s)},
            )

    @staticmethod
    def _parse(asked: str) -> PriorityClass:
        value = asked.strip().lower()
        for c in PRIORITY_CLASSES:
            if value == c:
                return c
        raise InvalidRequest(
            f"Header {PRIORITY_HEADER} must be one of: {', '.join(PRIORITY_CLASSES)}.", code="invalid_priority"
        )
