"""The retry policy's parts: Retry-After parsing, jittered backoff, the next move after each failure class,
the retry budget (retries in flight against active requests), and the dispatcher refusing a retry the
budget does not allow."""

from __future__ import annotations

import asyncio
import email.utils
import math
import random
from collections.abc import Awaitable, Callable

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.canonical import Request
from gateway.context import RequestContext
from gateway.contracts import End, UpstreamCall, UpstreamResponse
from gateway.policy.index import Principal, Target
from gateway.policy.model import RetryPolicy, Route
from gateway.stages.upstream import RetryBudgetTap
from gateway.telemetry import Metrics
from gateway.upstream.dispatch import Dispatcher
from gateway.upstream.retry import (
    MAX_PARSED_WAIT_S,
    NEXT,
    BudgetClaim,
    RetryBudgets,
    backoff_s,
    classify_status,
    next_move,
    retry_after_s,
    retry_limit,
)
from gateway.upstream.signals import LiveSignals
from tests.harness.waiting import wait_until
from tests.unit.test_dispatch_attempts import Down, target

NOW = 1_800_000_000.0
POLICY = RetryPolicy()
CONTEXT_400 = b'{"error": {"message": "This model\'s maximum context length is 4096 tokens.", "code": null}}'
FILTER_400 = b'{"error": {"message": "filtered", "code": "content_filter", "param": "prompt"}}'


def test_retry_after_forms() -> None:
    assert retry_after_s({"retry-after": "2"}, NOW) == 2.0
    assert retry_after_s({"retry-after": " 1.5 "}, NOW) == 1.5
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "9"}, NOW) == 0.25  # OpenAI's ms wins
    date = email.utils.formatdate(NOW + 3, usegmt=True)
    assert retry_after_s({"retry-after": date}, NOW) == pytest.approx(3.0)
    assert retry_after_s({"retry-after": email.utils.formatdate(NOW - 60, usegmt=True)}, NOW) == 0.0
    for bad in ("-1", "soon", "nan", "inf", ""):
        assert retry_after_s({"retry-after": bad}, NOW) is None
    assert retry_after_s({}, NOW) is None
    assert retry_after_s({"retry-after": "99999999"}, NOW) == MAX_PARSED_WAIT_S


@given(st.text(max_size=64), st.text(max_size=16))
def test_retry_after_never_raises_and_stays_in_range(value: str, ms: str) -> None:
    for headers in ({"retry-after": value}, {"retry-after-ms": ms}, {"retry-after": value, "retry-after-ms": ms}):
        got = retry_after_s(headers, NOW)
        assert got is None or 0.0 <= got <= MAX_PARSED_WAIT_S


@given(st.integers(min_value=0, max_value=10**6))
def test_retry_after_delta_seconds_is_read_exactly(n: int) -> None:
    assert retry_after_s({"retry-after": str(n)}, NOW) == min(float(n), MAX_PARSED_WAIT_S)


@given(st.integers(min_value=0, max_value=3600), st.floats(min_value=0, max_value=0.999))
def test_a_retry_after_date_is_never_read_as_sooner_than_it_says(seconds: int, frac: float) -> None:
    now = NOW + frac
    date = email.utils.formatdate(math.ceil(now + seconds), usegmt=True)  # as a server sends it: whole seconds
    got = retry_after_s({"retry-after": date}, now)
    assert got is not None and got >= seconds


@settings(max_examples=200)
@given(
    st.integers(min_value=1, max_value=10_000),
    st.integers(min_value=1, max_value=60_000),
    st.integers(min_value=1, max_value=50),
    st.integers(min_value=0, max_value=2**32),
)
def test_backoff_is_bounded_jittered_and_never_immediate(base: int, cap: int, retry: int, seed: int) -> None:
    policy = RetryPolicy(backoff_base_ms=min(base, cap), backoff_max_ms=cap)
    step = min(cap, min(base, cap) * 2 ** (retry - 1)) / 1000.0
    wait = backoff_s(policy, retry, random.Random(seed))
    assert step / 2 <= wait <= step <= cap / 1000.0


def test_backoff_is_spread_out() -> None:
    rng = random.Random(7)
    waits = {round(backoff_s(POLICY, 1, rng), 6) for _ in range(50)}
    assert len(waits) > 40  # jittered: clients backing off together do not come back together


def test_classes() -> None:
    assert classify_status(200, b"") is None
    assert classify_status(400, FILTER_400) is None  # a refusal: the client's answer, never retried
    assert classify_status(400, CONTEXT_400) == "context_length"
    assert classify_status(404, b"") is None
    assert classify_status(429, b"") == "429"
    assert classify_status(408, b"") == "timeout"
    assert [classify_status(s, b"") for s in (500, 502, 503, 504, 529)] == ["5xx"] * 5
    assert classify_status(401, b"") == classify_status(403, b"") == "auth"
    assert classify_status(302, b"") == "redirect"


