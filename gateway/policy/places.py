"""Jurisdictions: ISO 3166 country codes and the blocs policies may name instead of a country.

A constraint naming a bloc admits the bloc itself and each member country; a constraint naming a
country admits only that country (a backend that only says "EU" might be anywhere in the EU).
"""

from __future__ import annotations

import functools
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
BLOCS: Final[dict[str, frozenset[str]]] = {
    "EU": _EU,
    # The EU plus Iceland, Liechtenstein and Norway.
    "EEA": _EU | {"IS", "LI", "NO"},
}


@functools.lru_cache(maxsize=1024)
def expand(places: tuple[str, ...]) -> frozenset[str]:
    """Everything a list of places admits, upper-cased: each bloc with its members, each country itself."""
    out: set[str] = set()
    for place in places:
        code = place.upper()
        out.add(code)
        out |= BLOCS.get(code, frozenset())
    return frozenset(out)
