"""Load-time checks of the compliance model's references, each reported at its file and line: operators
(a backend names a declared one; parents exist and never loop), fine-tunes (`base_model` names a model;
no cycle), blocs (members are countries or blocs; no bloc contains itself; built-ins are not redefined)
and every place a policy names (a two-letter country code or a bloc: a typo in a deny-list would
otherwise deny nothing).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, Final

from gateway.policy.entities import base_chain, parent_chain
from gateway.policy.model import PolicySet
from gateway.policy.places import BUILTIN_BLOCS, BlocCycle, Places

Report = Callable[..., None]
_COUNTRY: Final = re.compile(r"^[A-Za-z]{2}$")


def _place_problem(place: str, blocs: set[str]) -> str | None:
    if _COUNTRY.match(place) or place.upper() in blocs:
        return None
    return f"unknown place {place!r}: a two-letter ISO 3166 country code or a bloc ({', '.join(sorted(blocs))})"


def check_entities(policy: PolicySet, merged: PolicySet, source: Any, at: Report) -> None:
    """Check one decoded file against the merged policy (references may cross files)."""
    operators = {o.name: o for o in merged.operators}
    models = {m.name: m for m in merged.models}
    blocs = {b.name.upper() for b in merged.blocs} | set(BUILTIN_BLOCS)
    seen: set[str] = set()
    for i, o in enumerate(policy.operators):
        if o.name in seen:
            at(source, f"$.operators[{i}].name", f"duplicate operator name {o.name!r}")
        seen.add(o.name)
        if o.parent is not None and o.parent not in operators:
            at(source, f"$.operators[{i}].parent", f"operator {o.name!r}: unknown parent operator {o.parent!r}")
        else:
            _, broken = parent_chain(o.name, operators)
            if broken is not None:
                at(source, f"$.operators[{i}].parent", f"operator {o.name!r}: {broken}")
        if o.headquarters is not None and not _COUNTRY.match(o.headquarters):
            at(
                source,
                f"$.operators[{i}].headquarters",
                f"operator {o.name!r}: headquarters must be a two-letter ISO 3166 country code",
            )
    for i, b in enumerate(policy.backends):
        h = b.hosting
        if h.operator is not None and h.operator not in operators:
            declared = ", ".join(sorted(operators)) or "none declared"
            at(
                source,
                f"$.backends[{i}].hosting.operator",
                f"backend {b.name!r}: unknown operator {h.operator!r}: name an entry of `operators` ({declared})",
            )
        if h.jurisdiction is not None and (problem := _place_problem(h.jurisdiction, blocs)):
            at(source, f"$.backends[{i}].hosting.jurisdiction", f"backend {b.name!r}: {problem}")
    for i, m in enumerate(policy.models):
        if m.base_model is None:
            continue
        _, broken = base_chain(m.name, models)
        if broken is not None:
            at(source, f"$.models[{i}].base_model", f"model {m.name!r}: {broken}")
        if m.origin is not None and m.origin.country and (problem := _place_problem(m.origin.country, blocs)):
            at(source, f"$.models[{i}].origin.country", f"model {m.name!r}: {problem}")
    _check_blocs(policy, merged, source, at)
    for i, t in enumerate(policy.tenants):
        c = t.compliance
        base = f"$.tenants[{i}].compliance"
        lists: list[tuple[str, Iterable[str]]] = [
            ("allowed_jurisdictions", c.allowed_jurisdictions or ()),
            ("denied_jurisdictions", c.denied_jurisdictions),
            ("allowed_origin_countries", c.allowed_origin_countries or ()),
            ("denied_origin_countries", c.denied_origin_countries),
            ("allowed_operator_countries", c.allowed_operator_countries or ()),
            ("denied_operator_countries", c.denied_operator_countries),
        ]
        for j, r in enumerate(c.origin_rules):
            lists.append((f"origin_rules[{j}].origin_countries", r.origin_countries))
            lists.append((f"origin_rules[{j}].allowed_jurisdictions", r.allowed_jurisdictions or ()))
        for key, places in lists:
            for place in places:
                if problem := _place_problem(place, blocs):
                    at(source, f"{base}.{key}", f"tenant {t.name!r}: {key}: {problem}")
    for i, rule in enumerate(policy.rules):
        k = rule.then.constraints
        if k is None:
            continue
        for key, places in (
            ("allowed_jurisdictions", k.allowed_jurisdictions or ()),
            ("allowed_origin_countries", k.allowed_origin_countries or ()),
        ):
            for place in places:
                if problem := _place_problem(place, blocs):
                    at(source, f"$.rules[{i}].then.constraints.{key}", f"rule {rule.name!r}: {key}: {problem}")


def _check_blocs(policy: PolicySet, merged: PolicySet, source: Any, at: Report) -> None:
    names = [b.name.upper() for b in merged.blocs]
    known = set(names) | set(BUILTIN_BLOCS)
    for i, b in enumerate(policy.blocs):
        name = b.name.upper()
        if name in BUILTIN_BLOCS:
            at(source, f"$.blocs[{i}].name", f"bloc {b.name!r} is built in and cannot be redefined")
            continue
        if _COUNTRY.match(name):
            at(source, f"$.blocs[{i}].name", f"bloc {b.name!r}: a two-letter name is a country code")
        if names.count(name) > 1:
            at(source, f"$.blocs[{i}].name", f"duplicate bloc name {b.name!r}")
        for j, member in enumerate(b.members):
            if problem := _place_problem(member, known):
                at(source, f"$.blocs[{i}].members[{j}]", f"bloc {b.name!r}: {problem}")
    try:
        Places((b.name, b.members) for b in merged.blocs if b.name.upper() not in BUILTIN_BLOCS)
    except BlocCycle as exc:
        # Reported once, in the file that declares the bloc the cycle was found from.
        here = [i for i, b in enumerate(policy.blocs) if b.name.upper() == exc.cycle[0]]
        if here:
            at(source, f"$.blocs[{here[0]}].members", f"blocs contain each other in a cycle: {exc}")
