"""Places: blocs as sets of countries with one containment relation (gateway.policy.places), checked for
consistency, and the two properties compliance relies on, on generated bloc hierarchies:

- narrowing a request to a bloc contained in the tenant's allow-list is never refused as widening;
- a backend declared in a contained bloc is never excluded by the containing bloc's allow-list;

and that `strait policy check` reads a policy's own blocs exactly as the engine does.
"""

from __future__ import annotations

import itertools

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import PermissionDenied
from gateway.policy.checks import check_tenants
from gateway.policy.compliance import compliance_reason
from gateway.policy.engine import Preferences, RequestFeatures, decide
from gateway.policy.index import PolicyIndex, Principal
from gateway.policy.model import PolicySet
from gateway.policy.places import BUILTIN, BUILTIN_BLOCS, BlocCycle, Places, policy_places

USER_BLOCS = [
    ("FIVE_EYES", ["US", "GB", "CA", "AU", "NZ"]),
    ("ANZ", ["AU", "NZ"]),
    ("NORDICS", ["DK", "FI", "IS", "NO", "SE"]),
    ("EU_PLUS_UK", ["EU", "GB"]),
    ("WESTERN", ["EU_PLUS_UK", "FIVE_EYES", "EEA"]),
]


def _relation_is_consistent(places: Places) -> None:
    names = sorted(places.blocs)
    for a in names:
        # Every bloc covers countries only, never another bloc's name, and contains itself.
        assert places.blocs[a] and not places.blocs[a] & set(names), a
        assert places.contains(a, a)
    for a, b in itertools.permutations(names, 2):
        if places.contains(a, b) and places.contains(b, a):
            assert places.blocs[a] == places.blocs[b]  # antisymmetric up to equal sets
    for a, b, c in itertools.permutations(names, 3):
        if places.contains(a, b) and places.contains(b, c):
            assert places.contains(a, c), f"{c} ⊂ {b} ⊂ {a} but not {c} ⊂ {a}"


def test_builtin_relation_is_consistent_and_EU_is_inside_the_EEA() -> None:
    _relation_is_consistent(BUILTIN)
    assert BUILTIN.contains("EEA", "EU") and not BUILTIN.contains("EU", "EEA")
    assert BUILTIN.contains("EU", "DE") and BUILTIN.contains("EEA", "NO") and not BUILTIN.contains("EU", "NO")
    assert set(BUILTIN.blocs) == set(BUILTIN_BLOCS)


def test_user_blocs_relation_is_consistent() -> None:
    places = Places(USER_BLOCS)
    _relation_is_consistent(places)
    # Declared members are contained, transitively through blocs that contain blocs.
    for name, members in USER_BLOCS:
        for member in members:
            assert places.contains(name, member), (name, member)
    assert places.contains("WESTERN", "ANZ") and places.contains("WESTERN", "EU")
    assert places.contains("eea", "nordics")  # names ignore case
    assert not places.contains("NORDICS", "EEA")


def test_a_bloc_that_contains_itself_is_refused() -> None:
    with pytest.raises(BlocCycle) as info:
        Places([("A", ["B", "FR"]), ("B", ["C"]), ("C", ["A"])])
    assert info.value.cycle[0] == info.value.cycle[-1]


def test_satisfies_meets_and_narrows() -> None:
    p = Places(USER_BLOCS)
    assert p.satisfies("EU", ("EEA",)) and p.satisfies("ANZ", ("FIVE_EYES",)) and p.satisfies("nz", ("ANZ",))
    assert not p.satisfies("EEA", ("EU",)) and not p.satisfies(None, ("EU",)) and not p.satisfies("", ("EU",))
    assert p.meets("EEA", ("EU",)) and not p.meets("NO", ("EU",))
    assert p.narrows(("EU", "ANZ"), ("EEA", "FIVE_EYES")) == []
    assert p.narrows(("EEA", "DE"), ("EU",)) == ["EEA"]


# ---- properties on generated bloc hierarchies ----

COUNTRIES = ("US", "GB", "DE", "FR", "NO", "IS", "JP", "NZ", "CN")
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def hierarchies(draw: st.DrawFn) -> list[tuple[str, list[str]]]:
    """Up to five user blocs, each containing countries, built-in blocs, and blocs declared before it (so
    the hierarchy is acyclic, as the loader requires)."""
    out: list[tuple[str, list[str]]] = []
    for i in range(draw(st.integers(1, 5))):
        pool = [*COUNTRIES, "EU", "EEA", *(name for name, _ in out)]
        members = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=4, unique=True))
        out.append((f"BLOC{i}", members))
    return out


