"""Semantic checks across a whole policy: references in routes, tenants and rules, rewrite cycles,
impossible constraints. Pure; each problem is reported through `report(source, path, reason, severity, subject)`.

Imports no stage and no state (the policy layer's rule): a limit out of the state store's exact range
is refused by the model's field bounds (gateway.policy.model), at the line it is written on."""

from __future__ import annotations

import re
import zoneinfo
from collections.abc import Mapping
from typing import Any, Protocol

import msgspec

from gateway.canonical import Operation
from gateway.policy.compile import OPERATIONS, StaticRows
from gateway.policy.compliance import compliance_reason
from gateway.policy.index import PolicyIndex, Target
from gateway.policy.model import Compliance, PolicySet, Route, Tenant
from gateway.policy.places import Places
from gateway.policy.rates import charges_nothing, charging_backends, unpriced_deployments
from gateway.registry import embedder_kinds


class Report(Protocol):
    """How a check reports a problem: where (a `$.a[0].b` path in `source`), why, how bad, and for a
    warning that `silenced_warnings` may silence, its (kind, tenant, route)."""

    def __call__(
        self,
        source: Any,
        path: str,
        reason: str,
        severity: str = ...,
        subject: tuple[str, str | None, str | None] | None = ...,
    ) -> None: ...


_HHMM = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")
ENV_REF = re.compile(r"^env:[A-Za-z_][A-Za-z0-9_]*$")


def check_routes(policy: PolicySet, source: Any, route_names: set[str], report: Report) -> None:
    for i, r in enumerate(policy.routes):
        for j, name in enumerate(r.fallback):
            if name not in route_names:
                report(
                    source,
                    f"$.routes[{i}].fallback[{j}]",
                    f"route {r.name!r}: unknown fallback route {name!r}",
                    "error",
                )
            elif name == r.name:
                report(source, f"$.routes[{i}].fallback[{j}]", f"route {r.name!r}: falls back to itself", "error")
        if r.weights.cost < 0 or r.weights.latency < 0:
            report(source, f"$.routes[{i}].weights", f"route {r.name!r}: weights must not be negative", "error")
        if r.spillover is not None and not 0 < r.spillover.threshold <= 1:
            report(
                source, f"$.routes[{i}].spillover.threshold", f"route {r.name!r}: threshold must be in (0, 1]", "error"
            )
        check_retry(r, f"$.routes[{i}]", source, report)
        check_affinity(r, f"$.routes[{i}]", source, report)
        check_trials(r, f"$.routes[{i}]", source, report)


def check_trials(r: Route, base: str, source: Any, report: Report) -> None:
    """A route's shadow and canary: a candidate that is not already one of the route's own models (it
    would be served anyway: nothing would be tried), and a canary that serves some share."""
    if r.canary is not None:
        if r.canary.model in r.models:
            report(
                source,
                f"{base}.canary.model",
                f"route {r.name!r}: canary model {r.canary.model!r} is already one of the route's models",
                "error",
            )
        if r.canary.weight == 0:
            report(
                source, f"{base}.canary.weight", f"route {r.name!r}: a canary with weight 0 serves nothing", "warning"
            )
    if r.shadow is not None:
        if r.shadow.model in r.models:
            report(
                source,
                f"{base}.shadow.model",
                f"route {r.name!r}: shadow model {r.shadow.model!r} is already one of the route's models",
                "error",
            )
        if r.shadow.sample_rate == 0:
            report(
                source,
                f"{base}.shadow.sample_rate",
                f"route {r.name!r}: a shadow with sample_rate 0 copies nothing",
                "warning",
            )
        if r.shadow.usd_per_day == 0:
            report(
                source,
                f"{base}.shadow.usd_per_day",
                f"route {r.name!r}: a shadow with usd_per_day 0 copies nothing (every copy is over budget)",
                "warning",
            )


