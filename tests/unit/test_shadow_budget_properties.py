"""Properties of the shadow spend cap (gateway.stages.shadow_budget), on generated sequences of copies:
admitted when their estimate fits, ended in any order, each costing anything (more or less than estimated).

- Copies one at a time: the day's spend never passes the cap by more than one copy's cost.
- Copies in flight together: it never passes the cap by more than the sum of the copies' overshoots of
  their estimates, and never passes it at all when no copy costs more than its estimate.
- Reservations are always released: with every copy ended, nothing is reserved.
- A day boundary starts the spend from zero (a fake clock; no sleeps)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.stages.shadow_budget import DAY_S, ShadowBudget

costs = st.tuples(st.integers(0, 1_000), st.integers(0, 5_000))  # (estimate, real cost) in µUSD


@settings(max_examples=300, deadline=None)
@given(cap=st.integers(0, 20_000), copies=st.lists(costs, max_size=60))
def test_one_at_a_time_the_spend_passes_the_cap_by_at_most_one_copy(cap: int, copies: list[tuple[int, int]]) -> None:
    budget = ShadowBudget(clock=lambda: 5.0)
    charged = []
    for estimate, cost in copies:
        if budget.reserve("r", cap, estimate):
            budget.settle("r", estimate, cost)
            charged.append(cost)
        assert budget.spent("r") == sum(charged)
        assert budget.spent("r") <= cap + max(charged, default=0)
    assert budget.reserved("r") == 0


@settings(max_examples=300, deadline=None)
@given(
    cap=st.integers(0, 20_000),
    copies=st.lists(costs, max_size=60),
    order=st.lists(st.integers(0, 10**6), max_size=120),
    within_estimate=st.booleans(),
)
def test_in_flight_together_the_overshoot_is_bounded_by_the_copies_overshoots(
    cap: int, copies: list[tuple[int, int]], order: list[int], within_estimate: bool
) -> None:
    if within_estimate:
        copies = [(estimate, min(cost, estimate)) for estimate, cost in copies]
    budget = ShadowBudget(clock=lambda: 5.0)
    in_flight: list[tuple[int, int]] = []
    pending = list(copies)
    overshoot = 0
    steps = iter(order)
    while pending or in_flight:
        step = next(steps, 0)
        # Even steps admit the next copy (while any is left), odd ones end one of those in flight.
        if pending and (step % 2 == 0 or not in_flight):
            estimate, cost = pending.pop(0)
            if budget.reserve("r", cap, estimate):
                in_flight.append((estimate, cost))
        else:
            estimate, cost = in_flight.pop(step // 2 % len(in_flight))
            budget.settle("r", estimate, cost)
            overshoot += max(0, cost - estimate)
        assert budget.spent("r") <= cap + overshoot
        assert budget.spent("r") + budget.reserved("r") <= cap + overshoot
        if within_estimate:
            assert budget.spent("r") <= cap
    assert budget.reserved("r") == 0


@given(cap=st.integers(1, 1_000), estimate=st.integers(1, 1_000))
def test_a_refused_copy_reserves_nothing_and_the_next_day_starts_from_zero(cap: int, estimate: int) -> None:
    now = [DAY_S * 100 + 10.0]
    budget = ShadowBudget(clock=lambda: now[0])
    while budget.reserve("r", cap, estimate):
        budget.settle("r", estimate, estimate)
    spent = budget.spent("r")
    assert spent <= cap < spent + estimate
    assert not budget.reserve("r", cap, estimate) and budget.reserved("r") == 0
    assert budget.spent("other") == 0  # routes are apart
    now[0] = DAY_S * 101 - 0.001
    assert not budget.reserve("r", cap, estimate)
    now[0] = DAY_S * 101
    assert budget.spent("r") == 0
    assert budget.reserve("r", cap, estimate) == (estimate <= cap)


def test_no_cap_admits_everything_and_still_counts_the_spend() -> None:
    budget = ShadowBudget(clock=lambda: 0.0)
    for _ in range(10):
        assert budget.reserve("r", None, 10**9)
        budget.settle("r", 10**9, 3)
    assert budget.spent("r") == 30 and budget.reserved("r") == 0
