"""What a `max_price_per_mtok` ceiling compares: the dearest per-token rate of any kind on the card."""

from __future__ import annotations

import pytest

from gateway.policy.model import Price
from gateway.policy.rates import highest_token_rate

CASES = [
    (Price(input_per_mtok=1.0, output_per_mtok=2.0), 2.0),
    (Price(input_per_mtok=1.0, output_per_mtok=2.0, cached_input_per_mtok=0.1), 2.0),
    (Price(input_per_mtok=1.0, output_per_mtok=2.0, cache_write_per_mtok=3.75), 3.75),
    (Price(input_per_mtok=1.0, output_per_mtok=2.0, reasoning_per_mtok=8.0), 8.0),
    # A per-request fee is not a per-token rate: budgets bound it, not the ceiling.
    (Price(input_per_mtok=1.0, output_per_mtok=2.0, per_request=50.0), 2.0),
    (Price(free=True), 0.0),
]


@pytest.mark.parametrize(("price", "highest"), CASES)
def test_highest_token_rate(price: Price, highest: float) -> None:
    assert highest_token_rate(price) == highest
