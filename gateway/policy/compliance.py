"""Compliance: whether a target (a model's deployment on a backend) is inside a tenant's envelope.

Pure, and a function of the policy alone: `gateway.policy.compile` evaluates it once per (compliance,
route, operation) when a policy is loaded; the engine reads the verdicts, never recomputes them.

Every attribute fails closed when unknown, for allow-lists, deny-lists and maximums alike (the rules,
one per attribute, are written out in policies/README.md §4):

- inference jurisdiction: unknown satisfies no allow-list and meets every deny-list; a bloc satisfies an
  allow-list only when the list covers all of it, and meets a deny-list when it overlaps it;
- origin (the model's, or its base model's): unknown country or developer satisfies no allow-list and
  meets every deny-list; every origin rule applies to a model of unknown origin, a rule listing countries
  to a model of unknown country, a rule listing developers to a model of unknown developer; a refusal
  names how the rule matched (`origin_rule_match`);
- operator: an operator not declared, or one whose headquarters (or a parent's) is not declared,
  satisfies no allow-list and meets every deny-list on headquarters;
- retention: unknown exceeds every maximum; training: not declared `trains_on_data: false` fails
  `no_training`; certifications: only those declared count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.policy.model import Compliance, OriginRule

if TYPE_CHECKING:
    from gateway.policy.index import Target
    from gateway.policy.places import Places


def _names(values: tuple[str, ...]) -> frozenset[str]:
    return frozenset(v.lower() for v in values)


def _denied_place(what: str, place: str, denied: tuple[str, ...], places: Places) -> str | None:
    """Fail closed against a deny-list: a listed place, an unknown one, or a bloc with a listed member."""
    if not denied:
        return None
    if not place:
        return f"{what} unknown (it may be a denied one)"
    overlap = places.meets(place, denied)
    if not overlap:
        return None
    if places.covers(place) <= overlap:
        return f"{what} {place} is denied"
    return f"{what} {place} may be in denied {sorted(overlap)}"


def _operator_reason(target: Target, c: Compliance) -> str | None:
    op = target.operator
    name = target.backend.hosting.operator or "unknown"
    if c.denied_operators:
        denied = _names(c.denied_operators)
        if not op.names:
            return "operator unknown (it may be a denied one)"
        hit = next((n for n in op.names if n in denied), None)
        if hit is not None:
            return f"operator {name} is denied" if hit == op.names[0] else f"operator {name} belongs to denied {hit}"
    if c.allowed_operator_countries is None and not c.denied_operator_countries:
        return None
    places = target.places
    if not op.known or any(hq is None for hq in op.headquarters):
        return f"operator {name} has no declared headquarters (for its parents too); it may be anywhere"
    countries = [hq for hq in op.headquarters if hq is not None]
    if c.allowed_operator_countries is not None:
        outside = [hq for hq in countries if not places.satisfies(hq, c.allowed_operator_countries)]
        if outside:
            return (
                f"operator {name} is headquartered in {outside[0]}"
                + ("" if outside[0] == countries[0] else " (through its parent)")
                + f", not in the allowed {list(c.allowed_operator_countries)}"
            )
    for i, hq in enumerate(countries):
        if places.meets(hq, c.denied_operator_countries):
            via = "" if i == 0 else " (through its parent)"
            return f"operator {name} is headquartered in denied {hq}{via}"
    return None


def origin_rule_match(rule: OriginRule, places: Places, country: str, developer: str) -> str | None:
    """Which models an origin rule reaches this one as, worded for a reason ("models developed by
    DeepSeek", "CN-origin models"), or None when the rule does not apply to it. A developer the rule
    lists is named first (the more specific match), then a country (or a bloc the model's country may be
    in). What the rule asks about and the model does not declare fails closed: a model of unknown origin
    could be of any, one of unknown country could be of a listed country, one of unknown developer could
    be by a listed developer."""
    dev = developer.lower()
    if dev and dev in _names(rule.developers):
        return f"models developed by {developer}"
    if country and places.meets(country, rule.origin_countries):
        return f"{country}-origin models"
    if not country and not dev:
        return "models of unknown origin"
    if not country and rule.origin_countries:
        return f"models of unknown origin country (developed by {developer})"
    if not dev and rule.developers:
        return f"{country}-origin models of unknown developer"
    return None


def _origin_rule_reason(target: Target, rule: OriginRule, country: str, developer: str) -> str | None:
    places = target.places
    matched = origin_rule_match(rule, places, country, developer)
    if matched is None:
        return None
    dev = developer.lower()
    juris = target.backend.hosting.jurisdiction
    if rule.allowed_tiers is not None and target.backend.tier not in rule.allowed_tiers:
        return f"{matched} may run only on tiers {list(rule.allowed_tiers)}"
    if rule.allowed_jurisdictions is not None and not places.satisfies(juris, rule.allowed_jurisdictions):
        return f"{matched} may run only in {list(rule.allowed_jurisdictions)}"
    if rule.deny_developer_operated:
        names = target.operator.names
        if not names:
            return f"{matched} may not run on their developer's own service (operator unknown)"
        if not dev:
            return f"{matched} may not run on their developer's own service (developer unknown)"
        if dev in names:
            via = "" if names[0] == dev else f" ({target.backend.hosting.operator} belongs to {developer})"
            return f"{matched} may not run on their developer's own service{via}"
    return None


def compliance_reason(target: Target, c: Compliance) -> str | None:
    """Why `target` is outside the compliance envelope `c`, or None. Unknown attributes fail closed:
    against allow-lists, deny-lists and maximums alike. Developer and operator names ignore case."""
    h = target.backend.hosting
    places = target.places
    juris = (h.jurisdiction or "").upper()
    origin = target.origin
    country = ((origin.country if origin else None) or "").upper()
    developer = (origin.developer if origin else None) or ""
    dev = developer.lower()
    if c.allowed_jurisdictions is not None and not places.satisfies(juris, c.allowed_jurisdictions):
        return f"hosting jurisdiction {juris or 'unknown'} is not in the allowed {list(c.allowed_jurisdictions)}"
    reason = _denied_place("hosting jurisdiction", juris, c.denied_jurisdictions, places)
    if reason:
        return reason
    if c.allowed_origin_countries is not None and not places.satisfies(country, c.allowed_origin_countries):
        return f"model origin {country or 'unknown'} is not in the allowed {list(c.allowed_origin_countries)}"
    reason = _denied_place("model origin", country, c.denied_origin_countries, places)
    if reason:
        return reason
    if c.allowed_developers is not None and dev not in _names(c.allowed_developers):
        return f"model developer {developer or 'unknown'} is not allowed"
    if c.denied_developers and (not dev or dev in _names(c.denied_developers)):
        return f"model developer {developer} is denied" if dev else "model developer unknown (it may be a denied one)"
    if c.allowed_tiers is not None and target.backend.tier not in c.allowed_tiers:
        return f"tier {target.backend.tier} is not allowed"
    reason = _operator_reason(target, c)
    if reason:
        return reason
    if c.max_retention_days is not None and (h.retention_days is None or h.retention_days > c.max_retention_days):
        kept = "unknown" if h.retention_days is None else f"{h.retention_days} days"
        return f"retention {kept} exceeds the allowed {c.max_retention_days} days"
    if c.no_training and h.trains_on_data is not False:
        if h.trains_on_data is None:
            return "the operator does not declare trains_on_data: false (it may train on request data)"
        return "the operator trains on request data"
    missing = [cert for cert in c.required_certifications if cert not in h.certifications]
    if missing:
        return f"missing certifications {missing}"
    for rule in c.origin_rules:
        reason = _origin_rule_reason(target, rule, country, developer)
        if reason:
            return reason
    return None
