"""Rate cards: a deployment's `price` (gateway.policy.model.Price) turned into exact integer rates, and
which deployments have no price at all. Pure (no I/O): the accounting stage prices usage with it, the
policy checks and the runtime report unpriced deployments with it.

Exact arithmetic: a price in USD per million tokens is micro-USD per token. Each rate is held as an
integer number of femto-USD (1e-15 USD, 1e-9 micro-USD) per token, read from the decimal the policy
wrote (`0.15` is 0.15, not the binary float nearest to it), so a cost is a sum of integer products,
rounded once to whole micro-USD, half to even (as Python's `round`). The sum of float products Strait
computed before could land one micro-USD off at a tie; otherwise the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from functools import lru_cache
from typing import Final

from gateway.policy.model import Model, PolicySet, Price

# femto-USD per micro-USD, and per USD.
FEMTO_PER_MICRO: Final = 10**9
FEMTO_PER_USD: Final = 10**15
_HALF_MICRO: Final = FEMTO_PER_MICRO // 2


def _femto(usd: float, scale: int) -> int:
    """`usd` x `scale` as an integer, from the shortest decimal that reads back as the float (what the
    policy file said), rounded half to even past 1e-9 micro-USD per token."""
    return int((Decimal(repr(usd)) * scale).to_integral_value(ROUND_HALF_EVEN))


@dataclass(frozen=True, slots=True)
class RateCard:
    """Femto-USD per token of each kind, and per request."""

    input: int
    cached_input: int
    cache_write: int
    output: int
    reasoning: int
    per_request: int

    def micro_usd(self, prompt: int, cached: int, cache_write: int, completion: int, reasoning: int) -> int:
        """The cost in whole micro-USD of one attempt. `cached` (read from the provider's prompt cache) and
        `cache_write` (written to it) are parts of `prompt`; `reasoning` is a part of `completion`. An
        attempt charged no token is charged no request fee either (it failed before the provider did any
        work)."""
        # Plain comparisons, not min()/max() calls: this runs for every usage record (a few times faster).
        if prompt <= 0:
            if completion <= 0:
                return 0
            prompt = 0
        if cached > prompt:
            cached = prompt
        elif cached < 0:
            cached = 0
        uncached = prompt - cached
        if cache_write > uncached:
            cache_write = uncached
        elif cache_write < 0:
            cache_write = 0
        if completion < 0:
            completion = 0
        if reasoning > completion:
            reasoning = completion
        elif reasoning < 0:
            reasoning = 0
        femto = (
            (uncached - cache_write) * self.input
            + cached * self.cached_input
            + cache_write * self.cache_write
            + (completion - reasoning) * self.output
            + reasoning * self.reasoning
            + self.per_request
        )
        micro, rest = divmod(femto, FEMTO_PER_MICRO)
        if rest > _HALF_MICRO or (rest == _HALF_MICRO and micro & 1):
            micro += 1
        return micro

    def worst_micro_usd(self, prompt: int, completion: int) -> int:
        """The most `prompt` and `completion` tokens could cost however they split into kinds (what a budget
        reserves before the answer says)."""
        top_in = max(self.input, self.cached_input, self.cache_write)
        top_out = max(self.output, self.reasoning)
        # Rounded up: a reservation is never below what the answer can cost.
        return -(-(prompt * top_in + completion * top_out + self.per_request) // FEMTO_PER_MICRO)


ZERO_RATES: Final = RateCard(input=0, cached_input=0, cache_write=0, output=0, reasoning=0, per_request=0)


@lru_cache(maxsize=4096)
def rate_card(price: Price) -> RateCard:
    """The exact rates of a price (cached: a policy holds few distinct prices, each read per request)."""
    per_token = FEMTO_PER_MICRO  # USD per million tokens = micro-USD per token
    input_ = _femto(price.input_per_mtok, per_token)
    output = _femto(price.output_per_mtok, per_token)

    def or_else(rate: float | None, default: int) -> int:
        return default if rate is None else _femto(rate, per_token)

    return RateCard(
        input=input_,
        cached_input=or_else(price.cached_input_per_mtok, input_),
        cache_write=or_else(price.cache_write_per_mtok, input_),
        output=output,
        reasoning=or_else(price.reasoning_per_mtok, output),
        per_request=_femto(price.per_request, FEMTO_PER_USD),
    )


def highest_token_rate(price: Price) -> float:
    """What a `max_price_per_mtok` ceiling is compared with: the dearest USD per million tokens the
    deployment can charge, any kind (input, output, cache read, cache write, reasoning; unset kinds at the
    price they fall back to). A per-request fee is not per token: budgets bound it, not this ceiling."""
    rates = [price.input_per_mtok, price.output_per_mtok]
    rates += [r for r in (price.cached_input_per_mtok, price.cache_write_per_mtok, price.reasoning_per_mtok) if r]
    return max(rates)


def charges_nothing(price: Price) -> bool:
    """Every rate and fee of the price is zero (or unset)."""
    return not any(
        (
            price.input_per_mtok,
            price.output_per_mtok,
            price.cached_input_per_mtok,
            price.cache_write_per_mtok,
            price.reasoning_per_mtok,
            price.per_request,
        )
    )


@dataclass(frozen=True, slots=True)
class Unpriced:
    """A deployment whose usage would be charged $0 without anyone having said so."""

    model: str
    backend: str
    # Where it is in its policy file: models[model_index].deployments[deployment_index].
    model_index: int
    deployment_index: int

    @property
    def deployment(self) -> str:
        """`model@backend`, the deployment label of usage records and metrics."""
        return f"{self.model}@{self.backend}"


def unpriced_deployments(models: tuple[Model, ...], charging_backends: frozenset[str]) -> list[Unpriced]:
    """Deployments that charge nothing and do not say `free: true`, on the backends named in
    `charging_backends` (every backend but the `simulated` ones, whose answers cost nothing by nature)."""
    return [
        Unpriced(m.name, d.backend, i, j)
        for i, m in enumerate(models)
        for j, d in enumerate(m.deployments)
        if d.backend in charging_backends and not d.price.free and charges_nothing(d.price)
    ]


def charging_backends(policy: PolicySet) -> frozenset[str]:
    """The backends whose deployments must have a price: all but the `simulated` ones."""
    return frozenset(b.name for b in policy.backends if b.adapter != "simulated")


def unpriced_in(policy: PolicySet) -> list[Unpriced]:
    """`unpriced_deployments` over a whole (merged) policy."""
    return unpriced_deployments(policy.models, charging_backends(policy))