def check_affinity(r: Route, base: str, source: Any, report: Report) -> None:
    """A route's session affinity: each key kind with its own settings only, and tiers it can act on."""
    aff = r.affinity
    if aff is None:
        return
    if aff.key == "header" and aff.header is None:
        report(source, f"{base}.affinity", f"route {r.name!r}: affinity key header needs `header` (its name)", "error")
    if aff.key == "prefix" and aff.header is not None:
        report(
            source,
            f"{base}.affinity.header",
            f"route {r.name!r}: affinity `header` is only read with key: header (the key is prefix)",
            "error",
        )
    if aff.key == "header" and aff.prefix_messages is not None:
        report(
            source,
            f"{base}.affinity.prefix_messages",
            f"route {r.name!r}: affinity prefix_messages is only read with key: prefix (the key is header)",
            "error",
        )
    if not aff.tiers:
        report(source, f"{base}.affinity.tiers", f"route {r.name!r}: affinity with no tiers never applies", "error")
    elif len(set(aff.tiers)) != len(aff.tiers):
        report(source, f"{base}.affinity.tiers", f"route {r.name!r}: affinity tiers name a tier twice", "error")


def check_retry(r: Route, base: str, source: Any, report: Report) -> None:
    """A route's retry policy: contradictions are errors, a budget that can never allow a retry a warning."""
    retry = r.retry
    if retry.backoff_base_ms > retry.backoff_max_ms:
        report(
            source,
            f"{base}.retry.backoff_base_ms",
            f"route {r.name!r}: backoff_base_ms ({retry.backoff_base_ms}) exceeds backoff_max_ms ({retry.backoff_max_ms})",
            "error",
        )
    if len(set(retry.retry_on)) != len(retry.retry_on):
        report(source, f"{base}.retry.retry_on", f"route {r.name!r}: retry_on names a class twice", "error")
    if retry.budget_ratio == 0 and retry.budget_min == 0 and retry.retry_on:
        report(
            source,
            f"{base}.retry",
            f"route {r.name!r}: a retry budget of 0 % and budget_min 0 allows no retry at all",
            "warning",
            ("retry_budget", None, r.name),
        )


def check_tenants(policy: PolicySet, source: Any, route_names: set[str], report: Report, places: Places) -> None:
    """`places`: the merged policy's blocs (its own, e.g. FIVE_EYES, with the built-in ones), so a check
    reads a bloc exactly as the engine does."""
    expand = places.expand
    for i, t in enumerate(policy.tenants):
        c = t.compliance
        base = f"$.tenants[{i}]"
        for name in t.limits.routes:
            if name not in route_names:
                report(
                    source, f"{base}.limits.routes", f"tenant {t.name!r}: limits name unknown route {name!r}", "error"
                )
        b = t.budgets
        if b.on_exhausted == "downgrade" and b.downgrade_route is None:
            report(
                source, f"{base}.budgets", f"tenant {t.name!r}: on_exhausted downgrade needs downgrade_route", "error"
            )
        if b.downgrade_route is not None and b.downgrade_route not in route_names:
            report(
                source,
                f"{base}.budgets.downgrade_route",
                f"tenant {t.name!r}: unknown downgrade route {b.downgrade_route!r}",
                "error",
            )
        if c.allowed_jurisdictions is not None and not expand(c.allowed_jurisdictions) - expand(c.denied_jurisdictions):
            report(
                source,
                f"{base}.compliance",
                f"tenant {t.name!r}: impossible constraints: every allowed jurisdiction is also denied",
                "error",
            )
        if c.allowed_origin_countries is not None and not expand(c.allowed_origin_countries) - expand(
            c.denied_origin_countries
        ):
            report(
                source,
                f"{base}.compliance",
                f"tenant {t.name!r}: impossible constraints: every allowed origin country is also denied",
                "error",
            )


def check_spillover(policy: PolicySet, source: Any, report: Report) -> None:
    """A spillover's lower marks must sit below its thresholds (else it could never flow back)."""
    for i, r in enumerate(policy.routes):
        spill = r.spillover
        if spill is None or not 0 < spill.threshold <= 1:
            continue
        if spill.resume_below is not None and not 0 <= spill.resume_below < spill.threshold:
            report(
                source,
                f"$.routes[{i}].spillover.resume_below",
                f"route {r.name!r}: resume_below must be at least 0 and below the threshold ({spill.threshold})",
                "error",
            )
        if (
            spill.queue_threshold is not None
            and spill.queue_resume_below is not None
            and spill.queue_resume_below >= spill.queue_threshold
        ):
            report(
                source,
                f"$.routes[{i}].spillover.queue_resume_below",
                f"route {r.name!r}: queue_resume_below must be below queue_threshold ({spill.queue_threshold})",
                "error",
            )


