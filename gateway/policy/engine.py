"""The routing engine: pure, no I/O. `decide(index, principal, features, live) -> RoutePlan`.

1. Filter every (model, deployment) candidate of the route by hard constraints (compliance, the
   capabilities the request uses, context window, price ceiling, health), recording a reason for
   each exclusion. Compliance is evaluated once per (tenant, route) and memoised on the index.
2. Rank the survivors by the route's objective with the live signals given (latency EWMA,
   utilisation); the ordered survivors are the fallback plan. Fallbacks and spillover come from the
   same filtered list, so they never leave the compliance envelope: when nothing survives the
   request is refused (403 policy_violation) with every reason, never sent somewhere else.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import msgspec

from gateway.contracts import Operation
from gateway.errors import AuthenticationFailed, InvalidRequest, ModelNotFound, PermissionDenied
from gateway.policy.index import PolicyIndex, Principal, Target
from gateway.policy.model import Compliance, Constraints, Objective, Route, Rule, Tenant, Weights
from gateway.policy.places import BLOCS, expand

# Output tokens assumed for cost ranking when the request sets no max_tokens.
DEFAULT_OUTPUT_TOKENS: Final = 256
# Latency assumed for a deployment with no measurement yet, by tier (ms): a cold start still ranks sensibly.
LATENCY_PRIOR_MS: Final[dict[str, float]] = {"edge": 150.0, "self-hosted": 300.0, "provider": 600.0}


class Preferences(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a client may ask per request (header `x-strait-policy` or body `strait`); it only narrows."""

    objective: Objective | None = None
    max_price_per_mtok: float | None = None
    jurisdictions: tuple[str, ...] | None = None
    origins: tuple[str, ...] | None = None
    # Model names of the route, most preferred first.
    order: tuple[str, ...] | None = None


