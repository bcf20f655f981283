"""Rate cards (gateway.policy.rates, gateway.accounting.counts): every token kind priced at its own rate,
exactly, with the documented defaults; unpriced deployments found, logged and gauged."""

from __future__ import annotations

import logging
import subprocess
import sys
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.accounting.counts import TokenCounts, cost_micro_usd, counts_of, worst_cost_micro_usd
from gateway.accounting.unpriced import report_unpriced
from gateway.policy.model import PolicySet, Price
from gateway.policy.rates import unpriced_in
from gateway.telemetry import Metrics
from gateway.upstream.wire import Usage

# Rates as a policy writes them: a few decimals, from free to frontier prices.
RATES = st.one_of(
    st.just(0.0),
    st.decimals(min_value=0, max_value=200, places=3, allow_nan=False, allow_infinity=False).map(float),
)
OPTIONAL_RATES = st.one_of(st.none(), RATES)
COUNTS = st.integers(min_value=0, max_value=2_000_000)


@st.composite
def prices(draw: st.DrawFn) -> Price:
    return Price(
        input_per_mtok=draw(RATES),
        output_per_mtok=draw(RATES),
        cached_input_per_mtok=draw(OPTIONAL_RATES),
        cache_write_per_mtok=draw(OPTIONAL_RATES),
        reasoning_per_mtok=draw(OPTIONAL_RATES),
        per_request=draw(st.sampled_from([0.0, 0.001, 0.01, 0.025])),
    )


@st.composite
def parts(draw: st.DrawFn) -> dict[str, int]:
    """Disjoint parts: uncached input, cache reads, cache writes, plain output, reasoning."""
    return {k: draw(COUNTS) for k in ("input", "cached", "cache_write", "output", "reasoning")}


def counts(p: dict[str, int]) -> TokenCounts:
    return TokenCounts(
        prompt=p["input"] + p["cached"] + p["cache_write"],
        completion=p["output"] + p["reasoning"],
        cached=p["cached"],
        cache_write=p["cache_write"],
        reasoning=p["reasoning"],
    )


def _exact(rate: float) -> Fraction:
    return Fraction(Decimal(repr(rate)))


def old_formula_exact(price: Price, prompt: int, completion: int, cached: int) -> int:
    """The formula before rate cards (input, cached input, output), in exact arithmetic, half to even."""
    cached = min(cached, prompt)
    cached_rate = price.cached_input_per_mtok if price.cached_input_per_mtok is not None else price.input_per_mtok
    total = (
        (prompt - cached) * _exact(price.input_per_mtok)
        + cached * _exact(cached_rate)
        + completion * _exact(price.output_per_mtok)
    )
    return round(total)


def old_formula_float(price: Price, prompt: int, completion: int, cached: int) -> int:
    """The formula as Strait computed it before: a sum of float products, rounded."""
    cached = min(cached, prompt)
    cached_rate = price.cached_input_per_mtok if price.cached_input_per_mtok is not None else price.input_per_mtok
    return round((prompt - cached) * price.input_per_mtok + cached * cached_rate + completion * price.output_per_mtok)


def test_every_kind_is_priced_at_its_own_rate() -> None:
    price = Price(
        input_per_mtok=3.0,
        output_per_mtok=15.0,
        cached_input_per_mtok=0.3,
        cache_write_per_mtok=3.75,
        reasoning_per_mtok=20.0,
        per_request=0.01,
    )
    tokens = TokenCounts(prompt=1000, completion=300, cached=600, cache_write=100, reasoning=200)
    # 300 input x 3 + 600 cached x 0.3 + 100 written x 3.75 + 100 output x 15 + 200 reasoning x 20 + 10_000 (the fee)
    assert cost_micro_usd(price, tokens) == 900 + 180 + 375 + 1500 + 4000 + 10_000


def test_unstated_rates_default_to_input_and_output() -> None:
    price = Price(input_per_mtok=2.0, output_per_mtok=8.0)
    # A cache write and a cache read cost the input price, reasoning the output price, unless stated.
    assert cost_micro_usd(price, TokenCounts(prompt=100, completion=50, cached=30, cache_write=20, reasoning=40)) == (
        100 * 2 + 50 * 8
    )
    # Stated: each its own.
    cheaper = Price(input_per_mtok=2.0, output_per_mtok=8.0, cached_input_per_mtok=0.5, cache_write_per_mtok=2.5)
    assert cost_micro_usd(cheaper, TokenCounts(prompt=100, cached=40, cache_write=20)) == 40 * 2 + 40 * 0.5 + 20 * 2.5