def move(failure: str, status: int | None, headers: dict[str, str] | None = None, retries: int = 0, **kw: object):  # type: ignore[no-untyped-def]
    policy = RetryPolicy(**kw)  # type: ignore[arg-type]
    return next_move(policy, failure, status, headers or {}, retries, NOW, random.Random(1))  # type: ignore[arg-type]


def test_next_moves() -> None:
    # Retry-After within the bound: the same deployment, after exactly that wait.
    assert move("429", 429, {"retry-after": "2"}) == type(NEXT)(same=True, wait_s=2.0)
    assert move("5xx", 503, {"retry-after": "1"}).same
    # Beyond the bound, or the same deployment already retried: the next one, at once.
    assert move("429", 429, {"retry-after": "6"}) is NEXT
    assert move("429", 429, {"retry-after": "2"}, retries=1) is NEXT
    assert move("429", 429, {"retry-after": "6"}, max_retry_after_s=10).wait_s == 6.0
    # 429 without Retry-After: a backoff on the same deployment, then the next.
    first = move("429", 429)
    assert first.same and 0.05 <= first.wait_s <= 0.1
    assert move("429", 429, retries=1) is NEXT
    # Transient 5xx and resets: one backed-off retry of the same deployment.
    for status in (500, 502, 504):
        assert move("5xx", status).same
    assert move("reset", None).same
    assert move("reset", None, retries=1) is NEXT
    assert move("5xx", 500, same_deployment=0) is NEXT
    assert move("5xx", 500, retries=1, same_deployment=2).same
    # Unavailable, unreachable, silent: the next deployment at once.
    assert move("5xx", 503) is NEXT
    assert move("5xx", 529) is NEXT
    assert move("connect", None) is NEXT
    assert move("timeout", None) is NEXT
    assert move("context_length", 400) is NEXT
    # Not in retry_on: no retry at all; the gateway's own credential or redirect problem always moves on.
    assert move("5xx", 500, retry_on=("connect",)) is None
    assert move("context_length", 400, retry_on=()) is None
    assert move("auth", 401, retry_on=()) is NEXT


# ---- the retry budget (Envoy's: retries in flight < max(minimum, ratio x active requests)) ----

# An operation on the budget: start a request, ask a retry for open request i, end request i (again).
BudgetOp = tuple[str, int]
budget_ops = st.lists(
    st.tuples(st.sampled_from(["start", "retry", "end"]), st.integers(min_value=0, max_value=60)), max_size=400
)


@settings(max_examples=300)
@given(budget_ops, st.floats(min_value=0, max_value=1), st.integers(min_value=0, max_value=10))
def test_budget_grants_a_retry_only_while_retries_in_flight_are_below_the_limit(
    ops: list[BudgetOp], ratio: float, minimum: int
) -> None:
    budgets = RetryBudgets()
    claims: list[BudgetClaim] = []
    open_: set[int] = set()
    holding: set[int] = set()
    granted_total = 0  # all within one window (the clock stands still)
    for op, i in ops:
        if op == "start":
            claims.append(budgets.start("chat", now=0.0))
            open_.add(len(claims) - 1)
        elif claims:
            i %= len(claims)
            if op == "retry":
                active = len(open_)
                others = len(holding - {i})
                granted = claims[i].try_retry(ratio, minimum, now=0.0)
                # Granted exactly when the request is open, the other retries in flight leave room, and
                # the window's retries stay within ratio x its requests + minimum.
                assert granted == (
                    i in open_
                    and others < max(minimum, math.floor(ratio * active + 1e-9))
                    and granted_total + 1 <= ratio * len(claims) + minimum + 1e-9
                )
                if granted:
                    granted_total += 1
                    holding.add(i)
            else:
                claims[i].end()  # ending twice is harmless: each request leaves the counts once
                open_.discard(i)
                holding.discard(i)
        active, retrying = budgets.by_route().get("chat", (0, 0))
        assert (active, retrying) == (len(open_), len(holding))
        # A request holds at most one retry, so retries in flight never exceed the requests in flight.
        assert retrying <= active
    for claim in claims:
        claim.end()
    assert budgets.by_route().get("chat", (0, 0)) == (0, 0)


