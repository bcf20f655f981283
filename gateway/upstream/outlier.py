"""Outlier ejection: which backends (or deployments) are out of routing, and when they come back.

Pure state, the clock passed in (tests drive it). Per key (a backend's name, or a deployment's
`model@backend` label when the caller names it), following Envoy's outlier detection:

- ejected after `consecutive_failures` failures in a row, or when the failure ratio over the last
  `window_s` reaches `error_ratio` with at least `min_requests` attempts in the window;
- the n-th ejection in a row lasts `base_ejection_s` x n, capped at `max_ejection_s` (n goes back to
  zero once the key has stayed healthy for `max_ejection_s` after it came back);
- never more than `max_ejected_share` of the policy's backends ejected at once (at least one may be);
  a backend counts once however many of its keys are out (itself and its deployments' `model@backend`
  keys, which fail together); a refused ejection is counted, the key keeps serving;
- half-open: when the period ends, a key whose backend can be probed for free stays out until a
  probe succeeds (`probe_result`); a failed probe ejects it again for a longer period. Without a probe
  the key comes back when the period ends.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from gateway.policy.model import OutlierPolicy

log = logging.getLogger("strait.upstream")

# Outcomes kept per key for the error-ratio window: enough for any sane min_requests, and bounded.
WINDOW_MAX_SAMPLES = 4096
DEFAULT_POLICY = OutlierPolicy()


@dataclass(slots=True)
class KeyState:
    consecutive: int = 0
    # (time, failed) of recent attempts, oldest first.
    window: deque[tuple[float, bool]] = field(default_factory=lambda: deque(maxlen=WINDOW_MAX_SAMPLES))
    window_failures: int = 0
    # Ejections in a row (the period multiplier) and when the key last came back.
    ejections: int = 0
    readmitted_at: float = -math.inf
    ejected_until: float | None = None
    # Why it was ejected last (for explain and the log).
    reason: str = ""


@dataclass(slots=True)
class Ejection:
    key: str
    until: float
    reason: str


class OutlierTracker:
    def __init__(self) -> None:
        self._state: dict[str, KeyState] = {}
        # Per key: its policy (a deployment key uses its backend's) and whether it can be probed.
        self._policy: dict[str, OutlierPolicy] = {}
        self._probed: set[str] = set()
        self._backends: frozenset[str] = frozenset()
        # Ejected keys, with their end (a half-open key stays here until its probe succeeds).
        self.ejected: dict[str, float] = {}
        self.refused_ejections = 0

    # ---- configuration (each policy load) ----

    def configure(self, policies: dict[str, OutlierPolicy], probed: Iterable[str]) -> None:
        """The policy's backends, their thresholds and which of them can be probed; state of backends
        no longer in the policy is dropped."""
        self._policy = dict(policies)
        self._probed = set(probed)
        self._backends = frozenset(policies)
        for key in [k for k in self._state if self._backend_of(k) not in self._backends]:
            del self._state[key]
            self.ejected.pop(key, None)

    def policy(self, key: str) -> OutlierPolicy:
        return self._policy.get(self._backend_of(key), DEFAULT_POLICY)

    @staticmethod
    def _backend_of(key: str) -> str:
        return key.rpartition("@")[2]

    def probed(self, key: str) -> bool:
        return self._backend_of(key) in self._probed

    # ---- observations ----

    def success(self, key: str, now: float) -> None:
        st = self._state.get(key)
        if st is None:
            st = self._state[key] = KeyState()
        st.consecutive = 0
        self._push(st, self.policy(key), now, failed=False)
        if st.ejections and now - st.readmitted_at >= self.policy(key).max_ejection_s:
            st.ejections = 0

    def failure(self, key: str, now: float) -> Ejection | None:
        """Count a failed attempt; the ejection it caused, if any."""
        st = self._state.get(key)
        if st is None:
            st = self._state[key] = KeyState()
        p = self.policy(key)
        st.consecutive += 1
        self._push(st, p, now, failed=True)
        if key in self.ejected:
            return None  # already out (a request decided before the ejection ended here)
        reason = None
        if p.consecutive_failures and st.consecutive >= p.consecutive_failures:
            reason = f"{st.consecutive} consecutive failures"
        elif (
            p.error_ratio and len(st.window) >= p.min_requests and st.window_failures / len(st.window) >= p.error_ratio
        ):
            reason = f"{st.window_failures} failures in {len(st.window)} attempts over {p.window_s:g} s"
        if reason is None:
            return None
        return self._eject(key, st, p, now, reason)

    def probe_result(self, key: str, ok: bool, now: float) -> Ejection | None:
        """A half-open (or active) probe's answer: back in routing, or ejected again for longer."""
        st = self._state.get(key)
        if st is None:
            st = self._state[key] = KeyState()
        p = self.policy(key)
        if ok:
            if key in self.ejected and self.ejected[key] <= now:
                self._readmit(key, st, now)
            return None
        if key in self.ejected:
            if self.ejected[key] > now:
                return None  # still in its period: nothing new learnt
            return self._eject(key, st, p, now, "health probe failed", force=True)
        # An active check of a healthy key: counted as a failure.
        return self.failure(key, now)

    def _push(self, st: KeyState, p: OutlierPolicy, now: float, *, failed: bool) -> None:
        w = st.window
        if len(w) == w.maxlen and w[0][1]:
            st.window_failures -= 1
        w.append((now, failed))
        st.window_failures += failed
        horizon = now - p.window_s
        while w and w[0][0] < horizon:
            _, old = w.popleft()
            st.window_failures -= old

    def _eject(
        self, key: str, st: KeyState, p: OutlierPolicy, now: float, reason: str, force: bool = False
    ) -> Ejection | None:
        if not force and not self._room(key):
            self.refused_ejections += 1
            log.warning(
                "upstream %s not ejected (%s): %d of %d backends already out (max_ejected_share)",
                key,
                reason,
                len(self._backends_out()),
                len(self._backends),
            )
            return None
        if key not in self.ejected and now - st.readmitted_at >= p.max_ejection_s:
            # Healthy long enough since it last came back: this is a first ejection again. (A failed
            # half-open probe, still ejected, keeps counting up.)
            st.ejections = 0
        st.ejections += 1
        period = min(p.base_ejection_s * st.ejections, p.max_ejection_s)
        until = now + period
        st.ejected_until = until
        st.reason = reason
        st.consecutive = 0
        st.window.clear()
        st.window_failures = 0
        self.ejected[key] = until
        log.warning("upstream %s ejected for %.3g s (%s; ejection %d in a row)", key, period, reason, st.ejections)
        return Ejection(key, until, reason)

    def _readmit(self, key: str, st: KeyState, now: float) -> None:
        del self.ejected[key]
        st.ejected_until = None
        st.readmitted_at = now
        log.warning("upstream %s back in routing", key)

    def _backends_out(self) -> set[str]:
        return {self._backend_of(k) for k in self.ejected}

    def _room(self, key: str) -> bool:
        """Whether `key` may be ejected under the tightest share of the policy: its backend is out
        already (a backend's keys take one place between them), or one more backend may be."""
        total = len(self._backends)
        if total == 0:
            return True
        out = self._backends_out()
        if self._backend_of(key) in out:
            return True
        share = min((self._policy[b].max_ejected_share for b in self._backends), default=1.0)
        allowed = max(1, math.floor(share * total + 1e-9))
        return len(out) + 1 <= allowed

    # ---- reading ----

    def unhealthy(self, now: float) -> frozenset[str]:
        """Keys out of routing now. A key whose period ended comes back here unless it waits for a probe."""
        expired = [k for k, until in self.ejected.items() if until <= now and not self.probed(k)]
        for k in expired:
            self._readmit(k, self._state.setdefault(k, KeyState()), now)
        return frozenset(self.ejected)

    def due_probes(self, now: float) -> list[str]:
        """Ejected keys whose period is over and that wait for a probe."""
        return [k for k, until in self.ejected.items() if until <= now and self.probed(k)]

    def reason(self, key: str) -> str:
        st = self._state.get(key)
        return st.reason if st is not None else ""

    def ejections(self, key: str) -> int:
        st = self._state.get(key)
        return st.ejections if st is not None else 0