# A web origin as a browser sends it: scheme, host (a name, IPv4 or [IPv6]), optional port; lower case,
# no path, no trailing slash (`https://app.example.com/` never matches what a browser sends).
_ORIGIN = re.compile(r"^https?://(\[[0-9a-f:.]+\]|[a-z0-9]([a-z0-9.-]*[a-z0-9])?)(:[0-9]{1,5})?$")


def check_cors(policy: PolicySet, source: Any, report: Report) -> None:
    """`server.cors`: every origin as a browser writes it; "*" never with credentials."""
    cors = policy.server.cors
    for j, origin in enumerate(cors.allowed_origins):
        where = f"$.server.cors.allowed_origins[{j}]"
        if origin == "*":
            if cors.allow_credentials:
                report(source, where, "cors: '*' cannot be combined with allow_credentials: list the origins", "error")
        elif not _ORIGIN.match(origin):
            report(
                source,
                where,
                f"cors: {origin!r} is not an origin as browsers send it (scheme://host[:port], lower case, "
                "no path or trailing slash), e.g. 'https://app.example.com'",
                "error",
            )


def check_prices(policy: PolicySet, merged: PolicySet, source: Any, report: Report) -> None:
    """Rate cards: a deployment that would be charged $0 without saying so is a warning (the policy loads;
    the running gateway also logs it and sets `strait_deployment_unpriced`); `free: true` with a rate is
    a contradiction. Negative and absurd prices are refused by the model's bounds."""
    for u in unpriced_deployments(policy.models, charging_backends(merged)):
        report(
            source,
            f"$.models[{u.model_index}].deployments[{u.deployment_index}].price",
            f"model {u.model!r}: deployment on backend {u.backend!r} has no price, so its usage would be charged "
            "$0: give it a price (input_per_mtok, output_per_mtok, ...) or say `price: {free: true}`",
            "warning",
        )
    for i, m in enumerate(policy.models):
        for j, d in enumerate(m.deployments):
            if d.price.free and not charges_nothing(d.price):
                report(
                    source,
                    f"$.models[{i}].deployments[{j}].price.free",
                    f"model {m.name!r}: deployment on backend {d.backend!r} says free: true but its price has a "
                    "rate or fee: keep one or the other",
                    "error",
                )


def check_backends(policy: PolicySet, source: Any, report: Report) -> None:
    """Outlier and capacity settings that cannot work together."""
    for i, b in enumerate(policy.backends):
        base = f"$.backends[{i}]"
        o, cap = b.outlier, b.capacity
        if o.max_ejection_s < o.base_ejection_s:
            report(
                source,
                f"{base}.outlier.max_ejection_s",
                f"backend {b.name!r}: max_ejection_s ({o.max_ejection_s:g}) is below base_ejection_s "
                f"({o.base_ejection_s:g})",
                "error",
            )
        if o.probe == "metrics" and cap.metrics_url is None:
            report(
                source,
                f"{base}.outlier.probe",
                f"backend {b.name!r}: probe metrics needs capacity.metrics_url",
                "error",
            )
        if o.probe in ("health", "models") and b.base_url is None:
            report(source, f"{base}.outlier.probe", f"backend {b.name!r}: probe {o.probe} needs base_url", "error")
        if o.active_interval_s is not None and o.probe == "none":
            report(
                source,
                f"{base}.outlier.active_interval_s",
                f"backend {b.name!r}: active health checks need a probe (probe is none)",
                "error",
            )
        if cap.metrics_url is not None and not cap.metrics_url.startswith(("http://", "https://")):
            report(
                source,
                f"{base}.capacity.metrics_url",
                f"backend {b.name!r}: metrics_url must start with http:// or https://",
                "error",
            )
        if cap.scrape_timeout_s is not None and cap.scrape_timeout_s > cap.scrape_interval_s:
            report(
                source,
                f"{base}.capacity.scrape_timeout_s",
                f"backend {b.name!r}: scrape_timeout_s ({cap.scrape_timeout_s:g}) exceeds scrape_interval_s "
                f"({cap.scrape_interval_s:g}): scrapes would overlap",
                "error",
            )
        stale = cap.stale_after_s
        if stale is not None and stale < cap.scrape_interval_s:
            report(
                source,
                f"{base}.capacity.stale_after_s",
                f"backend {b.name!r}: stale_after_s ({stale:g}) is below scrape_interval_s "
                f"({cap.scrape_interval_s:g}): metrics would be stale between two scrapes",
                "error",
            )


