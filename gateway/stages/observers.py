"""What watches the `route` stage's decisions without acting on them: the feature log (a sample of
decided requests as JSON lines, without content, for `strait policy diff`) and the shadow policy (a
candidate policy decided next to the live one on every request, disagreements counted and logged).

Both run on the event loop right after the live decision, so each is cheap: the feature log encodes one
line and appends it with one `os.write` (O_APPEND: lines of several workers never interleave), the
shadow makes one more decision (the engine's cost, tens of µs; loadtest/README.md measures it).
Neither can fail a request: an error in an observer is logged once and the request goes on.
"""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path
from typing import Protocol

import msgspec

from gateway.context import RequestContext
from gateway.errors import GatewayError
from gateway.policy.engine import RequestFeatures, RoutePlan, decide
from gateway.policy.index import PolicyIndex, Principal
from gateway.policy.live import LiveState
from gateway.policy.load import load_policy
from gateway.policy.replay import FeatureLine
from gateway.telemetry import Metrics

log = logging.getLogger("strait.observers")
# The most of a client's own text (the `model` it asked for) a feature line or a log line keeps.
MAX_CLIENT_TEXT = 200


class DecisionObserver(Protocol):
    def observe(
        self, ctx: RequestContext, features: RequestFeatures, live: LiveState, plan: RoutePlan | GatewayError
    ) -> None: ...


def _choice(plan: RoutePlan | GatewayError) -> str | None:
    """The first choice's label, or None for a refusal."""
    if isinstance(plan, GatewayError):
        return None
    return plan.targets[0].label if plan.targets else None


def _refusal(plan: RoutePlan | GatewayError) -> str:
    if isinstance(plan, GatewayError):
        return f"refused {plan.status} {plan.code or ''}".rstrip()
    return plan.targets[0].label if plan.targets else "refused (empty plan)"


def rule_headers(index: PolicyIndex) -> frozenset[str]:
    """The request headers the policy's rules read (lower-cased): the only headers a feature line keeps."""
    return frozenset(r.when.header.name.lower() for r in index.policy.rules if r.when.header is not None)


class FeatureLogFile:
    """The feature log's file, opened once per process (it outlives policy reloads)."""

    def __init__(self, path: str, sample: float) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self.sample = sample
        self._encode = msgspec.json.Encoder().encode
        self._failed = False

    def write(self, line: FeatureLine) -> None:
        try:
            os.write(self.fd, self._encode(line) + b"\n")
        except OSError as exc:  # a full disk must not fail requests; said once
            if not self._failed:
                self._failed = True
                log.error("feature log: cannot write (%s); lines are dropped until it works again", exc)
        else:
            self._failed = False

    def close(self) -> None:
        os.close(self.fd)


class FeatureLog:
    """Writes one `FeatureLine` per sampled decision: tenant, route, operation, sizes, capabilities,
    narrowing, the headers this policy's rules read, the ingress region, and the live choice. Never prompt
    or answer text."""

    def __init__(self, out: FeatureLogFile, index: PolicyIndex) -> None:
        self.out = out
        self.headers = rule_headers(index)

    def observe(
        self, ctx: RequestContext, features: RequestFeatures, live: LiveState, plan: RoutePlan | GatewayError
    ) -> None:
        sample = self.out.sample
        if sample < 1.0 and random.random() >= sample:
            return
        self.out.write(
            FeatureLine(
                ts=time.time(),
                # A route the policy does not know is the client's text: kept, bounded.
                route=features.route[:MAX_CLIENT_TEXT],
                tenant=ctx.principal.tenant if ctx.principal is not None else None,
                operation=features.operation,
                prompt_tokens=features.prompt_tokens,
                max_tokens=features.max_tokens,
                needs=tuple(sorted(features.needs)),
                preferences=features.preferences,
                headers={h: v for h in self.headers if (v := features.headers.get(h)) is not None},
                deployment=_choice(plan),
                sample=sample,
                ingress_region=features.ingress_region,
            )
        )


class ShadowPolicy:
    """A candidate policy decided next to the live one on every request, never acted on: its decisions
    only count (`strait_shadow_decisions_total{result="agree"|"disagree"}`) and, for disagreements, log
    a line (at most `log_per_s` a second, plus a burst; the rest counted in the next line)."""

    def __init__(self, path: str, metrics: Metrics, *, log_per_s: float = 1.0, burst: int = 10) -> None:
        self.path = path
        self.metrics = metrics
        self.index = PolicyIndex(load_policy(path))
        self._principals: dict[str, Principal] = {}
        self.log_per_s = log_per_s
        self.burst = float(burst)
        self._tokens = float(burst)
        self._last = time.monotonic()
        self._suppressed = 0
        self._errors = 0

    def replace(self, index: PolicyIndex) -> None:
        """A reloaded candidate policy (the reloader checks it off the event loop)."""
        self.index = index
        self._principals = {}

    def _principal(self, tenant: str) -> Principal:
        found = self._principals.get(tenant)
        if found is None:
            t = self.index.tenants.get(tenant)
            allowed = None if t is None or "*" in t.allowed_routes else frozenset(t.allowed_routes)
            found = Principal(tenant=tenant, key_id="shadow", allowed_routes=allowed)
            if len(self._principals) < 100_000:  # bounded: tenants come from the live policy
                self._principals[tenant] = found
        return found

    def observe(
        self, ctx: RequestContext, features: RequestFeatures, live: LiveState, plan: RoutePlan | GatewayError
    ) -> None:
        if ctx.principal is None:
            return
        try:
            shadow: RoutePlan | GatewayError = decide(
                self.index, self._principal(ctx.principal.tenant), features, live, decision_id="shadow", downgrade=False
            )
        except GatewayError as exc:
            shadow = exc
        live_choice, shadow_choice = _refusal(plan), _refusal(shadow)
        agree = live_choice == shadow_choice
        self.metrics.child(self.metrics.shadow_decisions, "agree" if agree else "disagree").inc()
        if not agree:
            self._log(ctx, features.route, live_choice, shadow_choice)

    def _log(self, ctx: RequestContext, route: str, live_choice: str, shadow_choice: str) -> None:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.log_per_s)
        self._last = now
        if self._tokens < 1.0:
            self._suppressed += 1
            return
        self._tokens -= 1.0
        more = f" ({self._suppressed} more disagreements not logged)" if self._suppressed else ""
        self._suppressed = 0
        tenant = ctx.principal.tenant if ctx.principal is not None else "-"
        log.warning(
            "shadow policy disagrees: request %s tenant %s route %s: live %s, shadow %s%s",
            ctx.request_id,
            tenant,
            route[:MAX_CLIENT_TEXT],
            live_choice,
            shadow_choice,
            more,
        )
