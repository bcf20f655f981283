"""Work that depends only on the policy, done once when a policy is loaded, never per request.

`PolicyIndex` (gateway.policy.index) builds these tables in its constructor, once per load and reload:

- per (route, operation), `Candidates`: the route's own targets, then its fallback routes', each
  deployment once, and how many of them are the route's own (ranking puts fallbacks last);
- per tenant, `TenantTables`: the compliance verdict on every candidate of every route it may use
  (tenants with equal compliance share one table: a policy has few distinct compliance envelopes), the rules that
  can apply to it (a rule naming other tenants never can), its budget downgrade route, and which
  sections of the policy limit it on each route (`LimitSections`);
- per rule, `RuleTest`: its `when` prepared for testing (header name lower-cased, lists as sets, the
  time window in minutes with its time zone loaded), so a request parses nothing of the policy;
- per (route, operation), `PromptNeeds`: whether any decision for it reads the exact prompt size (a rule
  on prompt size, a cost-ranked objective) and the smallest context window of any candidate it may
  reach, so the `route` stage knows at once whether the prompt's cheap bound decides the same;
- header blocks, pre-encoded for the ASGI send: `x-strait-deployment` per target (`Target.header`), sent
  as the reply's `extra` pairs (gateway.stages.respond.header_blocks) instead of encoded per request.

Layering. Limits are compiled here in the policy's own terms (sections of `gateway.policy.model`), not
as the state store's `Limits`: the policy layer imports no stage and no state (ARCHITECTURE's import
rule, enforced by tests/unit/test_import_rules.py). The `limits` stage turns these sections into store
`Limits` once per policy, when the runtime is built (`gateway.stages.limits.LimitTable`). The bounds
the store needs (what its scripts compute exactly) are declared on the policy model's fields
(`model.PER_MINUTE_MAX` ...), so the loader refuses an out-of-range limit at its line and every policy
it accepts converts; tests/unit/test_policy_compile.py ties the two sides together.
"""

from __future__ import annotations

import zoneinfo
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Generic, Literal, TypeVar

from gateway.canonical import Operation
from gateway.policy.compliance import compliance_reason
from gateway.policy.model import Budget, Compliance, RateLimits, Route, RouteCache, Rule, Tenant

if TYPE_CHECKING:
    from gateway.policy.index import Target

OPERATIONS: Final[tuple[Operation, ...]] = ("chat", "completions", "embeddings")
# A route's candidate model that is tried next to its own (`shadow`, `canary`): its deployments by
# (kind, route, operation), judged by each tenant's compliance like the route's own candidates.
TrialKind = Literal["shadow", "canary"]
TrialKey = tuple[TrialKind, str, Operation]
# (target, why the tenant's compliance excludes it, or None) for every candidate, in candidate order.
StaticRows = tuple[tuple["Target", str | None], ...]
RateScope = Literal["key", "tenant", "route"]
BudgetScope = Literal["key", "tenant"]
K = TypeVar("K")


@dataclass(frozen=True, slots=True)
class Candidates:
    """Where one route may run one operation: its own targets first, then its fallback routes'."""

    targets: tuple[Target, ...]
    # How many of `targets` are the route's own (the rest come from its fallback routes).
    own: int


@dataclass(frozen=True, slots=True)
class LimitSections:
    """The policy sections that limit one (tenant, route), each with the scope it counts in."""

    rates: tuple[tuple[RateScope, RateLimits], ...]
    budgets: tuple[tuple[BudgetScope, Budget], ...]


@dataclass(frozen=True, slots=True)
class RuleTest:
    """A rule's `when`, prepared once per policy (the tenant condition is settled by `TenantTables.rules`)."""

    rule: Rule
    routes: frozenset[str] | None
    # The header's name lower-cased (request headers arrive lower-cased), and what its value must be.
    header: str | None
    equals: str | None
    one_of: frozenset[str] | None
    min_prompt_tokens: int | None
    max_prompt_tokens: int | None
    # (start, end) in minutes after midnight and the zone they are in; end <= start wraps midnight.
    window: tuple[int, int, zoneinfo.ZoneInfo] | None


def _minutes(hhmm: str) -> int:
    hours, _, minutes = hhmm.partition(":")
    return int(hours) * 60 + int(minutes)