def check_responses(policy: PolicySet, source: Any, report: Report) -> None:
    """`responses` (the upstream serves OpenAI's Responses API) switches the `openai` adapter, which is
    built per backend: on another adapter, or on a deployment, it would be silently ignored."""
    for i, b in enumerate(policy.backends):
        if "responses" in b.capabilities and b.adapter != "openai":
            report(
                source,
                f"$.backends[{i}].capabilities",
                f"backend {b.name!r}: capability responses is for adapter openai (this one is {b.adapter!r})",
                "error",
            )
    for i, m in enumerate(policy.models):
        for j, d in enumerate(m.deployments):
            if "responses" in d.capabilities:
                report(
                    source,
                    f"$.models[{i}].deployments[{j}].capabilities",
                    f"model {m.name!r}: capability responses belongs on the backend ({d.backend!r}), not a deployment",
                    "error",
                )


def check_rules(policy: PolicySet, source: Any, names: dict[str, set[str]], report: Report) -> None:
    for i, rule in enumerate(policy.rules):
        base = f"$.rules[{i}]"
        w = rule.when
        for j, tenant in enumerate(w.tenants or ()):
            if tenant not in names["tenants"]:
                report(source, f"{base}.when.tenants[{j}]", f"rule {rule.name!r}: unknown tenant {tenant!r}", "error")
        for j, route in enumerate(w.routes or ()):
            if route not in names["routes"]:
                report(source, f"{base}.when.routes[{j}]", f"rule {rule.name!r}: unknown route {route!r}", "error")
        if rule.then.route is not None and rule.then.route not in names["routes"]:
            report(source, f"{base}.then.route", f"rule {rule.name!r}: unknown route {rule.then.route!r}", "error")
        window = w.time_of_day
        if window is not None:
            for field in ("start", "end"):
                if not _HHMM.match(getattr(window, field)):
                    report(
                        source,
                        f"{base}.when.time_of_day.{field}",
                        f"rule {rule.name!r}: {field} must be HH:MM",
                        "error",
                    )
            try:
                zoneinfo.ZoneInfo(window.tz)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                report(
                    source,
                    f"{base}.when.time_of_day.tz",
                    f"rule {rule.name!r}: unknown time zone {window.tz!r}",
                    "error",
                )
        if (
            w.min_prompt_tokens is not None
            and w.max_prompt_tokens is not None
            and w.min_prompt_tokens > w.max_prompt_tokens
        ):
            report(source, f"{base}.when", f"rule {rule.name!r}: min_prompt_tokens exceeds max_prompt_tokens", "error")


