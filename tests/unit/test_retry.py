"""The retry policy's parts: Retry-After parsing, jittered backoff, the next move after each failure class,
the windowed retry budget, and the dispatcher refusing a retry the budget does not allow."""

from __future__ import annotations

import email.utils
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.canonical import Request
from gateway.context import RequestContext
from gateway.contracts import UpstreamCall, UpstreamResponse
from gateway.policy.index import Principal, Target
from gateway.policy.model import RetryPolicy, Route
from gateway.telemetry import Metrics
from gateway.upstream.dispatch import Dispatcher
from gateway.upstream.retry import (
    MAX_PARSED_WAIT_S,
    NEXT,
    RetryBudget,
    backoff_s,
    classify_status,
    next_move,
    retry_after_s,
)
from gateway.upstream.signals import LiveSignals
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


@settings(max_examples=200)
@given(
    st.lists(st.tuples(st.booleans(), st.floats(min_value=0, max_value=5)), max_size=300),
    st.floats(min_value=0, max_value=1),
    st.integers(min_value=0, max_value=10),
)
def test_budget_retries_never_exceed_ratio_of_requests_plus_minimum_within_a_window(
    ops: list[tuple[bool, float]], ratio: float, minimum: int
) -> None:
    budget = RetryBudget(window_s=10.0)
    now, requests, retries = 100.0, 0, 0
    for is_request, dt in ops:
        now += dt / 100  # all within one window
        if is_request:
            budget.request(now)
            requests += 1
        elif budget.try_retry(now, ratio, minimum):
            retries += 1
    assert retries <= ratio * requests + minimum
    assert budget.counts() == (requests, retries)


def test_budget_allows_the_minimum_then_a_share_and_forgets_old_traffic() -> None:
    budget = RetryBudget(window_s=10.0)
    budget.request(0.0)
    assert [budget.try_retry(0.0, 0.2, 3) for _ in range(4)] == [True, True, True, False]
    for _ in range(10):
        budget.request(1.0)
    # 11 requests: 0.2 x 11 + 3 = 5.2, so two more.
    assert [budget.try_retry(1.0, 0.2, 3) for _ in range(3)] == [True, True, False]
    # A window later, the old requests and retries are gone: the minimum is back.
    assert budget.try_retry(12.0, 0.2, 3)
    assert budget.counts() == (0, 1)


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


async def test_the_dispatcher_stops_failing_over_when_the_budget_is_spent() -> None:
    a, b = target("a"), target("b")
    route = Route(name="chat", models=("model-a", "model-b"), retry=RetryPolicy(budget_ratio=0.5, budget_min=1))
    primary, fallback = Unavailable(), Answers()
    dispatcher = Dispatcher({"a": primary, "b": fallback}, Metrics(), LiveSignals())  # type: ignore[dict-item]
    statuses = [(await dispatcher.call(context(route, (a, b), n))).status for n in range(10)]
    # Retries <= 0.5 x requests + 1, counted as requests arrive: 1, 1, 2, 2, 3, 3... of 10 requests, 6 fail over.
    assert statuses.count(200) == fallback.calls == 6
    assert primary.calls == 10
    assert primary.calls + fallback.calls <= 1.5 * 10 + 1


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
