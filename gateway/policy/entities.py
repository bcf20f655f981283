"""Who is who: a model's effective origin (fine-tunes inherit their base model's) and a backend's operator
as an entity with its chain of parents. Resolved once per policy (gateway.policy.index), read by compliance.

The loader refuses what cannot be resolved (an unknown base model or operator, a cycle) at its line
(gateway.policy.compliance_checks); these functions never raise on such a policy, they resolve it to
"unknown", which compliance treats as failing closed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway.policy.model import Model, Operator, Origin

# Longest chain of base models or parents followed (a policy's chains are short; a longer one is a cycle).
MAX_CHAIN = 64


def base_chain(name: str, models: Mapping[str, Model]) -> tuple[list[str], str | None]:
    """(the models from `name` up its `base_model` links, why the chain is broken or None)."""
    seen = [name]
    model = models.get(name)
    while model is not None and model.base_model is not None:
        base = model.base_model
        if base in seen:
            return [*seen, base], f"base_model cycle: {' -> '.join([*seen, base])}"
        if base not in models:
            return seen, f"unknown base_model {base!r}"
        seen.append(base)
        if len(seen) > MAX_CHAIN:
            return seen, "base_model chain too long"
        model = models[base]
    return seen, None


def effective_origin(name: str, models: Mapping[str, Model]) -> Origin | None:
    """The model's own origin, else the nearest base model's that declares one; None when unknown (or the
    chain is broken: an unknown base or a cycle)."""
    chain, broken = base_chain(name, models)
    if broken is not None:
        own = models[name].origin if name in models else None
        return own
    for link in chain:
        origin = models[link].origin
        if origin is not None:
            return origin
    return None


@dataclass(frozen=True, slots=True)
class Entity:
    """An operator resolved: its chain (itself, then each parent) as names lower-cased and headquarters
    (None where a link's headquarters is not declared, or the link is not a declared operator)."""

    names: tuple[str, ...]
    headquarters: tuple[str | None, ...]
    # False when the operator is not declared, or a parent is neither declared nor last in the chain.
    known: bool


UNKNOWN_ENTITY = Entity(names=(), headquarters=(None,), known=False)


def parent_chain(name: str, operators: Mapping[str, Operator]) -> tuple[list[str], str | None]:
    """(the names from `name` up its parents, why the chain is broken or None). A parent that is not a
    declared operator ends the chain (the loader refuses it)."""
    seen = [name]
    op = operators.get(name)
    while op is not None and op.parent is not None:
        parent = op.parent
        if parent in seen:
            return [*seen, parent], f"operator parent cycle: {' -> '.join([*seen, parent])}"
        seen.append(parent)
        if len(seen) > MAX_CHAIN:
            return seen, "operator parent chain too long"
        op = operators.get(parent)
    return seen, None


def entity(name: str | None, operators: Mapping[str, Operator]) -> Entity:
    if not name or name not in operators:
        return UNKNOWN_ENTITY if not name else Entity(names=(name.lower(),), headquarters=(None,), known=False)
    chain, broken = parent_chain(name, operators)
    if broken is not None:
        return Entity(names=tuple(n.lower() for n in chain), headquarters=(None,), known=False)
    hq: list[str | None] = []
    for link in chain:
        op = operators.get(link)
        # A parent that is not declared (the loader refuses it) has no known headquarters: fails closed.
        hq.append(op.headquarters.upper() if op is not None and op.headquarters else None)
    return Entity(names=tuple(n.lower() for n in chain), headquarters=tuple(hq), known=True)
