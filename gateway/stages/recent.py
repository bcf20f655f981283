"""The recent decisions of this replica, for the console (gateway.api.console): search by request id, tenant
or route, the filter/rank table of one, and `strait policy diff` of a pasted policy against recent traffic.

A decision observer (gateway.stages.observers) keeps one small entry per decided request in a ring of fixed
size, process-wide (it outlives policy reloads). An entry holds no prompt or answer text: the request's
features as a feature line (sizes, capabilities, the headers the policy's rules read) and the plan, detached
from its downgrade (which holds the messages); the plan's table is built only when someone looks at it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator

import msgspec

from gateway.context import RequestContext
from gateway.errors import GatewayError
from gateway.policy.engine import Decision, LiveState, RequestFeatures, RoutePlan
from gateway.policy.index import PolicyIndex
from gateway.policy.replay import FeatureLine
from gateway.stages.observers import MAX_CLIENT_TEXT, rule_headers

# Entries kept per replica: enough to find a request from the last minutes of a busy gateway, small enough
# that the ring (a plan's facts are a few hundred bytes to a few KiB) stays in the low megabytes.
RECENT_DECISIONS = 1000


class RecentDecision(msgspec.Struct, frozen=True):
    """One decided request (a Struct, not a dataclass: built on the request path, it is several times cheaper)."""

    ts: float
    request_id: str
    # The client's own x-request-id, when it sent one (recorded, never trusted as a key).
    client_request_id: str | None
    decision_id: str
    tenant: str
    route: str
    features: FeatureLine
    # The plan (its table built on first look) or the refusal's status and code.
    plan: RoutePlan | None
    refused: str | None

    @property
    def choice(self) -> str:
        if self.plan is None:
            return self.refused or "refused"
        return self.plan.targets[0].label if self.plan.targets else "refused (empty plan)"

    @property
    def decision(self) -> Decision | None:
        return None if self.plan is None else self.plan.decision


class RecentDecisions:
    """The ring itself (one per process), newest last."""

    def __init__(self, size: int = RECENT_DECISIONS) -> None:
        self._items: deque[RecentDecision] = deque(maxlen=size)

    def add(self, entry: RecentDecision) -> None:
        self._items.append(entry)

    def newest_first(self) -> Iterator[RecentDecision]:
        return reversed(self._items)

    def find(self, request_or_decision_id: str) -> RecentDecision | None:
        """By the gateway's request id, the decision id (x-strait-decision) or the client's x-request-id."""
        for entry in reversed(self._items):
            if request_or_decision_id in (entry.request_id, entry.decision_id, entry.client_request_id):
                return entry
        return None

    def __len__(self) -> int:
        return len(self._items)


class RecentLog:
    """The observer that fills the ring (one per runtime: the headers kept are the ones its policy reads)."""

    def __init__(self, ring: RecentDecisions, index: PolicyIndex) -> None:
        self.ring = ring
        self.headers = rule_headers(index)

    def observe(
        self, ctx: RequestContext, features: RequestFeatures, live: LiveState, plan: RoutePlan | GatewayError
    ) -> None:
        tenant = ctx.principal.tenant if ctx.principal is not None else "-"
        now = time.time()
        route = features.route[:MAX_CLIENT_TEXT]
        line = FeatureLine(
            ts=now,
            route=route,
            tenant=tenant,
            operation=features.operation,
            prompt_tokens=features.prompt_tokens,
            max_tokens=features.max_tokens,
            needs=tuple(sorted(features.needs)),
            preferences=features.preferences,
            headers={h: v for h in self.headers if (v := features.headers.get(h)) is not None},
            deployment=None if isinstance(plan, GatewayError) or not plan.targets else plan.targets[0].label,
        )
        refused = f"refused {plan.status} {plan.code or ''}".rstrip() if isinstance(plan, GatewayError) else None
        self.ring.add(
            RecentDecision(
                ts=now,
                request_id=ctx.request_id,
                client_request_id=(ctx.client_request_id or None) and ctx.client_request_id[:MAX_CLIENT_TEXT],
                decision_id=ctx.decision_id,
                tenant=tenant,
                route=route,
                features=line,
                plan=None if isinstance(plan, GatewayError) else plan.detached(),
                refused=refused,
            )
        )
