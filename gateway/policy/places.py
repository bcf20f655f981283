"""Places: ISO 3166 country codes and blocs, each bloc a set of countries, related by containment.

One relation, defined here once, answers every question a policy asks about places:

- a place *covers* a set of countries: a country itself, a bloc its members (members that are blocs
  count with their own members, transitively);
- a bloc A is *contained in* B when everything A covers B covers (EU ⊂ EEA);
- a jurisdiction *satisfies* an allow-list when every country it may be in is covered by the list: a
  backend that says "EU" might be anywhere in the EU, so it satisfies [EU] and [EEA] but not [DE];
- a jurisdiction *meets* a deny-list when one country it may be in is covered by the list;
- a request's places *narrow* a tenant's when everything they cover the tenant's cover: an EEA tenant
  may ask for ["EU"].

EU and EEA are built in; a policy adds its own (`blocs:`, e.g. FIVE_EYES), which may contain other blocs
but never themselves (the loader refuses a cycle, with its line). Names ignore case.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

_EU: Final = frozenset(
    [
        "AT",
        "BE",
        "BG",
        "HR",
        "CY",
        "CZ",
        "DK",
        "EE",
        "FI",
        "FR",
        "DE",
        "GR",
        "HU",
        "IE",
        "IT",
        "LV",
        "LT",
        "LU",
        "MT",
        "NL",
        "PL",
        "PT",
        "RO",
        "SK",
        "SI",
        "ES",
        "SE",
    ]
)
# Built-in blocs, as declared: members may be blocs (expanded by `Places`).
BUILTIN_BLOCS: Final[dict[str, tuple[str, ...]]] = {
    "EU": tuple(sorted(_EU)),
    # The EU plus Iceland, Liechtenstein and Norway.
    "EEA": ("EU", "IS", "LI", "NO"),
}
# Cache of expanded lists per Places: policy lists are few; client lists (bounded to 64 names each) could be
# many, so the cache is emptied when it grows past this.
_CACHE_MAX: Final = 4096


class BlocCycle(ValueError):
    """A bloc contains itself through its members; `cycle` lists the path."""

    def __init__(self, cycle: list[str]) -> None:
        self.cycle = cycle
        super().__init__(" -> ".join(cycle))


def _closure(declared: Mapping[str, tuple[str, ...]]) -> dict[str, frozenset[str]]:
    """Every bloc's countries, members' members included. Raises BlocCycle on a bloc that contains itself."""
    out: dict[str, frozenset[str]] = {}
    for name in declared:
        _visit(name, [], declared, out)
    return out


def _visit(
    name: str, path: list[str], declared: Mapping[str, tuple[str, ...]], out: dict[str, frozenset[str]]
) -> frozenset[str]:
    """`_closure`'s walk (a module function: a recursive closure is a reference cycle, garbage only the
    cyclic collector frees, and a policy load freezes what it built out of its reach)."""
    done = out.get(name)
    if done is not None:
        return done
    if name in path:
        raise BlocCycle([*path[path.index(name) :], name])
    countries: set[str] = set()
    for member in declared[name]:
        code = member.upper()
        if code in declared:
            countries |= _visit(code, [*path, name], declared, out)
        else:
            countries.add(code)
    out[name] = frozenset(countries)
    return out[name]


class Places:
    """The places vocabulary of one policy: the built-in blocs and the policy's own, expanded once."""

    def __init__(self, blocs: Iterable[tuple[str, Iterable[str]]] = ()) -> None:
        declared = dict(BUILTIN_BLOCS)
        for name, members in blocs:
            declared[name.upper()] = tuple(m.upper() for m in members)
        # bloc -> the countries it covers (never a bloc name).
        self.blocs: dict[str, frozenset[str]] = _closure(declared)
        self._lists: dict[tuple[str, ...], frozenset[str]] = {}

    def covers(self, place: str) -> frozenset[str]:
        """The countries a place may be: a bloc's members, or the country itself (upper-cased)."""
        code = place.upper()
        return self.blocs.get(code) or frozenset((code,))

    def expand(self, places: tuple[str, ...]) -> frozenset[str]:
        """The countries a list of places covers."""
        found = self._lists.get(places)
        if found is None:
            if len(self._lists) >= _CACHE_MAX:
                self._lists.clear()
            found = frozenset().union(*(self.covers(p) for p in places)) if places else frozenset()
            self._lists[places] = found
        return found

    def contains(self, outer: str, inner: str) -> bool:
        """Whether everything `inner` covers `outer` covers (a bloc contains itself)."""
        return self.covers(inner) <= self.covers(outer)

    def satisfies(self, place: str | None, allowed: tuple[str, ...]) -> bool:
        """Whether a jurisdiction is inside an allow-list: every country it may be in is listed. An
        unknown place satisfies nothing."""
        return bool(place) and self.covers(place or "") <= self.expand(allowed)

    def meets(self, place: str, denied: tuple[str, ...]) -> frozenset[str]:
        """The countries of a deny-list the place may be in (empty: it is outside the deny-list)."""
        return self.covers(place) & self.expand(denied)

    def narrows(self, asked: tuple[str, ...], allowed: tuple[str, ...]) -> list[str]:
        """The places of `asked` that cover anything outside `allowed` (empty: `asked` only narrows)."""
        room = self.expand(allowed)
        return [p for p in asked if not self.covers(p) <= room]


# The built-in vocabulary, for code that has no policy at hand.
BUILTIN: Final = Places()


def policy_places(blocs: Iterable[tuple[str, Iterable[str]]]) -> Places:
    """A policy's places for its load-time checks, read as the engine reads them (its own blocs with the
    built-in ones); the built-in ones alone when its blocs contain each other in a cycle or redefine a
    built-in one (both refused at their line by gateway.policy.compliance_checks)."""
    try:
        return Places((name, members) for name, members in blocs if name.upper() not in BUILTIN_BLOCS)
    except BlocCycle:
        return BUILTIN
