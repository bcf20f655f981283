"""A small circuit breaker in front of the shared store.

After `failures` consecutive failed calls it opens: calls are skipped (a dead Redis then costs ~0 per
request instead of a timeout each) until `cooldown_s` has passed. Then exactly one call is let through
as a probe (half-open); its success closes the breaker, its failure re-opens it for another cool-down.
Callers must report every outcome, including errors they handle themselves (a breaker fed only by
unhandled exceptions never opens: LiteLLM #34299).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec

from gateway.state.base import BreakerState


class BreakerConfig(msgspec.Struct, frozen=True, kw_only=True):
    failures: int = 3
    cooldown_s: float = 2.0


_DEFAULT = BreakerConfig()


class Breaker:
    __slots__ = ("_config", "_failures", "_monotonic", "_opened_at", "_probing", "_state")

    def __init__(self, config: BreakerConfig = _DEFAULT, *, monotonic: Callable[[], float] = time.monotonic):
        self._config = config
        self._monotonic = monotonic
        self._state: BreakerState = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> BreakerState:
        return self._state

    def allow(self) -> bool:
        """Whether to call the store now. A True in half-open state makes the caller the probe."""
        if self._state == "closed":
            return True
        if self._state == "open":
            if self._monotonic() - self._opened_at < self._config.cooldown_s:
                return False
            self._state = "half-open"
        if self._probing:
            return False
        self._probing = True
        return True

    def success(self) -> None:
        self._failures = 0
        self._probing = False
        self._state = "closed"

    def failure(self) -> bool:
        """Record a failed call; True when this failure opened (or re-opened) the breaker."""
        self._probing = False
        self._failures += 1
        if self._state == "half-open" or (self._state == "closed" and self._failures >= self._config.failures):
            self._state = "open"
            self._opened_at = self._monotonic()
            return True
        return False

    def abandon(self) -> None:
        """The call was cancelled before an outcome: free the probe slot without judging the store."""
        self._probing = False