def check_cache(policy: PolicySet, merged: PolicySet, source: Any, report: Report) -> None:
    """The `cache` section of this file, and its tenants' and routes' cache settings, against the whole
    policy: embedders named once and reachable, tenants naming known embedders and routes."""
    embedders = {e.name: e for e in merged.cache.embedders}
    backends = {b.name for b in merged.backends}
    routes = {r.name for r in merged.routes}
    seen: set[str] = set()
    kinds = embedder_kinds()
    for i, e in enumerate(policy.cache.embedders):
        base = f"$.cache.embedders[{i}]"
        if e.kind not in kinds:
            report(
                source,
                f"{base}.kind",
                f"embedder {e.name!r}: unknown kind {e.kind!r} (installed: {', '.join(sorted(kinds))})",
                "error",
            )
        if e.name in seen:
            report(source, f"{base}.name", f"duplicate embedder name {e.name!r}", "error")
        seen.add(e.name)
        if e.kind == "remote":
            if (e.base_url is None) == (e.backend is None):
                report(source, base, f"embedder {e.name!r}: a remote embedder needs base_url or backend (one)", "error")
            if e.base_url is not None and not e.base_url.startswith(("http://", "https://")):
                report(
                    source,
                    f"{base}.base_url",
                    f"embedder {e.name!r}: base_url must start with http:// or https://",
                    "error",
                )
            if e.backend is not None and e.backend not in backends:
                report(source, f"{base}.backend", f"embedder {e.name!r}: unknown backend {e.backend!r}", "error")
            if e.model is None:
                report(
                    source, f"{base}.model", f"embedder {e.name!r}: a remote embedder needs the upstream model", "error"
                )
            if e.threshold is None:
                report(
                    source,
                    f"{base}.threshold",
                    f"embedder {e.name!r}: a remote embedder needs its threshold (calibrate it: docs/cache.md)",
                    "error",
                )
        elif e.kind == "local" and (e.base_url is not None or e.backend is not None or e.api_key is not None):
            report(source, base, f"embedder {e.name!r}: base_url, backend and api_key are for kind: remote", "error")
        if e.api_key is not None and not ENV_REF.match(e.api_key):
            report(
                source,
                f"{base}.api_key",
                f"embedder {e.name!r}: api_key must be an env:NAME reference, never the secret itself",
                "error",
            )
    for i, t in enumerate(policy.tenants):
        c = t.cache
        base = f"$.tenants[{i}].cache"
        if c.embedder is not None and c.embedder not in embedders:
            report(source, f"{base}.embedder", f"tenant {t.name!r}: unknown embedder {c.embedder!r}", "error")
        for j, name in enumerate(c.routes):
            if name != "*" and name not in routes:
                report(source, f"{base}.routes[{j}]", f"tenant {t.name!r}: cache names unknown route {name!r}", "error")
        chosen = embedders.get(c.embedder) if c.embedder is not None else next(iter(embedders.values()), None)
        if (
            c.threshold is not None
            and chosen is not None
            and chosen.threshold is not None
            and c.threshold < chosen.threshold
        ):
            report(
                source,
                f"{base}.threshold",
                f"tenant {t.name!r}: threshold {c.threshold} is below embedder {chosen.name!r}'s {chosen.threshold} "
                "(a tenant may only make the cache stricter)",
                "error",
            )


def check_capture(policy: PolicySet, source: Any, redactors: frozenset[str], report: Report) -> None:
    """Tenants' `capture`: every redactor named is built in or installed (entry point `strait.redactors`);
    consent without redaction is allowed, and said."""
    for i, t in enumerate(policy.tenants):
        c = t.capture
        base = f"$.tenants[{i}].capture"
        for j, name in enumerate(c.redact):
            if name not in redactors:
                report(
                    source,
                    f"{base}.redact[{j}]",
                    f"tenant {t.name!r}: unknown redactor {name!r} (known: {', '.join(sorted(redactors))})",
                    "error",
                )
        if c.enabled and not c.redact:
            report(source, f"{base}.redact", f"tenant {t.name!r}: captures text unredacted (redact: [])", "warning")


def rewrite_cycle(policy: PolicySet) -> list[str] | None:
    """A cycle of route rewrites (rule `then.route`), as route names, or None.

    A rule without a `when.routes` condition rewrites from every route. Rules are applied once each
    per request, so a cycle cannot loop forever; it is still a policy bug: the outcome depends on order.
    """
    all_routes = [r.name for r in policy.routes]
    edges: dict[str, set[str]] = {name: set() for name in all_routes}
    for rule in policy.rules:
        target = rule.then.route
        if target is None:
            continue
        for source in rule.when.routes or all_routes:
            if source != target and source in edges:
                edges[source].add(target)
    state: dict[str, int] = {}
    stack: list[str] = []
    for name in all_routes:
        if name not in state:
            found = _visit_rewrites(name, edges, state, stack)
            if found:
                return found
    return None