def compile_rule(rule: Rule) -> RuleTest:
    """Raises on a time window the loader would have refused (bad HH:MM, unknown zone): at build, not
    on the request that first meets the rule."""
    w = rule.when
    t = w.time_of_day
    return RuleTest(
        rule=rule,
        routes=None if w.routes is None else frozenset(w.routes),
        header=None if w.header is None else w.header.name.lower(),
        equals=None if w.header is None else w.header.equals,
        one_of=None if w.header is None or w.header.one_of is None else frozenset(w.header.one_of),
        min_prompt_tokens=w.min_prompt_tokens,
        max_prompt_tokens=w.max_prompt_tokens,
        window=None if t is None else (_minutes(t.start), _minutes(t.end), zoneinfo.ZoneInfo(t.tz)),
    )


@dataclass(frozen=True, slots=True)
class CachePlan:
    """What the cache does for one (tenant, route): the tenant's opt-in within the route's bounds."""

    exact: bool
    semantic: bool
    # The embedder's name in `cache.embedders`, or None: the packaged default.
    embedder: str | None
    # The tenant's own threshold (never below the embedder's); None: the embedder's.
    threshold: float | None
    ttl_s: int
    route: RouteCache
    partition: Literal["tenant", "key", "user"] = "tenant"


def compile_cache(tenant: Tenant, routes: Mapping[str, Route], first_embedder: str | None) -> dict[str, CachePlan]:
    """The routes this tenant caches on, with what; a route absent here is never cached for it."""
    c = tenant.cache
    exact = c.exact or c.enabled
    if not (exact or c.semantic):
        return {}
    out: dict[str, CachePlan] = {}
    for route in routes.values():
        allowed = route.cache
        if not allowed.allowed or ("*" not in c.routes and route.name not in c.routes):
            continue
        ttl = allowed.ttl_s if c.ttl_s is None else min(c.ttl_s, allowed.ttl_s)
        out[route.name] = CachePlan(
            exact=exact,
            semantic=c.semantic,
            embedder=c.embedder if c.embedder is not None else first_embedder,
            threshold=c.threshold,
            ttl_s=ttl,
            route=allowed,
            partition=c.partition,
        )
    return out


@dataclass(frozen=True, slots=True)
class TenantTables:
    """Everything per tenant the request path reads, derived from the policy alone."""

    tenant: Tenant
    # Compliance verdicts by (route, operation), every route (a rule may rewrite to any); the same
    # mapping is shared by every tenant whose compliance is equal.
    rows: Mapping[tuple[str, Operation], StaticRows]
    # The policy's rules that can match this tenant, in policy order.
    rules: tuple[RuleTest, ...]
    # Where a spent budget moves the request (on_exhausted: downgrade), or None: refuse.
    downgrade_route: str | None
    # Limit sections by route name, for the routes with a section of their own; `limits` otherwise.
    route_limits: Mapping[str, LimitSections]
    limits: LimitSections
    # By route name: what the cache does there (absent: no cache).
    cache: Mapping[str, CachePlan]
    # Compliance verdicts on the routes' shadow and canary deployments (absent: the route has none).
    trials: Mapping[TrialKey, StaticRows] = field(default_factory=dict)


def compile_candidates(
    routes: Mapping[str, Route], targets: Mapping[tuple[str, Operation], tuple[Target, ...]]
) -> dict[tuple[str, Operation], Candidates]:
    out: dict[tuple[str, Operation], Candidates] = {}
    for route in routes.values():
        for op in OPERATIONS:
            seen: set[str] = set()
            found: list[Target] = []
            for name in (route.name, *route.fallback):
                for t in targets.get((name, op), ()):
                    if t.label not in seen:
                        seen.add(t.label)
                        found.append(t)
            own = len({t.label for t in targets.get((route.name, op), ())})
            out[(route.name, op)] = Candidates(targets=tuple(found), own=own)
    return out


class _Envelopes(Generic[K]):
    """Compliance verdicts on every candidate, per distinct compliance envelope, computed once per policy."""

    def __init__(self, candidates: Mapping[K, Candidates]) -> None:
        self._candidates = candidates
        self._tables: dict[Compliance, dict[K, StaticRows]] = {}

    def rows(self, compliance: Compliance) -> Mapping[K, StaticRows]:
        table = self._tables.get(compliance)
        if table is None:
            # A deployment is a candidate of many (route, operation)s: judged once per envelope, by label
            # (the same deployment is a distinct Target per route, and hashing one hashes its structs).
            verdicts: dict[str, str | None] = {}

            def verdict(t: Target) -> str | None:
                if t.label not in verdicts:
                    verdicts[t.label] = compliance_reason(t, compliance)
                return verdicts[t.label]

            table = {key: tuple((t, verdict(t)) for t in found.targets) for key, found in self._candidates.items()}
            self._tables[compliance] = table
        return table