def test_the_request_fee_is_charged_only_with_tokens() -> None:
    price = Price(input_per_mtok=1.0, per_request=0.005)
    assert cost_micro_usd(price, TokenCounts(prompt=1)) == 1 + 5000
    assert cost_micro_usd(price, TokenCounts()) == 0  # a failed attempt: the provider did no work


def test_cost_is_exact_where_float_sums_were_one_off() -> None:
    # 45 x 0.7 is 31.5 micro-USD exactly (rounded half to even: 32); the float product is 31.499999999999996.
    price = Price(input_per_mtok=0.7)
    assert old_formula_float(price, 45, 0, 0) == 31
    assert cost_micro_usd(price, TokenCounts(prompt=45)) == 32
    assert cost_micro_usd(Price(input_per_mtok=0.5), TokenCounts(prompt=5)) == 2  # 2.5: to even
    assert cost_micro_usd(Price(input_per_mtok=0.5), TokenCounts(prompt=7)) == 4  # 3.5: to even


def test_parts_are_clamped_to_their_totals() -> None:
    price = Price(input_per_mtok=1.0, output_per_mtok=2.0, cached_input_per_mtok=0.0, reasoning_per_mtok=10.0)
    # More cached than prompt: the whole prompt at the cached rate; more reasoning than completion: capped.
    assert cost_micro_usd(price, TokenCounts(prompt=10, completion=5, cached=50, reasoning=9)) == 5 * 10
    # The wire decoder clamps an upstream's reasoning count the same way.
    usage = msgspec.json.decode(
        b'{"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,'
        b' "completion_tokens_details": {"reasoning_tokens": 99}}',
        type=Usage,
    )
    assert counts_of(usage) == TokenCounts(prompt=10, completion=5, reasoning=5)


@given(prices(), parts(), st.sampled_from(["input", "cached", "cache_write", "output", "reasoning"]), COUNTS)
@settings(max_examples=400, deadline=None)
def test_cost_is_monotone_in_every_kind(price: Price, p: dict[str, int], kind: str, more: int) -> None:
    before = cost_micro_usd(price, counts(p))
    after = cost_micro_usd(price, counts({**p, kind: p[kind] + more}))
    assert after >= before


@given(prices(), parts())
@settings(max_examples=400, deadline=None)
def test_cost_is_the_exact_sum_of_its_parts(price: Price, p: dict[str, int]) -> None:
    rate = {
        "input": _exact(price.input_per_mtok),
        "cached": _exact(
            price.cached_input_per_mtok if price.cached_input_per_mtok is not None else price.input_per_mtok
        ),
        "cache_write": _exact(
            price.cache_write_per_mtok if price.cache_write_per_mtok is not None else price.input_per_mtok
        ),
        "output": _exact(price.output_per_mtok),
        "reasoning": _exact(
            price.reasoning_per_mtok if price.reasoning_per_mtok is not None else price.output_per_mtok
        ),
    }
    total = sum(p[k] * rate[k] for k in rate)
    if any(p.values()):
        total += _exact(price.per_request) * 1_000_000
    assert cost_micro_usd(price, counts(p)) == round(total)


@given(RATES, RATES, OPTIONAL_RATES, COUNTS, COUNTS, COUNTS)
@settings(max_examples=400, deadline=None)
def test_without_the_new_fields_the_cost_is_the_old_formula(
    input_rate: float, output_rate: float, cached_rate: float | None, prompt: int, completion: int, cached: int
) -> None:
    price = Price(input_per_mtok=input_rate, output_per_mtok=output_rate, cached_input_per_mtok=cached_rate)
    cost = cost_micro_usd(price, TokenCounts(prompt=prompt, completion=completion, cached=cached))
    assert cost == old_formula_exact(price, prompt, completion, cached)
    # And the float sum Strait used to compute is at most a rounding step away.
    assert abs(cost - old_formula_float(price, prompt, completion, cached)) <= 1


@given(prices(), parts())
@settings(max_examples=300, deadline=None)
def test_a_budget_reservation_covers_every_split(price: Price, p: dict[str, int]) -> None:
    tokens = counts(p)
    assert worst_cost_micro_usd(price, tokens.prompt, tokens.completion) >= cost_micro_usd(price, tokens)