@example(active=170, ratio=0.7, minimum=0)  # 0.7 x 170 is 118.99999999999999 in floats
@settings(max_examples=100)
@given(st.integers(min_value=0, max_value=500), st.floats(min_value=0, max_value=1), st.integers(0, 10))
def test_a_burst_of_failing_requests_gets_at_most_the_limit_of_retries_at_once(
    active: int, ratio: float, minimum: int
) -> None:
    budgets = RetryBudgets()
    claims = [budgets.start("chat", now=0.0) for _ in range(active)]
    granted = sum(claim.try_retry(ratio, minimum, now=0.0) for claim in claims)
    # Envoy's limit at once; the window's (ratio x requests + minimum) is never the smaller here.
    assert granted == min(active, retry_limit(ratio, minimum, active))
    # A request's next retry replaces its own: asking again never adds to the retries in flight.
    for claim in claims[:granted]:
        claim.try_retry(ratio, minimum, now=0.0)
    assert budgets.by_route().get("chat", (0, 0)) == (active, granted)


def test_budget_allows_the_minimum_then_a_share_of_active_requests_and_frees_a_slot_when_a_request_ends() -> None:
    budgets = RetryBudgets()
    first = budgets.start("chat")
    others = [budgets.start("chat") for _ in range(3)]
    # 4 active: max(3, 0.8) = 3 retries in flight.
    assert [c.try_retry(0.2, 3) for c in [first, *others]] == [True, True, True, False]
    # 20 active: max(3, 4) = 4.
    more = [budgets.start("chat") for _ in range(16)]
    assert [c.try_retry(0.2, 3) for c in more[:2]] == [True, False]
    first.end()  # its retry is over, and it is no longer active: 19 active (limit 3), 3 in flight
    assert not more[1].try_retry(0.2, 3)
    late = budgets.start("chat")  # 20 active again: room for a 4th
    assert more[1].try_retry(0.2, 3)
    assert not late.try_retry(0.2, 3)
    first.end()
    assert budgets.by_route() == {"chat": (20, 4)}
    # An ended claim never retries again (and does not count).
    assert not first.try_retry(1.0, 100)


@settings(max_examples=200)
@given(
    st.lists(st.floats(min_value=0, max_value=1), min_size=1, max_size=300),
    st.floats(min_value=0, max_value=1),
    st.integers(0, 10),
    st.floats(min_value=0.5, max_value=60),
)
@example(gaps=[0.0, 0.25, 0.03125, 0.0, 0.4375], ratio=0.25, minimum=1, window_s=0.5)
def test_over_any_window_retries_stay_within_the_ratio_of_requests_plus_the_minimum(
    gaps: list[float], ratio: float, minimum: int, window_s: float
) -> None:
    # A sequential client (one request at a time: Envoy's limit never binds) whose every attempt fails
    # and asks for a retry: Finagle's window is what bounds the brown-out's total. The window is kept in
    # 10 buckets, so at time t it covers at least (t - 0.9 w, t] and at most (t - w, t]: when a retry is
    # granted at t, the retries of the last 0.9 w are within ratio x the requests of the last w + minimum.
    budgets = RetryBudgets()
    now = 0.0
    eps = 1e-9 * max(1.0, window_s)
    requests: list[float] = []
    grants: list[float] = []
    for gap in gaps:
        now += gap
        claim = budgets.start("chat", window_s, now=now)
        requests.append(now)
        if claim.try_retry(ratio, minimum, now=now):
            grants.append(now)
            recent_grants = sum(1 for g in grants if g > now - 0.9 * window_s + eps)
            recent_requests = sum(1 for r in requests if r > now - window_s - eps)
            assert recent_grants <= ratio * recent_requests + minimum + 1e-9
        claim.end()
    assert budgets.by_route()["chat"] == (0, 0)


def test_a_sequential_failing_client_gets_retries_back_when_the_window_moves_on() -> None:
    budgets = RetryBudgets()
    grants = []
    for _ in range(10):
        claim = budgets.start("chat", 10.0, now=1.0)
        grants.append(claim.try_retry(0.2, 3, now=1.0))
        claim.end()
    # After k requests, at most 0.2 x k + 3 retries: 5 of 10, never more (Envoy's limit alone allowed 10).
    assert grants == [True, True, True, False, True, False, False, False, False, True]
    later = budgets.start("chat", 10.0, now=12.0)  # the window has moved past all of them
    assert later.try_retry(0.2, 3, now=12.0)


class Unavailable:
    def __init__(self) -> None:
        self.calls = 0

    async def send(self, call: UpstreamCall) -> UpstreamResponse:
        self.calls += 1
        return UpstreamResponse(status=503, body=b'{"error": {"message": "busy"}}')

    async def aclose(self) -> None:
        return None


class Answers:
    def __init__(self) -> None:
        self.calls = 0

    async def send(self, call: UpstreamCall) -> UpstreamResponse:
        self.calls += 1
        return UpstreamResponse(status=200, body=b"{}")

    async def aclose(self) -> None:
        return None


def context(route: Route, plan: tuple[Target, ...], n: int) -> RequestContext:
    ctx = RequestContext(request_id=f"r{n}", operation="chat", started=0.0, headers={}, route_name=route.name)
    ctx.principal = Principal(tenant="t", key_id="k", allowed_routes=None)
    ctx.request = Request(operation="chat", model=route.name)
    ctx.route = route
    ctx.plan = plan
    return ctx