def _visit_rewrites(node: str, edges: dict[str, set[str]], state: dict[str, int], stack: list[str]) -> list[str] | None:
    """`rewrite_cycle`'s depth-first walk (a module function: a recursive closure is a reference cycle,
    garbage only the cyclic collector frees, and a policy load freezes what it built out of its reach)."""
    state[node] = 1
    stack.append(node)
    for nxt in sorted(edges.get(node, ())):
        if state.get(nxt) == 1:
            return [*stack[stack.index(nxt) :], nxt]
        if nxt not in state:
            found = _visit_rewrites(nxt, edges, state, stack)
            if found:
                return found
    stack.pop()
    state[node] = 2
    return None


def excluded_by(target: Target, compliance: Compliance) -> str:
    """Which compliance rule excludes `target`, named as written in the policy, with why: each setting
    alone is tried against the target (the filter itself only says why, not which setting). An origin
    rule's reason says how it matched (`compliance.origin_rule_match`): a developer rule as a developer
    rule, a country rule by the country, a bloc the policy defines included."""
    base = type(compliance)()
    named: list[str] = []
    for field in msgspec.structs.fields(compliance):
        value = getattr(compliance, field.name)
        if value == getattr(base, field.name):
            continue
        if field.name == "origin_rules":
            for i, rule in enumerate(value):
                why = compliance_reason(target, msgspec.structs.replace(base, origin_rules=(rule,)))
                if why is not None:
                    named.append(f"origin_rules[{i}]: {why}")
            continue
        why = compliance_reason(target, msgspec.structs.replace(base, **{field.name: value}))
        if why is not None:
            named.append(f"{field.name}: {why}")
    if not named:  # only the settings together exclude it
        return f"the settings together: {compliance_reason(target, compliance)}"
    return "; ".join(named)


class EmptyRoutes:
    """Routes a tenant may use that its compliance leaves without any candidate, fallback routes included
    (a tenant served through a route's fallback is served), with the rule that excludes each candidate.

    Computed once per distinct compliance envelope, not per tenant: the index's per-tenant verdict
    tables (`TenantTables.rows`, compiled once per policy) are shared by every tenant whose compliance
    is equal, so a policy of 2,500 tenants in five envelopes evaluates five envelopes."""

    def __init__(self, index: PolicyIndex) -> None:
        self._index = index
        # id of a shared verdict table -> (route, why each of its candidates is excluded) for its empty routes.
        self._by_rows: dict[int, dict[str, list[str]]] = {}

    def _empty(self, tenant: Tenant, rows: Mapping[tuple[str, Operation], StaticRows]) -> dict[str, list[str]]:
        found = self._by_rows.get(id(rows))
        if found is not None:
            return found
        found = {}
        for name in self._index.routes:
            excluded: dict[str, Target] = {}
            served = False
            for op in OPERATIONS:
                for target, why in rows.get((name, op), ()):
                    if why is None:
                        served = True
                        break
                    excluded.setdefault(target.label, target)
                if served:
                    break
            if not served and excluded:
                found[name] = [
                    f"{label}: {excluded_by(target, tenant.compliance)}" for label, target in sorted(excluded.items())
                ]
        self._by_rows[id(rows)] = found
        return found

    def of(self, tenant: Tenant) -> list[tuple[str, list[str]]]:
        tables = self._index.tenant_tables.get(tenant.name)
        if tables is None:
            return []
        empty = self._empty(tenant, tables.rows)
        if "*" in tenant.allowed_routes:
            return list(empty.items())
        return [(name, empty[name]) for name in tenant.allowed_routes if name in empty]


def empty_routes(index: PolicyIndex, tenant: Tenant) -> list[tuple[str, list[str]]]:
    """Routes the tenant may use that its compliance leaves without any candidate, with the reasons
    (one tenant; `EmptyRoutes` for many)."""
    return EmptyRoutes(index).of(tenant)
