"""The recent decisions of this replica, for the console (gateway.api.console): search by request id, tenant
or route, the filter/rank table of one, and `strait policy diff` of a pasted policy against recent traffic.

A decision observer (gateway.stages.observers) keeps one small entry per decided request in a ring of fixed
size, process-wide (it outlives policy reloads). An entry holds no prompt or answer text: the request's
features (sizes, capabilities, the headers the policy's rules read), made a feature line only when the
console reads it, and the plan, detached from its downgrade (which holds the messages); the plan's table
is built only when someone looks at it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from typing import NamedTuple

import msgspec

from gateway.canonical import Operation
from gateway.context import RequestContext
from gateway.errors import GatewayError
from gateway.policy.engine import Decision, Preferences, RequestFeatures, RoutePlan
from gateway.policy.index import PolicyIndex
from gateway.policy.live import LiveState
from gateway.policy.replay import FeatureLine
from gateway.stages.observers import MAX_CLIENT_TEXT, rule_headers

# Entries kept per replica: enough to find a request from the last minutes of a busy gateway, small enough
# that the ring (a plan's facts are a few hundred bytes to a few KiB) stays in the low megabytes.
RECENT_DECISIONS = 1000


class Seen(NamedTuple):
    """What a feature line says of one request beyond the entry's own fields, as the route stage had it:
    the line itself is built only when the console reads it (`RecentDecision.features`)."""

    operation: Operation
    prompt_tokens: int
    max_tokens: int | None
    needs: frozenset[str]
    preferences: Preferences | None
    # Only the headers the policy's rules read; None when they read none.
    headers: dict[str, str] | None
    # The replica's region (STRAIT_REGION): tenants' required_ingress_regions read it, so a replay does.
    ingress_region: str | None


class RecentDecision(msgspec.Struct, frozen=True):
    """One decided request (a Struct, not a dataclass: built on the request path, it is several times cheaper)."""

    ts: float
    request_id: str
    # The client's own x-request-id, when it sent one (recorded, never trusted as a key).
    client_request_id: str | None
    decision_id: str
    tenant: str
    route: str
    # The request's features: a feature line, or what one is built from when read (`features`).
    seen: FeatureLine | Seen
    # The plan (its table built on first look) or the refusal's status and code.
    plan: RoutePlan | None
    refused: str | None

    @property
    def features(self) -> FeatureLine:
        """The request's features as a feature line (what `strait policy diff` replays)."""
        seen = self.seen
        if isinstance(seen, FeatureLine):
            return seen
        plan = self.plan
        return FeatureLine(
            ts=self.ts,
            route=self.route,
            tenant=self.tenant,
            operation=seen.operation,
            prompt_tokens=seen.prompt_tokens,
            max_tokens=seen.max_tokens,
            needs=tuple(sorted(seen.needs)),
            preferences=seen.preferences,
            headers={} if seen.headers is None else dict(seen.headers),
            deployment=plan.targets[0].label if plan is not None and plan.targets else None,
            ingress_region=seen.ingress_region,
        )

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
        kept = self.headers
        if kept:
            request_headers = features.headers
            headers: dict[str, str] | None = {h: v for h in kept if (v := request_headers.get(h)) is not None}
        else:
            headers = None
        seen = Seen(
            features.operation,
            features.prompt_tokens,
            features.max_tokens,
            features.needs,
            features.preferences,
            headers,
            features.ingress_region,
        )
        if isinstance(plan, GatewayError):
            kept_plan, refused = None, f"refused {plan.status} {plan.code or ''}".rstrip()
        else:
            kept_plan, refused = plan.detached(), None
        client_id = ctx.client_request_id
        self.ring.add(
            RecentDecision(
                time.time(),
                ctx.request_id,
                client_id[:MAX_CLIENT_TEXT] if client_id else None,
                ctx.decision_id,
                tenant,
                features.route[:MAX_CLIENT_TEXT],
                seen,
                kept_plan,
                refused,
            )
        )
