"""Provider evidence: what a provider reports about where inference ran, checked against what the policy
declares about the backend (`hosting.jurisdiction`). A mismatch is a compliance alert, counted
(`strait_compliance_evidence_mismatch_total{deployment}`): routing already trusted the declaration.

Anthropic reports `usage.inference_geo`: "us" (US infrastructure only) or "global" (any geography).
A reported place is read as a country or bloc code; "global" may be anywhere, so it is inside no
declared jurisdiction. Without a declared jurisdiction there is nothing to contradict.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from gateway.policy.index import Target

# Longest reported value kept on a usage record (a provider's field, never trusted to be short).
MAX_GEO_CHARS: Final = 32
_ANYWHERE: Final = frozenset({"GLOBAL", "ANY", "WORLDWIDE"})


def reported_geo(value: object) -> str | None:
    """The reported geography as recorded: a short string, or None when there is none."""
    if not isinstance(value, str) or not value:
        return None
    return value[:MAX_GEO_CHARS]


def contradicts(target: Target, geo: str) -> bool:
    """Whether a reported inference geography falls outside the backend's declared jurisdiction."""
    declared = target.backend.hosting.jurisdiction
    if not declared:
        return False
    place = geo.strip().upper()
    if not place or place in _ANYWHERE:
        return True
    return not target.places.satisfies(place, (declared,))
