"""The routing engine: pure, no I/O. `decide(index, principal, features, live) -> RoutePlan`.

1. Filter every (model, deployment) candidate of the route by hard constraints (compliance, the
   capabilities the request uses, context window, price ceiling, health), recording a reason for
   each exclusion. Compliance verdicts are compiled once per policy (gateway.policy.compile); the
   engine only reads them.
2. Rank the survivors by the route's objective with the live signals given (latency EWMA,
   utilisation); the ordered survivors are the fallback plan. Fallbacks and spillover come from the
   same filtered list, so they never leave the compliance envelope: when nothing survives the
   request is refused with every reason, never sent somewhere else: 403 `no_compliant_candidate`
   (compliance, rules and preferences left nothing), 400 `capability_missing` (no compliant candidate
   has a capability the request uses), 400 `context_length_exceeded` (none of those is large enough).
3. The plan carries the tenant's budget downgrade (`RoutePlan.downgrade`, for `on_exhausted:
   downgrade`): the decision for its `downgrade_route`, made the same way, so the `limits` stage
   switches plans without running the `route` stage again; decided only if a spent budget asks.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Final

import msgspec

from gateway.canonical import Message, Operation
from gateway.errors import AuthenticationFailed, InvalidRequest, ModelNotFound, PermissionDenied
from gateway.policy.affinity import choose, conversation_key
from gateway.policy.compile import RuleTest, StaticRows, TrialKey, TrialKind
from gateway.policy.index import PolicyIndex, Principal, Target
from gateway.policy.live import (
    EMPTY_LIVE,
    LiveState,
    latency_of,
    load_source,
    spill_verdict,
    utilisation,
)
from gateway.policy.model import (
    Affinity,
    Canary,
    Constraints,
    Objective,
    Prefer,
    Route,
    Shadow,
    Tenant,
    Weights,
)
from gateway.policy.rates import highest_token_rate
from gateway.policy.trials import conversation_material, in_canary

# Output tokens assumed for cost ranking when the request sets no max_tokens.
DEFAULT_OUTPUT_TOKENS: Final = 256


# A client's lists of places or model names: short, and bounded, since places are expanded through a
# cache keyed by the list itself (places.expand): unbounded, one request could pin megabytes in it.
MAX_PREFERENCE_ITEMS: Final = 64
_Name = Annotated[str, msgspec.Meta(max_length=128)]
_Names = Annotated[tuple[_Name, ...], msgspec.Meta(max_length=MAX_PREFERENCE_ITEMS)]


class Preferences(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a client may ask per request (header `x-strait-policy` or body `strait`); it only narrows."""

    objective: Objective | None = None
    max_price_per_mtok: float | None = None
    jurisdictions: _Names | None = None
    origins: _Names | None = None
    # Model names of the route, most preferred first.
    order: _Names | None = None


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
    # The request's messages (chat), shared with the request: a route's `affinity` may key on their start.
    messages: tuple[Message, ...] = ()
    # The region of the gateway replica that received the request (STRAIT_REGION); None: not set.
    ingress_region: str | None = None
    # Completions and embeddings: the inputs, shared with the request (a route's canary keys on them).
    inputs: tuple[str | tuple[int, ...], ...] = ()


class Row(msgspec.Struct, frozen=True, kw_only=True):
    """One candidate in the decision table."""

    deployment: str
    model: str
    backend: str
    tier: str
    excluded: str | None = None
    est_cost_usd: float | None = None
    latency_ms: float | None = None
    # The EWMA of the time to first token the latency objective ranks on (None: no stream measured yet).
    ttft_ms: float | None = None
    tokens_per_s: float | None = None
    utilisation: float | None = None
    queue: int | None = None
    # Where utilisation came from: engine (scraped, fresh), estimated (the fresh scrape corrected with the
    # requests this gateway started or finished there since), in-flight (counted), stale (the engine's
    # metrics are too old: counted from in-flight), or None (nothing known: 0).
    load: str | None = None
    # Why this deployment was moved behind the others (spillover), or None.
    spilled: str | None = None
    # Its backend is spilling (hysteresis), yet this request fit under the threshold and may go to it:
    # why it fits (spillover sends only the overflow elsewhere). None otherwise.
    spilling: str | None = None
    # Ejected, yet in the plan: every candidate was ejected (panic mode).
    ejected: bool = False
    score: float | None = None
    rank: int | None = None
    # What the backend runs on (`8x H100 80GB`) and where (`hosting.region`), as declared.
    hardware: str | None = None
    region: str | None = None


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
    # Every compliant candidate was ejected: they were ranked anyway, rather than refusing (panic mode).
    panic: bool = False
    # What session affinity did (the replica it chose, or why it chose none); None: the route has none.
    affinity: str | None = None
    # The region of the replica that received the request, and the soft preferences the ranking applied.
    ingress_region: str | None = None
    prefer: Prefer | None = None
    # What the route's canary did for this request (served it, or why not); None: the route has none.
    canary: str | None = None
    # The deployment a shadow copy of this request would go to, or why none may; None: no shadow.
    shadow: str | None = None