class Gated:
    """Answers `status` once `go` is set, counting the calls waiting for it."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.go = asyncio.Event()
        self.calls = 0
        self.waiting = 0

    async def send(self, call: UpstreamCall) -> UpstreamResponse:
        self.calls += 1
        self.waiting += 1
        await self.go.wait()
        self.waiting -= 1
        return UpstreamResponse(status=self.status, body=b'{"error": {"message": "busy"}}')

    async def aclose(self) -> None:
        return None


async def test_the_dispatcher_fails_over_only_as_many_requests_at_once_as_the_budget_allows() -> None:
    """50 requests in flight, the primary fails them all at once: 10 (20 % of 50) fail over, the other
    40 get the primary's 503. Once the answers are over (the tap), the route counts nothing."""
    a, b = target("a"), target("b")
    route = Route(name="chat", models=("model-a", "model-b"))  # the defaults: 20 %, at least 3
    primary, fallback = Gated(503), Gated(200)
    signals = LiveSignals()
    dispatcher = Dispatcher({"a": primary, "b": fallback}, Metrics(), signals)  # type: ignore[dict-item]
    contexts = [context(route, (a, b), n) for n in range(50)]
    calls = [asyncio.ensure_future(dispatcher.call(ctx)) for ctx in contexts]
    await wait_until(_true_when(lambda: primary.waiting == 50))
    primary.go.set()
    # Each request either gave up (its call is done) or waits on the fallback.
    await wait_until(_true_when(lambda: sum(c.done() for c in calls) + fallback.waiting == 50))
    assert fallback.waiting == 10 and dispatcher.budgets.by_route() == {"chat": (50, 10)}
    fallback.go.set()
    statuses = [r.status for r in await asyncio.gather(*calls)]
    assert statuses.count(200) == fallback.calls == 10 and statuses.count(503) == 40
    tap = RetryBudgetTap()
    for ctx in contexts:
        tap.on_end(ctx, End("completed", 200))
        tap.on_end(ctx, End("completed", 200))  # a second end changes nothing
    assert dispatcher.budgets.by_route() == {"chat": (0, 0)}


async def test_a_sequential_client_retries_within_the_window_of_the_budget() -> None:
    """One request at a time: Envoy's limit (1 retry in flight) always has room, so only the window
    bounds the total: after k requests at most 0.2 x k + 1 retries, the rest get the primary's 503."""
    a, b = target("a"), target("b")
    route = Route(name="chat", models=("model-a", "model-b"), retry=RetryPolicy(budget_ratio=0.2, budget_min=1))
    primary, fallback = Unavailable(), Answers()
    dispatcher = Dispatcher({"a": primary, "b": fallback}, Metrics(), LiveSignals())  # type: ignore[dict-item]
    statuses = []
    for n in range(5):
        ctx = context(route, (a, b), n)
        statuses.append((await dispatcher.call(ctx)).status)
        RetryBudgetTap().on_end(ctx, End("completed", 200))
    assert statuses == [200, 503, 503, 503, 200]
    assert fallback.calls == 2 and primary.calls == 5 and dispatcher.budgets.by_route() == {"chat": (0, 0)}
    # Without the minimum and with one request active, 20 % of it leaves no room for a retry.
    none = Route(name="strict", models=("model-a", "model-b"), retry=RetryPolicy(budget_ratio=0.2, budget_min=0))
    assert (await dispatcher.call(context(none, (a, b), 9))).status == 503


def _true_when(condition: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return condition()

    return check


async def test_without_a_route_the_defaults_apply_and_connect_failures_move_on_at_once() -> None:
    a, b = target("a"), target("b")
    fallback = Answers()
    dispatcher = Dispatcher({"a": Down(), "b": fallback}, Metrics(), LiveSignals())  # type: ignore[dict-item]
    ctx = RequestContext(request_id="x", operation="chat", started=0.0, headers={}, route_name="chat")
    ctx.request = Request(operation="chat", model="chat")
    ctx.plan = (a, b)
    response = await dispatcher.call(ctx)
    assert response.status == 200 and ctx.target is b and fallback.calls == 1
    assert [(t.backend.name, status) for t, status, _ in ctx.failed_attempts] == [("a", 502)]


def test_the_limit_rounds_the_share_down_as_envoy_does() -> None:
    assert [retry_limit(0.2, 0, n) for n in (0, 1, 4, 5, 9, 10)] == [0, 0, 0, 1, 1, 2]
    assert retry_limit(0.29, 0, 100) == 29 and retry_limit(0.2, 3, 10) == 3 and retry_limit(0.2, 3, 50) == 10
