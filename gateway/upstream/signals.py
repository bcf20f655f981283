"""Live signals the engine ranks with: in-flight requests per backend and latency EWMAs per deployment.

Updated by the dispatcher as attempts start and end (no I/O of their own). Engine metrics scraped
from vLLM/SGLang/TGI/llama.cpp feed `utilisation` when that arrives.
"""

from __future__ import annotations

from gateway.policy.engine import LiveState

# Weight of the newest sample in the latency EWMA.
ALPHA = 0.2
# Consecutive connection failures after which a backend is ejected, and for how long (seconds).
EJECT_AFTER = 5
EJECT_FOR_S = 10.0


class LiveSignals:
    def __init__(self) -> None:
        self.in_flight: dict[str, int] = {}
        self.latency_ms: dict[str, float] = {}
        self.utilisation: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._ejected_until: dict[str, float] = {}
        self._state = LiveState(latency_ms=self.latency_ms, in_flight=self.in_flight, utilisation=self.utilisation)

    def snapshot(self, now: float) -> LiveState:
        """The live state for one decision. Shares the dicts (no copy on the hot path) unless a backend is ejected."""
        if not self._ejected_until:
            return self._state
        unhealthy = frozenset(b for b, until in self._ejected_until.items() if until > now)
        if len(unhealthy) < len(self._ejected_until):
            self._ejected_until = {b: u for b, u in self._ejected_until.items() if u > now}
        return LiveState(
            unhealthy=unhealthy, latency_ms=self.latency_ms, in_flight=self.in_flight, utilisation=self.utilisation
        )

    def started(self, backend: str) -> None:
        self.in_flight[backend] = self.in_flight.get(backend, 0) + 1

    def finished(self, backend: str) -> None:
        self.in_flight[backend] = max(0, self.in_flight.get(backend, 1) - 1)

    def answered(self, backend: str, label: str, seconds: float) -> None:
        """The upstream answered (its head arrived) after `seconds`."""
        ms = seconds * 1000.0
        old = self.latency_ms.get(label)
        self.latency_ms[label] = ms if old is None else old + ALPHA * (ms - old)
        self._failures.pop(backend, None)

    def failed(self, backend: str, now: float) -> None:
        n = self._failures.get(backend, 0) + 1
        self._failures[backend] = n
        if n >= EJECT_AFTER:
            self._ejected_until[backend] = now + EJECT_FOR_S
            self._failures[backend] = 0