class LiveState(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of live signals, by backend name (latency also by `model@backend`)."""

    unhealthy: frozenset[str] = frozenset()
    latency_ms: Mapping[str, float] = {}
    in_flight: Mapping[str, int] = {}
    utilisation: Mapping[str, float] = {}


EMPTY_LIVE: Final = LiveState()


class RequestFeatures(msgspec.Struct, frozen=True, kw_only=True):
    """What the engine needs to know about one request."""

    route: str
    operation: Operation = "chat"
    prompt_tokens: int = 0
    max_tokens: int | None = None
    # Capabilities the request uses beyond its operation: tools, vision, json.
    needs: frozenset[str] = frozenset()
    headers: Mapping[str, str] = {}
    now: dt.datetime | None = None
    preferences: Preferences | None = None


class Row(msgspec.Struct, frozen=True, kw_only=True):
    """One candidate in the decision table."""

    deployment: str
    model: str
    backend: str
    tier: str
    excluded: str | None = None
    est_cost_usd: float | None = None
    latency_ms: float | None = None
    utilisation: float | None = None
    score: float | None = None
    rank: int | None = None


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    policy_version: str
    tenant: str
    requested_route: str
    route: str
    objective: Objective
    rules: tuple[str, ...]
    rows: tuple[Row, ...]
    plan: tuple[str, ...]


# ---------------------------------------------------------------------------------------------------------------
# Static (per tenant and route) compliance, memoised on the index.


def _denied_place(what: str, place: str, denied: tuple[str, ...]) -> str | None:
    """Fail closed against a deny-list: a listed place, an unknown one, or a bloc with a listed member."""
    if not denied:
        return None
    if not place:
        return f"{what} unknown (it may be a denied one)"
    listed = expand(denied)
    if place in listed:
        return f"{what} {place} is denied"
    overlap = sorted(BLOCS.get(place, frozenset()) & listed)
    if overlap:
        return f"{what} {place} may be in denied {overlap}"
    return None


def _names(values: tuple[str, ...]) -> frozenset[str]:
    return frozenset(v.lower() for v in values)


def compliance_reason(target: Target, c: Compliance) -> str | None:
    """Why `target` is outside the compliance envelope `c`, or None. Unknown attributes fail closed:
    against allow-lists, deny-lists and maximums alike. Developer and operator names ignore case."""
    h = target.backend.hosting
    juris = (h.jurisdiction or "").upper()
    origin = target.model.origin
    country = ((origin.country if origin else None) or "").upper()
    developer = (origin.developer if origin else None) or ""
    dev = developer.lower()
    if c.allowed_jurisdictions is not None and (not juris or juris not in expand(c.allowed_jurisdictions)):
        return f"hosting jurisdiction {juris or 'unknown'} is not in the allowed {list(c.allowed_jurisdictions)}"
    reason = _denied_place("hosting jurisdiction", juris, c.denied_jurisdictions)
    if reason:
        return reason
    if c.allowed_origin_countries is not None and (not country or country not in expand(c.allowed_origin_countries)):
        return f"model origin {country or 'unknown'} is not in the allowed {list(c.allowed_origin_countries)}"
    reason = _denied_place("model origin", country, c.denied_origin_countries)
    if reason:
        return reason
    if c.allowed_developers is not None and dev not in _names(c.allowed_developers):
        return f"model developer {developer or 'unknown'} is not allowed"
    if c.denied_developers and (not dev or dev in _names(c.denied_developers)):
        return f"model developer {developer} is denied" if dev else "model developer unknown (it may be a denied one)"
    if c.allowed_tiers is not None and target.backend.tier not in c.allowed_tiers:
        return f"tier {target.backend.tier} is not allowed"
    if c.max_retention_days is not None and (h.retention_days is None or h.retention_days > c.max_retention_days):
        kept = "unknown" if h.retention_days is None else f"{h.retention_days} days"
        return f"retention {kept} exceeds the allowed {c.max_retention_days} days"
    if c.no_training and h.trains_on_data:
        return "the operator trains on request data"
    missing = [cert for cert in c.required_certifications if cert not in h.certifications]
    if missing:
        return f"missing certifications {missing}"
    for rule in c.origin_rules:
        # A model of unknown origin could be of any origin: every origin rule applies to it.
        unknown = not country and not dev
        if not (unknown or country in expand(rule.origin_countries) or dev in _names(rule.developers)):
            continue
        label = country or developer or "unknown"
        if rule.allowed_tiers is not None and target.backend.tier not in rule.allowed_tiers:
            return f"{label}-origin models may run only on tiers {list(rule.allowed_tiers)}"
        if rule.allowed_jurisdictions is not None and (not juris or juris not in expand(rule.allowed_jurisdictions)):
            return f"{label}-origin models may run only in {list(rule.allowed_jurisdictions)}"
        if rule.deny_developer_operated and h.operator and h.operator.lower() == dev:
            return f"{label}-origin models may not run on their developer's own service"
    return None


def _candidates(index: PolicyIndex, route: Route, operation: Operation) -> tuple[Target, ...]:
    """The route's own targets, then its fallback routes', each deployment once (first place wins)."""
    seen: set[str] = set()
    out: list[Target] = []
    for name in (route.name, *route.fallback):
        for t in index.targets[(name, operation)]:
            if t.label not in seen:
                seen.add(t.label)
                out.append(t)
    return tuple(out)


def static_rows(
    index: PolicyIndex, tenant: Tenant, route: Route, operation: Operation
) -> tuple[tuple[Target, str | None], ...]:
    """(target, compliance exclusion) for every candidate; computed once per policy, tenant, route, operation."""
    key = (tenant.name, route.name, operation)
    cached = index.memo.get(key)
    if cached is None:
        cached = tuple((t, compliance_reason(t, tenant.compliance)) for t in _candidates(index, route, operation))
        index.memo[key] = cached
    return cached


# ---------------------------------------------------------------------------------------------------------------
# Rules and per-request preferences.


def _minutes(hhmm: str) -> int:
    hours, _, minutes = hhmm.partition(":")
    return int(hours) * 60 + int(minutes)


def _in_window(now: dt.datetime, start: str, end: str, tz: str) -> bool:
    local = now.astimezone(zoneinfo.ZoneInfo(tz))
    m = local.hour * 60 + local.minute
    a, b = _minutes(start), _minutes(end)
    return a <= m < b if a <= b else (m >= a or m < b)


def rule_matches(rule: Rule, tenant: str, route: str, f: RequestFeatures) -> bool:
    w = rule.when
    if w.tenants is not None and tenant not in w.tenants:
        return False
    if w.routes is not None and route not in w.routes:
        return False
    if w.header is not None:
        value = f.headers.get(w.header.name.lower())
        if value is None:
            return False
        if w.header.equals is not None and value != w.header.equals:
            return False
        if w.header.one_of is not None and value not in w.header.one_of:
            return False
    if w.min_prompt_tokens is not None and f.prompt_tokens < w.min_prompt_tokens:
        return False
    if w.max_prompt_tokens is not None and f.prompt_tokens > w.max_prompt_tokens:
        return False
    if w.time_of_day is not None:
        now = f.now or dt.datetime.now(dt.UTC)
        if not _in_window(now, w.time_of_day.start, w.time_of_day.end, w.time_of_day.tz):
            return False
    return True


def check_preferences(p: Preferences, tenant: Tenant, route: Route, index: PolicyIndex) -> None:
    """Refuse (403) a preference that would widen the tenant's envelope; 400 for one that names nothing real."""
    c = tenant.compliance
    if p.jurisdictions is not None:
        asked = expand(p.jurisdictions)
        if c.allowed_jurisdictions is not None:
            outside = sorted(asked - expand(c.allowed_jurisdictions))
            if outside:
                raise PermissionDenied(
                    f"Your policy preferences ask for jurisdictions {outside}, outside what your tenant allows.",
                    param="strait.jurisdictions",
                )
    if p.origins is not None:
        asked = expand(p.origins)
        if c.allowed_origin_countries is not None:
            outside = sorted(asked - expand(c.allowed_origin_countries))
            if outside:
                raise PermissionDenied(
                    f"Your policy preferences ask for model origins {outside}, outside what your tenant allows.",
                    param="strait.origins",
                )
    if p.order is not None:
        unknown = [
            m for m in p.order if m not in route.models and not any(m in index.routes[f].models for f in route.fallback)
        ]
        if unknown:
            raise InvalidRequest(
                f"strait.order names models that are not candidates of '{route.name}': {unknown}", param="strait.order"
            )
    if p.max_price_per_mtok is not None and p.max_price_per_mtok < 0:
        raise InvalidRequest("strait.max_price_per_mtok must not be negative.", param="strait.max_price_per_mtok")


def _narrowing_reason(t: Target, extra: list[Constraints], p: Preferences | None) -> str | None:
    juris = (t.backend.hosting.jurisdiction or "").upper()
    origin = t.model.origin
    country = ((origin.country if origin else None) or "").upper()
    price = t.deployment.price
    for c in extra:
        if c.allowed_jurisdictions is not None and juris not in expand(c.allowed_jurisdictions):
            return f"a rule allows only jurisdictions {list(c.allowed_jurisdictions)}"
        if c.allowed_origin_countries is not None and country not in expand(c.allowed_origin_countries):
            return f"a rule allows only model origins {list(c.allowed_origin_countries)}"
        if c.allowed_tiers is not None and t.backend.tier not in c.allowed_tiers:
            return f"a rule allows only tiers {list(c.allowed_tiers)}"
        if c.max_price_per_mtok is not None and max(price.input_per_mtok, price.output_per_mtok) > c.max_price_per_mtok:
            return f"price above the rule's ceiling of {c.max_price_per_mtok} USD per million tokens"
    if p is not None:
        if p.jurisdictions is not None and juris not in expand(p.jurisdictions):
            return f"you asked for jurisdictions {list(p.jurisdictions)}"
        if p.origins is not None and country not in expand(p.origins):
            return f"you asked for model origins {list(p.origins)}"
        if p.max_price_per_mtok is not None and max(price.input_per_mtok, price.output_per_mtok) > p.max_price_per_mtok:
            return f"price above your ceiling of {p.max_price_per_mtok} USD per million tokens"
    return None


CONTEXT_PREFIX: Final = "context window is "


# ---------------------------------------------------------------------------------------------------------------
# The decision.


def _utilisation(t: Target, live: LiveState) -> float:
    u = live.utilisation.get(t.backend.name)
    if u is not None:
        return u
    cap = t.backend.capacity.max_concurrency
    flying = live.in_flight.get(t.backend.name)
    if cap and flying is not None:
        return flying / cap
    return 0.0


def _latency(t: Target, live: LiveState) -> float:
    measured = live.latency_ms.get(t.label)
    if measured is None:
        measured = live.latency_ms.get(t.backend.name)
    return measured if measured is not None else LATENCY_PRIOR_MS.get(t.backend.tier, 600.0)


def _cost(t: Target, prompt_tokens: int, out_tokens: int) -> float:
    price = t.deployment.price
    return (prompt_tokens * price.input_per_mtok + out_tokens * price.output_per_mtok) / 1e6


class RoutePlan:
    """The ordered targets, and the decision table, built only when asked for (explain, refusals):
    the hot path pays for ranking, not for rendering."""

    __slots__ = ("_decision", "_facts", "route", "targets")

    def __init__(self, route: Route, targets: tuple[Target, ...], facts: _Facts) -> None:
        self.route = route
        self.targets = targets
        self._facts = facts
        self._decision: Decision | None = None

    @property
    def decision(self) -> Decision:
        if self._decision is None:
            self._decision = self._facts.decision(self.route, self.targets)
        return self._decision


@dataclass(frozen=True, slots=True)
class _Facts:
    decision_id: str
    policy_version: str
    tenant: str
    requested: str
    objective: Objective
    rules: tuple[str, ...]
    # Every candidate in table order: (target, exclusion reason or None, score or None, rank or None).
    rows: tuple[tuple[Target, str | None, float | None, int | None], ...]
    prompt_tokens: int
    out_tokens: int
    live: LiveState

    def decision(self, route: Route, plan: tuple[Target, ...]) -> Decision:
        rows = []
        for target, reason, score, rank in self.rows:
            cost = _cost(target, self.prompt_tokens, self.out_tokens)
            rows.append(
                Row(
                    deployment=target.label,
                    model=target.model.name,
                    backend=target.backend.name,
                    tier=target.backend.tier,
                    excluded=reason,
                    est_cost_usd=round(cost, 8),
                    latency_ms=None if reason else round(_latency(target, self.live), 3),
                    utilisation=None if reason else round(_utilisation(target, self.live), 4),
                    score=None if score is None else round(score, 6),
                    rank=rank,
                )
            )
        return Decision(
            id=self.decision_id,
            policy_version=self.policy_version,
            tenant=self.tenant,
            requested_route=self.requested,
            route=route.name,
            objective=self.objective,
            rules=self.rules,
            rows=tuple(rows),
            plan=tuple(t.label for t in plan),
        )


def decide(
    index: PolicyIndex,
    principal: Principal,
    features: RequestFeatures,
    live: LiveState = EMPTY_LIVE,
    *,
    decision_id: str = "",
) -> RoutePlan:
    tenant = index.tenants.get(principal.tenant)
    if tenant is None:
        if principal.tenant != index.open_tenant.name:
            # A key whose tenant this policy does not know: refuse rather than run unconstrained.
            raise AuthenticationFailed("Your API key's tenant is not in the policy in force.")
        tenant = index.open_tenant
    requested = features.route
    route_name = requested
    route = index.routes.get(route_name)
    if route is None or not principal.may_use(route_name):
        raise ModelNotFound(f"The model '{requested}' does not exist or you do not have access to it.", param="model")
    objective: Objective = route.objective
    weights: Weights = route.weights
    extra: list[Constraints] = []
    applied: list[str] = []
    for rule in index.policy.rules:
        if not rule_matches(rule, tenant.name, route_name, features):
            continue
        then = rule.then
        note = ""
        if then.route is not None and then.route != route_name:
            rewritten = index.routes.get(then.route)
            if rewritten is not None and principal.may_use(then.route):
                route_name, route = then.route, rewritten
                objective, weights = route.objective, route.weights
            else:
                note = f" (rewrite to {then.route!r} not allowed for this key)"
        applied.append(rule.name + note)
        if then.objective is not None:
            objective = then.objective
        if then.weights is not None:
            weights = then.weights
        if then.constraints is not None:
            extra.append(then.constraints)
    prefs = features.preferences
    if prefs is not None:
        check_preferences(prefs, tenant, route, index)
        if prefs.objective is not None:
            objective = prefs.objective
    rows = static_rows(index, tenant, route, features.operation)
    if not rows:
        raise InvalidRequest(
            f"The model '{route.name}' does not support {features.operation}.",
            param="model",
            code="unsupported_operation",
        )
    narrowing = bool(extra) or prefs is not None
    needs = features.needs
    needed_context = features.prompt_tokens + (features.max_tokens or 0)
    unhealthy = live.unhealthy
    verdicts: list[tuple[Target, str | None]] = []
    survivors: list[tuple[int, Target]] = []
    for position, (target, reason) in enumerate(rows):
        if reason is None:
            if narrowing:
                reason = _narrowing_reason(target, extra, prefs)
            if reason is None:
                if needs and not needs <= target.capabilities:
                    reason = f"model lacks {', '.join(sorted(needs - target.capabilities))}"
                elif target.model.context_window is not None and needed_context > target.model.context_window:
                    reason = f"{CONTEXT_PREFIX}{target.model.context_window} tokens, the request needs {needed_context}"
                elif unhealthy and target.backend.name in unhealthy:
                    reason = "backend is ejected (unhealthy)"
        verdicts.append((target, reason))
        if reason is None:
            survivors.append((position, target))
    out_tokens = features.max_tokens or DEFAULT_OUTPUT_TOKENS
    if not survivors:
        _refuse(route, rows, verdicts, features)
    own = len({t.label for t in index.targets[(route.name, features.operation)]})
    ranked = _rank(survivors, route, objective, weights, features, out_tokens, live, prefs, own)
    rank_of = {id(target): (score, rank) for rank, (score, target) in enumerate(ranked, start=1)}
    table = tuple((t, r, *rank_of.get(id(t), (None, None))) for t, r in verdicts)
    facts = _Facts(
        decision_id=decision_id,
        policy_version=index.version,
        tenant=tenant.name,
        requested=requested,
        objective=objective,
        rules=tuple(applied),
        rows=table,
        prompt_tokens=features.prompt_tokens,
        out_tokens=out_tokens,
        live=live,
    )
    return RoutePlan(route, tuple(t for _, t in ranked[: route.max_attempts]), facts)


def _refuse(
    route: Route,
    rows: tuple[tuple[Target, str | None], ...],
    verdicts: list[tuple[Target, str | None]],
    features: RequestFeatures,
) -> None:
    reasons = "; ".join(f"{t.label}: {r}" for t, r in verdicts)
    # Candidates the tenant may use at all; if each of them is only too small, say so as OpenAI does.
    compliant = [(t, r) for (t, static), (_, r) in zip(rows, verdicts, strict=True) if static is None]
    if compliant and all((r or "").startswith(CONTEXT_PREFIX) for _, r in compliant):
        # Too long for every usable candidate: what OpenAI answers, so clients' context handling works.
        largest = max(t.model.context_window or 0 for t, _ in compliant)
        raise InvalidRequest(
            f"This model's maximum context length is {largest} tokens. However, you requested "
            f"{features.prompt_tokens + (features.max_tokens or 0)} tokens. ({reasons})",
            param="messages",
            code="context_length_exceeded",
        )
    raise PermissionDenied(
        f"No deployment of '{route.name}' satisfies the policy for your key. Excluded: {reasons}.", param="model"
    )


def _rank(
    survivors: list[tuple[int, Target]],
    route: Route,
    objective: Objective,
    weights: Weights,
    features: RequestFeatures,
    out_tokens: int,
    live: LiveState,
    prefs: Preferences | None,
    own: int,
) -> list[tuple[float, Target]]:
    """(score, target) best first. Sort key: (spill/fallback group, objective score, declared order)."""
    order = {m: i for i, m in enumerate(prefs.order)} if prefs is not None and prefs.order else None
    spill = route.spillover
    tiers = spill.tiers if spill is not None else ()
    scores: list[float]
    if objective == "ordered":
        scores = [0.0] * len(survivors)
    elif objective == "cost":
        scores = [_cost(t, features.prompt_tokens, out_tokens) for _, t in survivors]
    elif objective == "latency":
        scores = [_latency(t, live) for _, t in survivors]
    else:
        costs = [_cost(t, features.prompt_tokens, out_tokens) for _, t in survivors]
        lats = [_latency(t, live) for _, t in survivors]
        max_cost = max(costs) or 1.0
        max_lat = max(lats) or 1.0
        total = (weights.cost + weights.latency) or 1.0
        scores = [
            (weights.cost * c / max_cost + weights.latency * lt / max_lat) / total
            for c, lt in zip(costs, lats, strict=True)
        ]
    keyed = []
    for (position, target), score in zip(survivors, scores, strict=True):
        group = 0.0 if position < own else 1000.0  # a fallback route's candidates come last
        if spill is not None:
            tier = target.backend.tier
            group += tiers.index(tier) if tier in tiers else len(tiers)
            if _utilisation(target, live) >= spill.threshold:
                group += len(tiers) + 1
        declared = order.get(target.model.name, len(order) + position) if order is not None else position
        keyed.append(((group, score, declared), target))
    keyed.sort(key=lambda item: item[0])
    return [(key[1], target) for key, target in keyed]