# ---------------------------------------------------------------------------------------------------------------
# Rules and per-request preferences.


def rule_matches(test: RuleTest, route: str, f: RequestFeatures) -> bool:
    """Whether a rule's `when` holds for this request on `route` (its tenant condition was settled when
    the policy was compiled: only rules that can match the tenant are tested)."""
    if test.routes is not None and route not in test.routes:
        return False
    if test.header is not None:
        value = f.headers.get(test.header)
        if value is None:
            return False
        if test.equals is not None and value != test.equals:
            return False
        if test.one_of is not None and value not in test.one_of:
            return False
    if test.min_prompt_tokens is not None and f.prompt_tokens < test.min_prompt_tokens:
        return False
    if test.max_prompt_tokens is not None and f.prompt_tokens > test.max_prompt_tokens:
        return False
    if test.window is not None:
        start, end, tz = test.window
        local = (f.now or dt.datetime.now(dt.UTC)).astimezone(tz)
        m = local.hour * 60 + local.minute
        if not (start <= m < end if start <= end else (m >= start or m < end)):
            return False
    return True


WIDENING: Final = "policy_widening_refused"


def check_preferences(p: Preferences, tenant: Tenant, route: Route, index: PolicyIndex) -> None:
    """Refuse (403 policy_widening_refused) a preference that would widen the tenant's envelope; 400 for
    one that names nothing real. Narrowing to a place the tenant's contains (an EEA tenant asking for EU)
    is not widening."""
    c = tenant.compliance
    places = index.places
    if p.jurisdictions is not None and c.allowed_jurisdictions is not None:
        outside = places.narrows(p.jurisdictions, c.allowed_jurisdictions)
        if outside:
            raise PermissionDenied(
                f"Your policy preferences ask for jurisdictions {outside}, outside what your tenant allows "
                f"({list(c.allowed_jurisdictions)}).",
                param="strait.jurisdictions",
                code=WIDENING,
            )
    if p.origins is not None and c.allowed_origin_countries is not None:
        outside = places.narrows(p.origins, c.allowed_origin_countries)
        if outside:
            raise PermissionDenied(
                f"Your policy preferences ask for model origins {outside}, outside what your tenant allows "
                f"({list(c.allowed_origin_countries)}).",
                param="strait.origins",
                code=WIDENING,
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


def _hardware_reason(t: Target, c: Constraints) -> str | None:
    hw = t.backend.hardware
    if c.chips is not None and (hw is None or hw.chip is None or hw.chip.lower() not in {x.lower() for x in c.chips}):
        chip = hw.chip if hw is not None and hw.chip else "unknown"
        return f"a rule allows only chips {list(c.chips)} (this backend: {chip})"
    if c.min_memory_gb is not None and (hw is None or hw.memory_gb is None or hw.memory_gb < c.min_memory_gb):
        memory = f"{hw.memory_gb:g} GB" if hw is not None and hw.memory_gb is not None else "unknown"
        return f"a rule allows only chips with at least {c.min_memory_gb:g} GB (this backend: {memory})"
    return None


def _narrowing_reason(t: Target, extra: list[Constraints], p: Preferences | None) -> str | None:
    """Why a rule's constraints or the request's preferences exclude `t` (they only narrow: unknown
    places, origins and hardware satisfy none of them)."""
    places = t.places
    juris = t.backend.hosting.jurisdiction
    origin = t.origin
    country = origin.country if origin else None
    price = t.deployment.price
    for c in extra:
        if c.allowed_jurisdictions is not None and not places.satisfies(juris, c.allowed_jurisdictions):
            return f"a rule allows only jurisdictions {list(c.allowed_jurisdictions)}"
        if c.allowed_origin_countries is not None and not places.satisfies(country, c.allowed_origin_countries):
            return f"a rule allows only model origins {list(c.allowed_origin_countries)}"
        if c.allowed_tiers is not None and t.backend.tier not in c.allowed_tiers:
            return f"a rule allows only tiers {list(c.allowed_tiers)}"
        if c.max_price_per_mtok is not None and highest_token_rate(price) > c.max_price_per_mtok:
            return f"price above the rule's ceiling of {c.max_price_per_mtok} USD per million tokens"
        if c.chips is not None or c.min_memory_gb is not None:
            reason = _hardware_reason(t, c)
            if reason:
                return reason
    if p is not None:
        if p.jurisdictions is not None and not places.satisfies(juris, p.jurisdictions):
            return f"you asked for jurisdictions {list(p.jurisdictions)}"
        if p.origins is not None and not places.satisfies(country, p.origins):
            return f"you asked for model origins {list(p.origins)}"
        if p.max_price_per_mtok is not None and highest_token_rate(price) > p.max_price_per_mtok:
            return f"price above your ceiling of {p.max_price_per_mtok} USD per million tokens"
    return None


def _preference_key(t: Target, prefer: Prefer, ingress: str | None) -> tuple[int, int, int]:
    """How well `t` matches a route's or rule's soft preferences, best first: (has the memory asked for,
    the chip's place in the preferred list, in the ingress region). Unknown hardware or region ranks as
    not matching."""
    hw = t.backend.hardware
    memory = 0
    if prefer.min_memory_gb is not None:
        memory = 0 if hw is not None and hw.memory_gb is not None and hw.memory_gb >= prefer.min_memory_gb else 1
    chip = 0
    if prefer.chips:
        names = [c.lower() for c in prefer.chips]
        mine = (hw.chip or "").lower() if hw is not None else ""
        chip = names.index(mine) if mine in names else len(names)
    near = 0
    if prefer.ingress_region:
        region = t.backend.hosting.region
        near = 0 if ingress is not None and region is not None and region.lower() == ingress.lower() else 1
    return (memory, chip, near)


_NO_PREFERENCE: Final = (0, 0, 0)
CONTEXT_PREFIX: Final = "context window is "
EJECTED: Final = "backend is ejected (unhealthy)"


# ---------------------------------------------------------------------------------------------------------------
# The decision.


def _cost(t: Target, prompt_tokens: int, out_tokens: int) -> float:
    """The request's expected cost in USD for ranking: uncached input and plain output rates (cache hits
    and reasoning cannot be known before the answer), plus the deployment's per-request fee."""
    price = t.deployment.price
    return (prompt_tokens * price.input_per_mtok + out_tokens * price.output_per_mtok) / 1e6 + price.per_request


class RoutePlan:
    """The ordered targets; the decision table, built only when asked for (explain, refusals); and the
    tenant's budget downgrade, decided only when a spent budget asks for it. The hot path pays for
    ranking, not for rendering nor for a second decision it almost never needs."""

    __slots__ = ("_decision", "_downgrade", "_facts", "route", "targets")

    def __init__(self, route: Route, targets: tuple[Target, ...], facts: _Facts, downgrade: _Downgrade | None) -> None:
        self.route = route
        self.targets = targets
        self._facts = facts
        self._decision: Decision | None = None
        self._downgrade = downgrade

    @property
    def spilled(self) -> Mapping[str, str]:
        """Backends moved behind the others by spillover, with why (empty without spillover)."""
        return self._facts.spilled

    @property
    def spill_changes(self) -> list[tuple[str, str, bool]]:
        """(route, backend, spilling) for each ranked backend whose spill state this decision changed:
        what the caller remembers for the next decision (hysteresis). A backend that is spilling stays so
        while requests that fit still go to it (only the overflow spills), until the lower marks."""
        f = self._facts
        before = f.live.spilling
        seen: set[str] = set()
        out: list[tuple[str, str, bool]] = []
        if self.route.spillover is None:
            return out
        for _, t in f.ranked:
            name = t.backend.name
            if name in seen:
                continue
            seen.add(name)
            now = name in f.spilled or (f.fits is not None and name in f.fits)
            if now != ((self.route.name, name) in before):
                out.append((self.route.name, name, now))
        return out

    @property
    def panic(self) -> bool:
        return self._facts.panic

    @property
    def shadow(self) -> Target | None:
        """Where a shadow copy of this request may go (the route's shadow model, filtered like any
        candidate), or None: the route has no shadow, or none of its deployments may take this request."""
        return self._facts.shadow

    @property
    def shadow_excluded(self) -> str | None:
        """Why no shadow copy may be made, as a metric label (`compliance`, `constraints`, `capability`,
        `context_length`, `ejected`, `no_deployment`); None when one may, or the route has no shadow."""
        return self._facts.shadow_excluded

    @property
    def canary(self) -> bool:
        """The plan's first target is the route's canary (it serves this conversation)."""
        return self._facts.canary_served

    def may_use(self, label: str) -> bool:
        """Whether this request may be served by deployment `label` (`model@backend`): it is a candidate of
        the route that passed compliance, the rules' constraints, the request's preferences, its
        capabilities and context window (an ejected one counts: the cache serves without asking it)."""
        return any(t.label == label and (r is None or r == EJECTED) for t, r in self._facts.verdicts)

    def detached(self) -> RoutePlan:
        """This plan without its downgrade's inputs (they hold the request's messages): what a bounded log of
        recent decisions may keep and still build the table from, later and only if asked (the plan
        itself when it has no downgrade)."""
        if self._downgrade is None:
            return self
        plan = RoutePlan(self.route, self.targets, self._facts, None)
        plan._decision = self._decision
        return plan

    @property
    def decision(self) -> Decision:
        if self._decision is None:
            self._decision = self._facts.decision(self.route, self.targets)
        return self._decision

    @property
    def requested(self) -> str:
        """The route this plan was asked for: the request's `model`, or the tenant's downgrade route
        (`route` may differ: a rule can rewrite it)."""
        return self._facts.requested

    @property
    def downgrade(self) -> RoutePlan | None:
        """The plan to switch to when the tenant's budget is spent and its budgets say `on_exhausted:
        downgrade`; None when they say `block`. It is the decision for the tenant's `downgrade_route`,
        made exactly as for a request naming it (same key, compliance, rules, preferences, request and
        live signals), so it never leaves the envelope the primary plan obeys. Decided on first use and
        kept; raises what `decide` raises when the downgrade route cannot serve this request."""
        d = self._downgrade
        if d is None:
            return None
        if d.plan is None:
            features = msgspec.structs.replace(d.features, route=d.route)
            d.plan = decide(d.index, d.principal, features, d.live, decision_id=d.decision_id, downgrade=False)
        return d.plan


@dataclass(slots=True)
class _Downgrade:
    """What deciding the downgrade plan takes, kept until (and if) a spent budget asks for it."""

    index: PolicyIndex
    principal: Principal
    # The request's features; the tenant's downgrade route replaces the route it asked for.
    features: RequestFeatures
    route: str
    live: LiveState
    decision_id: str
    plan: RoutePlan | None = None


@dataclass(slots=True)
class _Facts:
    decision_id: str
    policy_version: str
    tenant: str
    requested: str
    objective: Objective
    rules: tuple[str, ...]
    # Every candidate in table order with its exclusion reason (None: it survived the filter).
    verdicts: list[tuple[Target, str | None]]
    # The survivors, best first, with their scores.
    ranked: list[tuple[float, Target]]
    prompt_tokens: int
    out_tokens: int
    live: LiveState
    # Backends spilled by this decision, with why; whether every candidate was ejected (panic).
    spilled: dict[str, str]
    panic: bool
    affinity: str | None = None
    # Backends spilling (hysteresis) that take this request all the same (it fits), with why.
    fits: dict[str, str] | None = None
    ingress_region: str | None = None
    prefer: Prefer | None = None
    canary_note: str | None = None
    canary_served: bool = False
    shadow: Target | None = None
    shadow_note: str | None = None
    shadow_excluded: str | None = None

    def decision(self, route: Route, plan: tuple[Target, ...]) -> Decision:
        rank_of = {id(target): (score, rank) for rank, (score, target) in enumerate(self.ranked, start=1)}
        rows = []
        for target, reason in self.verdicts:
            score, rank = rank_of.get(id(target), (None, None))
            cost = _cost(target, self.prompt_tokens, self.out_tokens)
            live = self.live
            backend = target.backend.name
            rows.append(
                Row(
                    deployment=target.label,
                    model=target.model.name,
                    backend=target.backend.name,
                    tier=target.backend.tier,
                    excluded=reason,
                    est_cost_usd=round(cost, 8),
                    latency_ms=None if reason else round(latency_of(target, live), 3),
                    ttft_ms=_rounded(live.ttft_ms.get(target.label)),
                    tokens_per_s=_rounded(live.tokens_per_s.get(target.label)),
                    utilisation=None if reason else round(utilisation(target, live), 4),
                    queue=live.queue.get(backend),
                    load=None if reason else load_source(target, live),
                    spilled=None if reason else self.spilled.get(backend),
                    spilling=None if reason or not self.fits else self.fits.get(backend),
                    ejected=self.panic and reason is None and _ejected(target, live.unhealthy),
                    score=None if score is None else round(score, 6),
                    rank=rank,
                    hardware=None if target.backend.hardware is None else target.backend.hardware.describe(),
                    region=target.backend.hosting.region,
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
            panic=self.panic,
            affinity=self.affinity,
            ingress_region=self.ingress_region,
            prefer=self.prefer,
            canary=self.canary_note,
            shadow=self.shadow_note,
        )


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _ejected(t: Target, unhealthy: frozenset[str]) -> bool:
    return bool(unhealthy) and (t.backend.name in unhealthy or t.label in unhealthy)


def decide(
    index: PolicyIndex,
    principal: Principal,
    features: RequestFeatures,
    live: LiveState = EMPTY_LIVE,
    *,
    decision_id: str = "",
    downgrade: bool = True,
) -> RoutePlan:
    """The plan for one request. With `downgrade` (the default), the plan also carries the tenant's
    budget downgrade (`RoutePlan.downgrade`), decided lazily."""
    tables = index.tenant_tables.get(principal.tenant)
    if tables is None:
        if principal.tenant != index.open_tenant.name:
            # A key whose tenant this policy does not know: refuse rather than run unconstrained.
            raise AuthenticationFailed("Your API key's tenant is not in the policy in force.")
        tables = index.open_tables
    tenant = tables.tenant
    check_ingress(tenant, features.ingress_region)
    requested = features.route
    route_name = requested
    route = index.routes.get(route_name)
    if route is None or not principal.may_use(route_name):
        raise ModelNotFound(f"The model '{requested}' does not exist or you do not have access to it.", param="model")
    objective: Objective = route.objective
    weights: Weights = route.weights
    prefer: Prefer | None = None
    extra: list[Constraints] = []
    applied: list[str] = []
    for test in tables.rules:
        if not rule_matches(test, route_name, features):
            continue
        rule = test.rule
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
        if then.prefer is not None:
            prefer = then.prefer
    if prefer is None:
        prefer = route.prefer
    prefs = features.preferences
    if prefs is not None:
        check_preferences(prefs, tenant, route, index)
        if prefs.objective is not None:
            objective = prefs.objective
    operation = features.operation
    rows = tables.rows[(route.name, operation)]
    if not rows:
        raise InvalidRequest(
            f"The model '{route.name}' does not support {operation}.",
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
            reason = _request_reason(target, narrowing, extra, prefs, needs, needed_context, unhealthy)
        verdicts.append((target, reason))
        if reason is None:
            survivors.append((position, target))
    out_tokens = features.max_tokens or DEFAULT_OUTPUT_TOKENS
    panic = False
    if not survivors and any(r == EJECTED for _, r in verdicts):
        # Panic mode (Envoy's): every candidate left is ejected. Refusing everyone helps no one; rank
        # them as if healthy, so the request is tried and a recovered backend is found by a real answer.
        panic = True
        verdicts = [(t, None if r == EJECTED else r) for t, r in verdicts]
        survivors = [(position, t) for position, (t, r) in enumerate(verdicts) if r is None]
    if not survivors:
        _refuse(route, rows, verdicts, features, extra)
    own = index.candidates[(route.name, operation)].own
    spilled: dict[str, str] = {}
    # Only a route with spillover can have backends that spill yet take the request: nothing made otherwise.
    fits: dict[str, str] | None = {} if route.spillover is not None else None
    ranked = _rank(survivors, route, objective, weights, features, out_tokens, live, prefs, own, spilled, fits, prefer)
    affinity = None
    if route.affinity is not None:
        ranked, affinity = _keep_conversation(
            route.affinity, tenant.name, features, live, ranked, verdicts, spilled, panic
        )
    facts = _Facts(
        decision_id,
        index.version,
        tenant.name,
        requested,
        objective,
        tuple(applied),
        verdicts,
        ranked,
        features.prompt_tokens,
        out_tokens,
        live,
        spilled,
        panic,
        affinity,
        fits,
        features.ingress_region,
        prefer,
    )
    targets = tuple(t for _, t in ranked[: route.max_attempts])
    if route.canary is not None or route.shadow is not None:
        trial = _Trial(tables.trials, route, operation, narrowing, extra, prefs, needs, needed_context, unhealthy)

        def rank(found: list[tuple[int, Target]]) -> list[tuple[float, Target]]:
            """The route's objective over the trial's survivors (no spillover among them)."""
            return _rank(
                found, route, objective, weights, features, out_tokens, live, prefs, len(found), {}, None, prefer
            )

        if route.canary is not None:
            chosen, facts.canary_note = trial.canary(route.canary, tenant.name, features, rank)
            if chosen is not None:
                # The canary first; the route's own plan behind it, as its fallbacks.
                facts.canary_served = True
                targets = (chosen, *targets)[: route.max_attempts]
        if route.shadow is not None:
            facts.shadow, facts.shadow_excluded, facts.shadow_note = trial.shadow(route.shadow, rank)
    later = None
    if downgrade and tables.downgrade_route is not None:
        later = _Downgrade(index, principal, features, tables.downgrade_route, live, decision_id)
    return RoutePlan(route, targets, facts, later)


def _request_reason(
    target: Target,
    narrowing: bool,
    extra: list[Constraints],
    prefs: Preferences | None,
    needs: frozenset[str],
    needed_context: int,
    unhealthy: frozenset[str],
) -> str | None:
    """Why this request may not run on a candidate its tenant's compliance allows: a rule's constraints
    or the request's preferences, a capability it uses, the context window, an ejected backend."""
    if narrowing:
        reason = _narrowing_reason(target, extra, prefs)
        if reason is not None:
            return reason
    if needs and not needs <= target.capabilities:
        return f"model lacks {', '.join(sorted(needs - target.capabilities))}"
    if target.model.context_window is not None and needed_context > target.model.context_window:
        return f"{CONTEXT_PREFIX}{target.model.context_window} tokens, the request needs {needed_context}"
    if _ejected(target, unhealthy):
        return EJECTED
    return None


Ranker = Callable[[list[tuple[int, Target]]], list[tuple[float, Target]]]


@dataclass(slots=True)
class _Trial:
    """A route's shadow or canary model for one request: its deployments filtered exactly like the
    route's own candidates (the tenant's compliance, then the request's constraints, capabilities,
    context and health; no panic mode: an ejected candidate is simply not tried)."""

    rows: Mapping[TrialKey, StaticRows]
    route: Route
    operation: Operation
    narrowing: bool
    extra: list[Constraints]
    prefs: Preferences | None
    needs: frozenset[str]
    needed_context: int
    unhealthy: frozenset[str]

    def _filter(self, kind: TrialKind) -> tuple[list[tuple[int, Target]], list[tuple[str, str]]]:
        """The survivors, and (label: reason, label code) for each excluded deployment."""
        survivors: list[tuple[int, Target]] = []
        excluded: list[tuple[str, str]] = []
        for position, (target, static) in enumerate(self.rows.get((kind, self.route.name, self.operation), ())):
            if static is not None:
                excluded.append((f"{target.label}: {static}", "compliance"))
                continue
            reason = _request_reason(
                target, self.narrowing, self.extra, self.prefs, self.needs, self.needed_context, self.unhealthy
            )
            if reason is None:
                survivors.append((position, target))
            else:
                excluded.append(
                    (f"{target.label}: {reason}", _reason_code(reason, self.narrowing, self.extra, self.prefs, target))
                )
        return survivors, excluded

    def canary(self, canary: Canary, tenant: str, features: RequestFeatures, rank: Ranker) -> tuple[Target | None, str]:
        """The canary's deployment when it serves this conversation, and what explain says."""
        material = conversation_material(features.messages, features.inputs)
        if material is None:
            return None, "not applied: the request has no conversation to key on"
        served, share = in_canary(tenant, self.route.name, material, canary.weight)
        if not served:
            return None, f"not in the canary's share (conversation {share:.4f} >= weight {canary.weight:g})"
        survivors, excluded = self._filter("canary")
        if not survivors:
            why = (
                "; ".join(text for text, _ in excluded) or f"no deployment of {canary.model!r} serves {self.operation}"
            )
            return None, f"not applied: {why}"
        chosen = rank(survivors)[0][1]
        return chosen, f"{chosen.label} serves this conversation (conversation {share:.4f} < weight {canary.weight:g})"

    def shadow(self, shadow: Shadow, rank: Ranker) -> tuple[Target | None, str | None, str]:
        """(the deployment a copy may go to, or None; why not, as a label; what explain says)."""
        survivors, excluded = self._filter("shadow")
        if survivors:
            chosen = rank(survivors)[0][1]
            return chosen, None, chosen.label
        if not excluded:
            return None, "no_deployment", f"not applied: no deployment of {shadow.model!r} serves {self.operation}"
        # The first deployment's reason names the label (the most common case: one deployment).
        return None, excluded[0][1], "not applied: " + "; ".join(text for text, _ in excluded)


def _reason_code(
    reason: str, narrowing: bool, extra: list[Constraints], prefs: Preferences | None, target: Target
) -> str:
    if reason == EJECTED:
        return "ejected"
    if reason.startswith(CONTEXT_PREFIX):
        return "context_length"
    if narrowing and _narrowing_reason(target, extra, prefs) is not None:
        return "constraints"
    return "capability"


def check_ingress(tenant: Tenant, region: str | None) -> None:
    """403 `ingress_region_not_allowed` when the tenant requires ingress regions and the request entered
    through a replica in none of them (a replica without STRAIT_REGION is in none)."""
    required = tenant.compliance.required_ingress_regions
    if required is None:
        return
    if region is None or region.lower() not in {r.lower() for r in required}:
        where = f"region {region!r}" if region is not None else "a replica with no region set (STRAIT_REGION)"
        raise PermissionDenied(
            f"Your tenant's requests may enter only through regions {list(required)}; this request entered "
            f"through {where}. Send it to a gateway in one of those regions.",
            code="ingress_region_not_allowed",
        )


NO_COMPLIANT: Final = "no_compliant_candidate"


def _refuse(
    route: Route,
    rows: tuple[tuple[Target, str | None], ...],
    verdicts: list[tuple[Target, str | None]],
    features: RequestFeatures,
    extra: list[Constraints],
) -> None:
    """Nothing survived the filter: say which stage left nothing, with every candidate's reason.

    The stages in order: compliance (the tenant's, then the rules' constraints and the request's
    preferences) -> 403 no_compliant_candidate; the capabilities the request uses -> 400
    capability_missing; the context window -> 400 context_length_exceeded, naming the largest window
    among the candidates that passed the stages before (what the tenant could use)."""
    reasons = "; ".join(f"{t.label}: {r}" for t, r in verdicts)
    prefs = features.preferences
    narrowing = bool(extra) or prefs is not None
    compliant = [t for t, static in rows if static is None and not (narrowing and _narrowing_reason(t, extra, prefs))]
    if not compliant:
        raise PermissionDenied(
            f"No deployment of '{route.name}' satisfies the policy for your key. Excluded: {reasons}.",
            param="model",
            code=NO_COMPLIANT,
        )
    needs = features.needs
    capable = [t for t in compliant if needs <= t.capabilities]
    if not capable:
        missing = sorted(needs - frozenset().union(*(t.capabilities for t in compliant)))
        lacking = ", ".join(missing) if missing else ", ".join(sorted(needs))
        raise InvalidRequest(
            f"No deployment of '{route.name}' you may use supports {lacking}, which this request uses. "
            f"Excluded: {reasons}.",
            param="model",
            code="capability_missing",
        )
    needed = features.prompt_tokens + (features.max_tokens or 0)
    if all(t.model.context_window is not None and needed > t.model.context_window for t in capable):
        # Too long for every usable candidate: what OpenAI answers, so clients' context handling works.
        largest = max(t.model.context_window or 0 for t in capable)
        raise InvalidRequest(
            f"This model's maximum context length is {largest} tokens. However, you requested "
            f"{needed} tokens. ({reasons})",
            param="messages",
            code="context_length_exceeded",
        )
    raise PermissionDenied(
        f"No deployment of '{route.name}' satisfies the policy for your key. Excluded: {reasons}.",
        param="model",
        code=NO_COMPLIANT,
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
    spilled: dict[str, str],
    fits: dict[str, str] | None,
    prefer: Prefer | None = None,
) -> list[tuple[float, Target]]:
    """(score, target) best first. Sort key: (spill/fallback group, objective score, declared order).
    Fills `spilled` with the backends spillover moved behind the others, and why; `fits` with those that
    are spilling yet take this request (it fits under the threshold), and why.

    Without spillover at work, a plan whose order nothing can change skips the sort key: one survivor, or
    the `ordered` objective with no preference nor client order (every key is then (fallback group, no
    preference, 0.0, position), and the fallback group grows with the position: the survivors' own order).
    `_rank_sorted` is the whole ranking; tests check both agree."""
    if (route.spillover is None or fits is None) and (
        len(survivors) == 1 or (objective == "ordered" and prefer is None and (prefs is None or not prefs.order))
    ):
        scores = _scores(survivors, objective, weights, features, out_tokens, live)
        return [(score, target) for (_, target), score in zip(survivors, scores, strict=True)]
    return _rank_sorted(
        survivors, route, objective, weights, features, out_tokens, live, prefs, own, spilled, fits, prefer
    )


def _scores(
    survivors: list[tuple[int, Target]],
    objective: Objective,
    weights: Weights,
    features: RequestFeatures,
    out_tokens: int,
    live: LiveState,
) -> list[float]:
    """Each survivor's objective score (lower ranks first)."""
    if objective == "ordered":
        return [0.0] * len(survivors)
    if objective == "cost":
        return [_cost(t, features.prompt_tokens, out_tokens) for _, t in survivors]
    if objective == "latency":
        return [latency_of(t, live) for _, t in survivors]
    costs = [_cost(t, features.prompt_tokens, out_tokens) for _, t in survivors]
    lats = [latency_of(t, live) for _, t in survivors]
    max_cost = max(costs) or 1.0
    max_lat = max(lats) or 1.0
    total = (weights.cost + weights.latency) or 1.0
    return [
        (weights.cost * c / max_cost + weights.latency * lt / max_lat) / total
        for c, lt in zip(costs, lats, strict=True)
    ]


def _rank_sorted(
    survivors: list[tuple[int, Target]],
    route: Route,
    objective: Objective,
    weights: Weights,
    features: RequestFeatures,
    out_tokens: int,
    live: LiveState,
    prefs: Preferences | None,
    own: int,
    spilled: dict[str, str],
    fits: dict[str, str] | None,
    prefer: Prefer | None = None,
) -> list[tuple[float, Target]]:
    """`_rank` by its whole sort key, whatever the plan."""
    order = {m: i for i, m in enumerate(prefs.order)} if prefs is not None and prefs.order else None
    spill = route.spillover
    tiers = spill.tiers if spill is not None else ()
    scores = _scores(survivors, objective, weights, features, out_tokens, live)
    keyed = []
    for (position, target), score in zip(survivors, scores, strict=True):
        group = 0.0 if position < own else 1000.0  # a fallback route's candidates come last
        if spill is not None and fits is not None:
            tier = target.backend.tier
            group += tiers.index(tier) if tier in tiers else len(tiers)
            name = target.backend.name
            if name in spilled:
                group += len(tiers) + 1
            elif name not in fits:
                why, fit = spill_verdict(target, route, spill, live)
                if why is not None:
                    spilled[name] = why
                    group += len(tiers) + 1
                elif fit is not None:
                    fits[name] = fit
        declared = order.get(target.model.name, len(order) + position) if order is not None else position
        preferred = _preference_key(target, prefer, features.ingress_region) if prefer is not None else _NO_PREFERENCE
        keyed.append(((group, preferred, score, declared), target))
    keyed.sort(key=lambda item: item[0])
    return [(key[2], target) for key, target in keyed]


def _keep_conversation(
    affinity: Affinity,
    tenant: str,
    features: RequestFeatures,
    live: LiveState,
    ranked: list[tuple[float, Target]],
    verdicts: list[tuple[Target, str | None]],
    spilled: Mapping[str, str],
    panic: bool,
) -> tuple[list[tuple[float, Target]], str]:
    """Session affinity (gateway.policy.affinity): among the replicas of the model the objective ranked
    first, in its tier, the conversation's replica goes first unless it is ejected or saturated (then its
    next one in the key's order); the others keep their rank behind it, as the fallbacks. Returns the
    ranking and what explain says."""
    if panic:
        return ranked, "not applied: every candidate is ejected (panic)"
    first = ranked[0][1]
    tier = first.backend.tier
    if tier not in affinity.tiers:
        return ranked, f"not applied: the first-ranked {first.label} is in tier {tier}, not in affinity.tiers"
    key = conversation_key(affinity, tenant, features.messages, features.headers)
    if isinstance(key, str):
        return ranked, "not applied: " + key
    # A model's deployments are all the route's own or all a fallback route's (gateway.policy.compile),
    # so the same model in the same tier is one pool of interchangeable replicas. Ejected ones hash too
    # (they are passed over): the others' conversations stay where they are.
    model = first.model.name
    ejected = [t for t, why in verdicts if why == EJECTED and t.model.name == model and t.backend.tier == tier]
    replicas = [t for _, t in ranked if t.model.name == model and t.backend.tier == tier] + ejected
    out = {t.label for t in ejected}
    ceiling = affinity.max_utilisation

    def unavailable(t: Target) -> str | None:
        if t.label in out:
            return "ejected"
        why = spilled.get(t.backend.name)
        if why is not None:
            return f"spilling ({why})"
        u = utilisation(t, live)
        return f"saturated (utilisation {u:.2f} >= {ceiling:.2f})" if u >= ceiling else None

    chosen, note = choose(key, replicas, unavailable)
    if chosen is None or chosen is first:
        return ranked, note
    at = next(i for i, (_, t) in enumerate(ranked) if t is chosen)
    return [ranked[at], *ranked[:at], *ranked[at + 1 :]], note