@st.composite
def contained_pairs(draw: st.DrawFn) -> tuple[list[tuple[str, list[str]]], str, str]:
    """A hierarchy and (outer, inner) with inner contained in outer."""
    blocs = draw(hierarchies())
    places = Places(blocs)
    names = [*places.blocs, *COUNTRIES]
    pairs = [(a, b) for a in places.blocs for b in names if places.contains(a, b)]
    outer, inner = draw(st.sampled_from(pairs))
    return blocs, outer, inner


def _policy(blocs: list[tuple[str, list[str]]], allowed: list[str], backend_place: str) -> PolicySet:
    return msgspec.convert(
        {
            "blocs": [{"name": n, "members": m} for n, m in blocs],
            "operators": [{"name": "o", "headquarters": "US"}],
            "backends": [
                {"name": "b", "adapter": "simulated", "hosting": {"operator": "o", "jurisdiction": backend_place}}
            ],
            "models": [{"name": "m", "deployments": [{"backend": "b", "upstream_model": "u"}]}],
            "routes": [{"name": "r", "models": ["m"]}],
            "tenants": [{"name": "t", "compliance": {"allowed_jurisdictions": allowed}}],
        },
        PolicySet,
    )


@SETTINGS
@given(hierarchies())
def test_every_generated_relation_is_consistent(blocs: list[tuple[str, list[str]]]) -> None:
    _relation_is_consistent(Places(blocs))


@SETTINGS
@given(contained_pairs())
def test_narrowing_to_a_contained_place_is_never_refused(case: tuple[list[tuple[str, list[str]]], str, str]) -> None:
    blocs, outer, inner = case
    index = PolicyIndex(_policy(blocs, [outer], inner))
    features = RequestFeatures(route="r", preferences=Preferences(jurisdictions=(inner,)))
    try:
        plan = decide(index, Principal(tenant="t", key_id="k", allowed_routes=None), features)
    except PermissionDenied as exc:
        raise AssertionError(f"narrowing {outer} to {inner} refused: {exc.code}: {exc.message}") from None
    # And the backend declared in the inner place is what it gets.
    assert [t.label for t in plan.targets] == ["m@b"]


@SETTINGS
@given(contained_pairs())
def test_a_backend_in_a_contained_place_is_never_excluded_by_the_containing_bloc(
    case: tuple[list[tuple[str, list[str]]], str, str],
) -> None:
    blocs, outer, inner = case
    index = PolicyIndex(_policy(blocs, [outer], inner))
    target = index.targets[("r", "chat")][0]
    assert compliance_reason(target, index.tenants["t"].compliance) is None
    # The converse direction of a deny-list: a backend inside a denied bloc is always excluded.
    denied = msgspec.structs.replace(
        index.tenants["t"].compliance, allowed_jurisdictions=None, denied_jurisdictions=(outer,)
    )
    assert compliance_reason(target, denied) is not None


@SETTINGS
@given(hierarchies(), st.data())
def test_the_checks_read_user_blocs_as_the_engine_does(blocs: list[tuple[str, list[str]]], data: st.DataObject) -> None:
    """`strait policy check` calls a tenant's jurisdictions impossible exactly when no backend could ever
    satisfy them in the engine: every country the allow-list covers is also denied (user blocs expanded
    the same way, through the loader's `policy_places`)."""
    places = policy_places(blocs)
    names = [*places.blocs, *COUNTRIES]
    allowed = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
    denied = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
    policy = _policy(blocs, allowed, "US")
    tenant = msgspec.structs.replace(
        policy.tenants[0],
        compliance=msgspec.structs.replace(policy.tenants[0].compliance, denied_jurisdictions=tuple(denied)),
    )
    policy = msgspec.structs.replace(policy, tenants=(tenant,))
    reported: list[str] = []
    check_tenants(policy, None, {"r"}, lambda _s, _p, reason, *rest: reported.append(reason), places)
    impossible = any("every allowed jurisdiction is also denied" in r for r in reported)
    # The engine's view: a backend in a single country is admitted iff that country is allowed and not denied.
    index_of = {c: PolicyIndex(_policy(blocs, allowed, c)) for c in places.expand(tuple(allowed))}
    admitted = [
        c
        for c, index in index_of.items()
        if compliance_reason(index.targets[("r", "chat")][0], tenant.compliance) is None
    ]
    assert impossible == (not admitted), (allowed, denied, admitted)
