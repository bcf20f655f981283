"""Shadow traffic's own spend cap: a route's `shadow.usd_per_day` (gateway.policy.model.Shadow), per replica.

Why per replica and in memory: a shadow copy is best-effort (dropped when the queue is full, paused when
the candidate fails), never a tenant's charge, and never worth a round trip to the shared store on the
request path. A deployment of N replicas may so spend up to N times the cap a day; size the cap per
replica (the README's Shadow and canary paragraph says so). A restart starts the day's spend from zero.

How: before a copy is queued its cost is estimated (the live answer's prompt and completion tokens at the
candidate deployment's price) and reserved; the copy is refused (`over_budget`) when the day's spend, the
reservations of the copies still running or waiting, and this estimate together pass the cap. When the
copy ends its reservation is released and its real cost charged (its own usage at the candidate's price;
the estimate when it reported none: a copy that timed out may still have cost the candidate its tokens;
nothing when it failed before an answer: refused, error status).

Bound: when copies run one at a time the day's spend passes the cap by at most one copy's cost (a copy is
only admitted while its estimate fits; it may answer longer than the live one did). With copies in flight
together, each may overshoot its own estimate, so the spend passes the cap by at most the sum of those
overshoots (tests/unit/test_shadow_budget_properties.py checks both).

The day is the UTC day of the injected wall clock; the spend resets at its boundary. A copy is charged to
the day it ends on. Amounts are whole micro-USD (gateway.accounting.counts.cost_micro_usd)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

DAY_S = 86_400


def micro_usd(usd: float) -> int:
    return round(usd * 1_000_000)


@dataclass(slots=True)
class _Route:
    day: int
    spent: int = 0
    reserved: int = 0


class ShadowBudget:
    """Each route's shadow spend today, in micro-USD: charged, and reserved for copies not yet ended."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        # By route name: bounded by the routes with a shadow (a removed route's entry is a few ints).
        self._routes: dict[str, _Route] = {}

    def _today(self, route: str) -> _Route:
        day = int(self.clock() // DAY_S)
        state = self._routes.get(route)
        if state is None:
            state = self._routes[route] = _Route(day)
        elif state.day != day:
            # A new day: the spend starts again; copies still running keep their reservations until they end.
            state.day, state.spent = day, 0
        return state

    def reserve(self, route: str, cap: int | None, estimate: int) -> bool:
        """Reserve `estimate` for a copy when it fits under `cap` (None: no cap); False: over budget."""
        state = self._today(route)
        if cap is not None and state.spent + state.reserved + estimate > cap:
            return False
        state.reserved += estimate
        return True

    def settle(self, route: str, estimate: int, cost: int) -> None:
        """A copy admitted with `estimate` ended, costing `cost`: release the one, charge the other."""
        state = self._today(route)
        state.reserved = max(0, state.reserved - estimate)
        state.spent += cost

    def spent(self, route: str) -> int:
        """Today's charged spend of the route's copies (micro-USD)."""
        return self._today(route).spent

    def reserved(self, route: str) -> int:
        return self._today(route).reserved
