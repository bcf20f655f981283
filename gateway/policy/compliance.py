"""Compliance: whether a target (a model's deployment on a backend) is inside a tenant's envelope.

Pure, and a function of the policy alone: `gateway.policy.compile` evaluates it once per (compliance,
route, operation) when a policy is loaded; the engine reads the verdicts, never recomputes them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.policy.model import Compliance
from gateway.policy.places import BLOCS, expand

if TYPE_CHECKING:
    from gateway.policy.index import Target


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