def test_negative_and_absurd_prices_are_refused() -> None:
    for field in ("input_per_mtok", "cache_write_per_mtok", "reasoning_per_mtok", "per_request"):
        with pytest.raises(msgspec.ValidationError, match=">= 0"):
            msgspec.convert({field: -0.01}, Price, strict=True)
        with pytest.raises(msgspec.ValidationError, match="<= 1000000"):
            msgspec.convert({field: 1e7}, Price, strict=True)


UNPRICED_POLICY = """
backends:
  - {name: api, adapter: openai, base_url: "https://api.example.com/v1"}
  - {name: rack, adapter: openai, base_url: "http://10.0.0.5:8000/v1", tier: self-hosted}
  - {name: sim, adapter: simulated}
models:
  - name: priced
    deployments: [{backend: api, upstream_model: p, price: {input_per_mtok: 1, output_per_mtok: 2}}]
  - name: embed-only
    deployments: [{backend: api, upstream_model: e, price: {input_per_mtok: 0.02}}]
  - name: forgotten
    deployments:
      - {backend: api, upstream_model: f}
      - {backend: rack, upstream_model: f, price: {input_per_mtok: 0, output_per_mtok: 0}}
  - name: own-gpu
    deployments: [{backend: rack, upstream_model: o, price: {free: true}}]
  - name: demo
    deployments: [{backend: sim, upstream_model: d}]
routes:
  - {name: r, models: [priced, embed-only, forgotten, own-gpu, demo]}
"""


def test_unpriced_means_charging_nothing_without_saying_so() -> None:
    policy = msgspec.yaml.decode(UNPRICED_POLICY, type=PolicySet)
    # Omitted or all zero: unpriced. Partly priced, `free: true`, and the simulated backend: not.
    assert [u.deployment for u in unpriced_in(policy)] == ["forgotten@api", "forgotten@rack"]


def _gauge(metrics: Metrics) -> dict[str, float]:
    out = {}
    for line in metrics.render().decode().splitlines():
        if line.startswith("strait_deployment_unpriced{"):
            label, value = line.rsplit(" ", 1)
            out[label.split('"')[1]] = float(value)
    return out


def test_unpriced_deployments_are_logged_and_gauged_and_a_reload_updates_both(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics()
    policy = msgspec.yaml.decode(UNPRICED_POLICY, type=PolicySet)
    with caplog.at_level(logging.WARNING, logger="strait.accounting"):
        report_unpriced(policy, metrics)
    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "model 'forgotten' on backend 'api'" in line and "model 'forgotten' on backend 'rack'" in line
    assert "free: true" in line and not any(f"'{name}'" in line for name in ("priced", "embed-only", "own-gpu", "demo"))
    assert _gauge(metrics) == {
        "priced@api": 0,
        "embed-only@api": 0,
        "forgotten@api": 1,
        "forgotten@rack": 1,
        "own-gpu@rack": 0,
        "demo@sim": 0,
    }
    # A reload that prices one and removes the other: the gauge follows, and nothing more is logged.
    fixed = UNPRICED_POLICY.replace(
        "      - {backend: api, upstream_model: f}\n",
        "      - {backend: api, upstream_model: f, price: {per_request: 0.01}}\n",
    ).replace("      - {backend: rack, upstream_model: f, price: {input_per_mtok: 0, output_per_mtok: 0}}\n", "")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="strait.accounting"):
        assert report_unpriced(msgspec.yaml.decode(fixed, type=PolicySet), metrics) == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    gauge = _gauge(metrics)
    assert gauge["forgotten@api"] == 0 and "forgotten@rack" not in gauge


def test_policy_check_reports_an_unpriced_deployment_as_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(UNPRICED_POLICY)
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "policy", "check", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr  # a warning, not an error
    warnings = [line for line in out.stdout.splitlines() if ": warning: " in line]
    assert warnings == [
        f"{path}:13:9: warning: model 'forgotten': deployment on backend 'api' has no price, so its usage would be "
        "charged $0: give it a price (input_per_mtok, output_per_mtok, ...) or say `price: {free: true}`",
        f"{path}:14:51: warning: model 'forgotten': deployment on backend 'rack' has no price, so its usage would be "
        "charged $0: give it a price (input_per_mtok, output_per_mtok, ...) or say `price: {free: true}`",
    ]
    assert out.stdout.splitlines()[-1] == f"{path}: ok"
