"""What the dispatcher does after a failed attempt: the failure's class, the next move (the same
deployment after a wait, the next deployment, or give up), Retry-After parsing, jittered backoff and
the per-route retry budget. Pure apart from the clock and the random source the caller passes in.

Only ever consulted before the first byte of an answer reached the client (gateway.upstream.dispatch).
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections import deque
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
# The retry budget's window is counted in this many buckets (memory bounded whatever the traffic).
BUDGET_BUCKETS: Final = 10
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
    """One route's retry budget. A retry may start only while

    - the route's retries in flight are fewer than max(`budget_min`, `budget_ratio` x its active
      requests, rounded down): Envoy's budget, which keeps the retries added at any moment a fifth of
      what the route is doing anyway (the minimum lets a quiet route still retry); and
    - its retries in the last `window_s` stay within `budget_ratio` x its requests in that window +
      `budget_min`: Finagle's, which bounds the total a brown-out costs the upstreams (the window's retries
      never exceed ratio x its requests + minimum) where Envoy's alone lets fast failovers that never pile
      up retry without end. Kept in buckets, the window is between 0.9 and 1 x `window_s` long.

    A request is active from the start of its dispatch until its answer is over (a stream: until the
    relay ends); a retry (any attempt after a request's first: the same deployment again, or a
    fallback) is in flight from when the budget grants it until its request ends or asks for the next
    one. Counts of this replica only; the window's in `BUDGET_BUCKETS` buckets, so memory does not grow
    with traffic."""

    __slots__ = ("_buckets", "_requests", "_retries", "_width", "active", "retrying")

    def __init__(self, window_s: float = 10.0) -> None:
        self.active = 0
        self.retrying = 0
        self._width = window_s / BUDGET_BUCKETS
        # [bucket number, requests, retries], oldest first.
        self._buckets: deque[list[int]] = deque()
        self._requests = 0  # in the window
        self._retries = 0  # in the window

    def _current(self, now: float) -> list[int]:
        bucket = int(now / self._width)
        buckets = self._buckets
        while buckets and buckets[0][0] <= bucket - BUDGET_BUCKETS:
            _, requests, retries = buckets.popleft()
            self._requests -= requests
            self._retries -= retries
        if not buckets or buckets[-1][0] != bucket:
            buckets.append([bucket, 0, 0])
        return buckets[-1]

    def start(self, now: float) -> BudgetClaim:
        """A request of the route starts (its first attempt is never refused); end its claim once."""
        self.active += 1
        self._current(now)[1] += 1
        self._requests += 1
        return BudgetClaim(self)

    def window_allows(self, now: float, ratio: float, minimum: int) -> bool:
        """Whether one more retry keeps the window's retries within ratio x its requests + minimum;
        if so it is counted."""
        current = self._current(now)
        # The epsilon keeps 0.7 x 170 at 119 (float products fall just short), as retry_limit does.
        if self._retries + 1 > ratio * self._requests + minimum + 1e-9:
            return False
        current[2] += 1
        self._retries += 1
        return True

    def window_counts(self) -> tuple[int, int]:
        """(requests, retries) in the window, for tests."""
        return self._requests, self._retries


class BudgetClaim:
    """One request's share of its route's budget: it counts as active, and holds at most one retry
    at a time, until `end` (idempotent: every way a request can end may call it)."""

    __slots__ = ("_budget", "_open", "_retrying")

    def __init__(self, budget: RetryBudget) -> None:
        self._budget = budget
        self._open = True
        self._retrying = False

    def try_retry(self, ratio: float, minimum: int, now: float | None = None) -> bool:
        """Start one more retry if the route's other retries in flight leave room for it (the one this
        request may already hold is over: it is replaced, not added) and the window's total allows it."""
        budget = self._budget
        if not self._open:
            return False
        others = budget.retrying - self._retrying
        if others >= retry_limit(ratio, minimum, budget.active):
            return False
        if not budget.window_allows(time.monotonic() if now is None else now, ratio, minimum):
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
    """The budgets of every route, by name and window. Lives as long as the process (a reload keeps the
    counts of the requests in flight; a request's claim ends on the budget it started on; a reload that
    changes a route's window starts a new budget)."""

    def __init__(self) -> None:
        self._by_route: dict[tuple[str, float], RetryBudget] = {}

    def start(self, route: str, window_s: float = 10.0, now: float | None = None) -> BudgetClaim:
        """A request of `route` starts: its claim (gateway.stages.upstream's tap ends it)."""
        key = (route, window_s)
        budget = self._by_route.get(key)
        if budget is None:
            budget = self._by_route[key] = RetryBudget(window_s)
        return budget.start(time.monotonic() if now is None else now)

    def by_route(self) -> dict[str, tuple[int, int]]:
        """(active requests, retries in flight) per route, for the gauges and tests."""
        counts: dict[str, tuple[int, int]] = {}
        for (route, _), b in self._by_route.items():
            active, retrying = counts.get(route, (0, 0))
            counts[route] = (active + b.active, retrying + b.retrying)
        return counts
