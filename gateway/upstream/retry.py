"""What the dispatcher does after a failed attempt: the failure's class, the next move (the same
deployment after a wait, the next deployment, or give up), Retry-After parsing, jittered backoff and
the per-route retry budget. Pure apart from the clock and the random source the caller passes in.

Only ever consulted before the first byte of an answer reached the client (gateway.upstream.dispatch).
"""

from __future__ import annotations

import email.utils
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

from gateway.policy.model import RetryPolicy
from gateway.upstream.normalize import is_context_length_error

# A failed attempt's class: the policy's retry classes, plus `auth` (the provider refused the gateway's
# own credentials) and `redirect` (never followed): both always move on to the next deployment.
Failure = Literal["connect", "timeout", "reset", "429", "5xx", "context_length", "auth", "redirect"]

# Statuses that say "overloaded, come back later": their Retry-After is honoured.
OVERLOAD_STATUS: Final = frozenset({429, 503, 529})
# 5xx statuses worth one more try on the same deployment (a transient error, not "unavailable").
TRANSIENT_STATUS: Final = frozenset({500, 502, 504})
# The longest Retry-After read at all (anything longer is as good as "not soon").
MAX_PARSED_WAIT_S: Final = 86_400.0


def classify_status(status: int, body: bytes) -> Failure | None:
    """The failure class of an upstream's answer, or None when the answer goes to the client as it is
    (a success, or a client error such as a content-filter refusal: retrying would not change it)."""
    if status in (401, 403):
        return "auth"
    if 300 <= status < 400:
        return "redirect"
    if status == 429:
        return "429"
    if status == 408:
        return "timeout"
    if 500 <= status <= 599:
        return "5xx"
    if status == 400 and is_context_length_error(body):
        return "context_length"
    return None


def retry_after_s(headers: Mapping[str, str], now_epoch: float) -> float | None:
    """The wait an upstream asked for, in seconds: `retry-after-ms` (OpenAI), else `retry-after` as
    delta-seconds or an HTTP-date (a date in the past: 0). None when absent or unreadable."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000.0
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value >= 0:
            return min(value, MAX_PARSED_WAIT_S)
    raw = headers.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None  # HTTP-dates are GMT; one without a zone is not one
        seconds = when.timestamp() - now_epoch
        return min(max(0.0, seconds), MAX_PARSED_WAIT_S)
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, MAX_PARSED_WAIT_S)


def backoff_s(policy: RetryPolicy, retry: int, rng: random.Random) -> float:
    """The wait before retry number `retry` (1-based) of one deployment: the exponential step capped at
    `backoff_max_ms`, half of it fixed and half random ("equal jitter"): spread out, never immediate."""
    step: float = min(policy.backoff_max_ms, policy.backoff_base_ms * 2 ** min(retry - 1, 30)) / 1000.0
    return step / 2 + rng.uniform(0.0, step / 2)


@dataclass(frozen=True, slots=True)
class Move:
    """After a failed attempt: retry the `same` deployment after `wait_s`, or go on to the next one."""

    same: bool
    wait_s: float = 0.0


NEXT: Final = Move(same=False)


def next_move(
    policy: RetryPolicy,
    failure: Failure,
    status: int | None,
    headers: Mapping[str, str],
    retries_here: int,
    now_epoch: float,
    rng: random.Random,
) -> Move | None:
    """What follows a failed attempt on a deployment already retried `retries_here` times; None: no
    retry at all (the failure's class is not in the route's `retry_on`)."""
    if failure in ("auth", "redirect"):
        return NEXT  # the gateway's own problem on that deployment: another may be fine
    if failure not in policy.retry_on:
        return None
    same_left = retries_here < policy.same_deployment
    if status in OVERLOAD_STATUS:
        wait = retry_after_s(headers, now_epoch)
        if wait is not None:
            # Honoured: the same deployment no sooner than asked, and only if that is soon enough.
            return Move(same=True, wait_s=wait) if same_left and wait <= policy.max_retry_after_s else NEXT
        if status == 429 and same_left:
            return Move(same=True, wait_s=backoff_s(policy, retries_here + 1, rng))
        return NEXT
    if same_left and (failure == "reset" or status in TRANSIENT_STATUS):
        return Move(same=True, wait_s=backoff_s(policy, retries_here + 1, rng))
    return NEXT


def retry_limit(ratio: float, minimum: int, active: int) -> int:
    """Retries a route may have in flight: max(minimum, ratio x active), the share rounded down as
    Envoy does (the epsilon keeps 0.29 x 100 at 29)."""
    return max(minimum, math.floor(ratio * active + 1e-9))


class RetryBudget:
    """One route's retry budget, Envoy's: a retry may start only while the route's retries in flight
    are fewer than max(`budget_min`, `budget_ratio` x its active requests, rounded down).

    A request is active from the start of its dispatch until its answer is over (a stream: until the
    relay ends); a retry (any attempt after a request's first: the same deployment again, or a
    fallback) is in flight from when the budget grants it until its request ends or asks for the next
    one. Counts of this replica only, bounded by its concurrency, so nothing expires and memory does not
    grow with traffic. In a brown-out, the retries the route adds at any moment stay a fifth of what
    it is doing anyway (plus the minimum, which lets a quiet route still retry)."""

    __slots__ = ("active", "retrying")

    def __init__(self) -> None:
        self.active = 0
        self.retrying = 0

    def start(self) -> BudgetClaim:
        """A request of the route starts (its first attempt is never refused); end its claim once."""
        self.active += 1
        return BudgetClaim(self)


class BudgetClaim:
    """One request's share of its route's budget: it counts as active, and holds at most one retry
    at a time, until `end` (idempotent: every way a request can end may call it)."""

    __slots__ = ("_budget", "_open", "_retrying")

    def __init__(self, budget: RetryBudget) -> None:
        self._budget = budget
        self._open = True
        self._retrying = False

    def try_retry(self, ratio: float, minimum: int) -> bool:
        """Start one more retry if the route's other retries in flight leave room for it (the one this
        request may already hold is over: it is replaced, not added)."""
        budget = self._budget
        if not self._open:
            return False
        others = budget.retrying - self._retrying
        if others >= retry_limit(ratio, minimum, budget.active):
            return False
        if not self._retrying:
            self._retrying = True
            budget.retrying += 1
        return True

    def end(self) -> None:
        """The request is over: no longer active, its retry (if any) no longer in flight."""
        if not self._open:
            return
        self._open = False
        budget = self._budget
        budget.active -= 1
        if self._retrying:
            self._retrying = False
            budget.retrying -= 1


class RetryBudgets:
    """The budgets of every route, by name. Lives as long as the process (a reload keeps the counts of
    the requests in flight; a request's claim ends on the budget it started on)."""

    def __init__(self) -> None:
        self._by_route: dict[str, RetryBudget] = {}

    def start(self, route: str) -> BudgetClaim:
        """A request of `route` starts: its claim (gateway.stages.upstream's tap ends it)."""
        budget = self._by_route.get(route)
        if budget is None:
            budget = self._by_route[route] = RetryBudget()
        return budget.start()

    def by_route(self) -> dict[str, tuple[int, int]]:
        """(active requests, retries in flight) per route, for the gauges and tests."""
        return {route: (b.active, b.retrying) for route, b in self._by_route.items()}
