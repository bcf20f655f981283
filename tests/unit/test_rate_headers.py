"""`rate_headers` (gateway.stages.limits): one pass over an admission's checks gives what each unit's
`Admission.headline` gives, spelled as OpenAI's `x-ratelimit-*` headers, requests first."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.stages.limits import _duration, rate_headers
from gateway.state.base import Admission, BudgetLimit, CheckResult, ConcurrencyLimit, RateLimit

SCOPES = st.sampled_from(["key", "tenant", "route"])
LIMITS = st.one_of(
    st.builds(RateLimit, scope=SCOPES, unit=st.sampled_from(["requests", "tokens"]), limit=st.integers(1, 10**6)),
    st.builds(ConcurrencyLimit, scope=SCOPES, limit=st.integers(0, 100)),
    st.builds(
        BudgetLimit,
        scope=st.sampled_from(["key", "tenant"]),
        metric=st.sampled_from(["usd", "tokens"]),
        window=st.sampled_from(["day", "month"]),
        limit=st.integers(1, 10**9),
    ),
)
# Few distinct values, so ties on remaining and on reset are common.
CHECKS = st.builds(
    CheckResult,
    limit=LIMITS,
    allowed=st.booleans(),
    remaining=st.integers(-3, 3),
    reset_ms=st.sampled_from([0, 5, 999, 1000, 59_999, 60_000, 3_600_000]),
)


def _headline_headers(admission: Admission) -> dict[str, str]:
    """What the headers were made from before: `Admission.headline` per unit."""
    headers: dict[str, str] = {}
    for unit in ("requests", "tokens"):
        check = admission.headline(unit)  # type: ignore[arg-type]
        if check is None or not isinstance(check.limit, RateLimit):
            continue
        headers[f"x-ratelimit-limit-{unit}"] = str(check.limit.limit)
        headers[f"x-ratelimit-remaining-{unit}"] = str(max(0, check.remaining))
        headers[f"x-ratelimit-reset-{unit}"] = _duration(check.reset_ms)
    return headers


@settings(max_examples=300, deadline=None)
@given(st.lists(CHECKS, max_size=8), st.dictionaries(st.sampled_from(["x-strait-spill", "a"]), st.just("v")))
def test_rate_headers_are_each_units_headline(checks: list[CheckResult], before: dict[str, str]) -> None:
    admission = Admission(allowed=True, checks=tuple(checks))
    expected = _headline_headers(admission)
    assert list(rate_headers(admission).items()) == list(expected.items())
    into = dict(before)
    assert rate_headers(admission, into) is into
    assert list(into.items()) == [*before.items(), *expected.items()]


def test_remaining_is_never_negative_and_resets_read_as_openai_spells_them() -> None:
    rate = RateLimit(scope="tenant", unit="tokens", limit=100)
    admission = Admission(
        allowed=False, checks=(CheckResult(limit=rate, allowed=False, remaining=-5, reset_ms=61_000),)
    )
    assert rate_headers(admission) == {
        "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "1m1s",
    }