def _sections(tenant: Tenant, route: str | None) -> LimitSections:
    rates: list[tuple[RateScope, RateLimits]] = [("key", tenant.limits.per_key), ("tenant", tenant.limits.tenant)]
    if route is not None:
        rates.append(("route", tenant.limits.routes[route]))
    budgets: tuple[tuple[BudgetScope, Budget], ...] = (
        ("key", tenant.budgets.per_key),
        ("tenant", tenant.budgets.tenant),
    )
    return LimitSections(rates=tuple(rates), budgets=budgets)


def compile_tenants(
    tenants: Iterable[Tenant],
    rules: tuple[Rule, ...],
    candidates: Mapping[tuple[str, Operation], Candidates],
    routes: Mapping[str, Route] | None = None,
    first_embedder: str | None = None,
    trials: Mapping[TrialKey, Candidates] | None = None,
) -> dict[str, TenantTables]:
    envelopes = _Envelopes(candidates)
    trial_envelopes = _Envelopes(trials or {})
    tests = [compile_rule(r) for r in rules]
    out: dict[str, TenantTables] = {}
    for tenant in tenants:
        budgets = tenant.budgets
        out[tenant.name] = TenantTables(
            tenant=tenant,
            rows=envelopes.rows(tenant.compliance),
            rules=tuple(t for t in tests if t.rule.when.tenants is None or tenant.name in t.rule.when.tenants),
            downgrade_route=budgets.downgrade_route if budgets.on_exhausted == "downgrade" else None,
            route_limits={name: _sections(tenant, name) for name in tenant.limits.routes},
            limits=_sections(tenant, None),
            cache=compile_cache(tenant, routes or {}, first_embedder),
            trials=trial_envelopes.rows(tenant.compliance),
        )
    return out


def compile_trials(
    routes: Mapping[str, Route], targets_of: Callable[[str, Operation], tuple[Target, ...]]
) -> dict[TrialKey, Candidates]:
    """Each route's shadow and canary deployments by operation (`targets_of(model, operation)`)."""
    out: dict[TrialKey, Candidates] = {}
    for route in routes.values():
        named: tuple[tuple[TrialKind, str | None], ...] = (
            ("shadow", route.shadow.model if route.shadow else None),
            ("canary", route.canary.model if route.canary else None),
        )
        for kind, model in named:
            if model is None:
                continue
            for op in OPERATIONS:
                found = targets_of(model, op)
                out[(kind, route.name, op)] = Candidates(targets=found, own=len(found))
    return out


def deployment_header(label: str) -> tuple[bytes, bytes]:
    """`x-strait-deployment` as the ASGI send wants it (latin-1, as every response header is sent)."""
    return (b"x-strait-deployment", label.encode("latin-1", "replace"))


# Objectives whose ranking reads the prompt's size (cost per request).
COST_OBJECTIVES: Final = frozenset({"cost", "balanced"})


@dataclass(frozen=True, slots=True)
class PromptNeeds:
    """Whether decisions for a (route, operation) always need the exact prompt tokens, and the smallest
    context window of any candidate they may consider (None: no candidate declares one)."""

    always: bool
    window: int | None


def reachable_routes(routes: Mapping[str, Route], rules: Iterable[Rule], route: str) -> set[str]:
    """The route, the routes rules may rewrite it to, and their fallback routes."""
    names = {route} | {r.then.route for r in rules if r.then.route is not None}
    for name in list(names):
        known = routes.get(name)
        if known is not None:
            names.update(known.fallback)
    return names


def prompt_needs(
    routes: Mapping[str, Route],
    rules: tuple[Rule, ...],
    targets: Mapping[tuple[str, Operation], tuple[Target, ...]],
    route: str,
    operation: Operation,
) -> PromptNeeds:
    sized = any(r.when.min_prompt_tokens is not None or r.when.max_prompt_tokens is not None for r in rules)
    names = reachable_routes(routes, rules, route)
    objectives = {routes[n].objective for n in names if n in routes}
    objectives |= {r.then.objective for r in rules if r.then.objective is not None}
    windows = [
        t.model.context_window
        for n in names
        for t in targets.get((n, operation), ())
        if t.model.context_window is not None
    ]
    return PromptNeeds(sized or bool(objectives & COST_OBJECTIVES), min(windows, default=None))


def compile_prompt_needs(
    routes: Mapping[str, Route], rules: tuple[Rule, ...], targets: Mapping[tuple[str, Operation], tuple[Target, ...]]
) -> dict[tuple[str, Operation], PromptNeeds]:
    """For every route of the policy and every operation; a route the policy does not know is computed
    when asked (it is refused right after), never kept: a client's `model` must not grow a table."""
    return {(name, op): prompt_needs(routes, rules, targets, name, op) for name in routes for op in OPERATIONS}
