"""GCRA, the pure reference: the memory store runs it, `lua/admit.lua` mirrors it line for line.

GCRA keeps one "theoretical arrival time" per key; a request is admitted if advancing it by the
request's cost would not push it more than one full capacity ahead of now. We keep the same state
scaled to integers so Python and Lua (whose numbers are doubles) compute bit-identical answers:

    debt  = (TAT - at) * limit         in ms x limit; one unit of cost adds `period_ms`
    drain = elapsed_ms * limit         a full bucket (debt 0) holds `capacity * period_ms`

so `debt / period_ms` is the number of units still outstanding, independent of the limit (changing a
limit live keeps what was spent). All values stay below 2**52 (checked on `RateLimit`), and every
division rounds the same way in both languages. Accuracy: exact; no interval of length W admits more
than `capacity + limit * W / period` units, and a burst of N at once against an idle key admits exactly
`capacity`.
"""

from __future__ import annotations

import msgspec


class GcraState(msgspec.Struct, frozen=True, gc=False):
    debt: int
    at_ms: int


class GcraDecision(msgspec.Struct, frozen=True, gc=False):
    allowed: bool
    # False when the cost alone exceeds the capacity: waiting will never help.
    fits: bool
    remaining: int
    reset_ms: int
    retry_after_ms: int
    # The state to store when the whole admission is allowed (None: unchanged).
    new_state: GcraState | None


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def debt_at(state: GcraState | None, now_ms: int, limit: int) -> int:
    """Outstanding debt at `now_ms` (a clock behind `at_ms` sees more debt, exactly as GCRA's TAT would)."""
    if state is None:
        return 0
    return max(0, state.debt - (now_ms - state.at_ms) * limit)


def decide(
    state: GcraState | None, now_ms: int, cost: int, *, limit: int, period_ms: int, capacity: int
) -> GcraDecision:
    debt = debt_at(state, now_ms, limit)
    cap = capacity * period_ms
    want = debt + cost * period_ms
    if want <= cap:
        new_state = GcraState(want, now_ms) if cost else None
        return GcraDecision(
            allowed=True,
            fits=True,
            remaining=(cap - want) // period_ms,
            reset_ms=_ceil_div(want, limit),
            retry_after_ms=0,
            new_state=new_state,
        )
    fits = cost * period_ms <= cap
    return GcraDecision(
        allowed=False,
        fits=fits,
        remaining=max(0, (cap - debt) // period_ms),
        reset_ms=_ceil_div(debt, limit),
        retry_after_ms=_ceil_div(want - cap, limit) if fits else 0,
        new_state=None,
    )


def adjust(state: GcraState | None, now_ms: int, delta: int, *, limit: int, period_ms: int) -> GcraState | None:
    """Add (or, negative, refund) `delta` units at `now_ms`; None when the bucket ends up full."""
    debt = max(0, debt_at(state, now_ms, limit) + delta * period_ms)
    return GcraState(debt, now_ms) if debt else None


def ttl_ms(state: GcraState, limit: int, min_ttl_ms: int) -> int:
    """How long the state matters: until the bucket is full again, plus a floor (never under 1 s)."""
    return _ceil_div(state.debt, limit) + min_ttl_ms
