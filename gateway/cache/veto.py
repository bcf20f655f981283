"""The semantic tier's veto: cheap lexical checks that refuse a near neighbour whose meaning differs in a
way sentence embeddings are known to miss (one-word traps: another number or date, a negation, another
named thing). Pure Python, no model: it runs after the cosine threshold, on the few candidates above it.

The rules and word lists are general English (numbers and dates, negation, opposites, names, swapped
`from X to Y` roles), but they were extended after reading the false hits on the fow-cache benchmark, so
that benchmark's numbers for them are in-sample (docs/cache.md says how much). `veto(query, candidate)`
returns the first objection, or None; it is symmetric.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from typing import Final


def _words(words: str) -> list[str]:
    return words.split()


def _set(words: str) -> frozenset[str]:
    return frozenset(words.split())


# Words, numbers (with their decimal/thousands/time/date separators), and possessive 's kept on the word.
_TOKEN = re.compile(r"\d+(?:[.,:/]\d+)*|[^\W\d_]+(?:['\u2019][^\W\d_]+)*")

# Number words; not `one` (a pronoun: "quick one") nor `second` ("a second").
NUMBER_WORDS: Final = _set(
    "zero two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand million "
    "billion trillion dozen half quarter twice double triple first third fourth fifth sixth seventh "
    "eighth ninth tenth once"
)
# Dates and times named by words: another day is another answer. Not `may`, `march`, `fall` (verbs).
DATE_WORDS: Final = _set(
    "monday tuesday wednesday thursday friday saturday sunday weekday weekdays weekend weekends january february "
    "april june july august september october november december today tomorrow yesterday tonight "
    "morning afternoon evening night overnight daily weekly monthly yearly annual annually quarterly "
    "spring summer autumn winter christmas easter am pm"
)
# Negation: how many of these a text holds must match (`can't` and `cannot` both count once).
NEGATIONS: Final = _set(
    "not no never none nothing nobody nowhere neither nor without non cannot cant dont doesnt didnt isnt arent "
    "wasnt werent wont wouldnt shouldnt couldnt hasnt havent hadnt mustnt"
)
# Polarity words whose presence on one side only reverses the question, whatever the other side says.
POLARITY: Final = _set("off avoid unsafe")
# Opposites: one side holding a word of one group and the other side a word of the opposite group (and not
# the first) is another question. Synonyms inside a group never object ("start" / "begin").
_OPPOSITES: Final[tuple[tuple[str, str], ...]] = (
    ("open opened opening", "closed close closing shut"),
    ("safe safely", "unsafe dangerous harmful"),
    ("allowed allow allows permitted permit", "banned ban forbidden forbid prohibited prohibit"),
    ("include included includes including", "exclude excluded excludes excluding"),
    ("hot warm hotter warmer", "cold cool colder cooler"),
    ("best", "worst"),
    ("pass passed passing", "fail failed failing"),
    ("increase increased increases increasing raise raised rise", "decrease decreased decreases reduce reduced lower"),
    ("compulsory mandatory required", "optional"),
    ("benefits advantages pros", "drawbacks disadvantages cons risks"),
    ("most", "least"),
    ("more", "less fewer"),
    ("over above", "under below"),
    ("am", "pm"),
    ("men man male", "women woman female"),
    ("adult adults", "child children kids"),
    ("full", "part"),
    ("buy buying bought purchase", "sell selling sold"),
    ("import", "export"),
    ("upload", "download"),
    ("enable enabled", "disable disabled"),
    ("add adding", "remove removing delete deleting"),
    ("start starting begin", "stop stopping end finish"),
    ("deposit", "withdraw withdrawal"),
    ("before", "after"),
    ("early earlier earliest", "late later latest"),
    ("cheapest", "dearest priciest"),
    ("first", "last"),
    ("accept accepted", "reject rejected decline declined refuse refused"),
    ("win won winning", "lose lost losing"),
    ("arrive arrival arrivals", "depart departure departures"),
    ("inbound incoming", "outbound outgoing"),
    ("maximum max", "minimum min"),
    ("upgrade", "downgrade"),
    ("in", "out"),
)
OPPOSITES: Final[dict[str, frozenset[str]]] = {}
for _one, _other in _OPPOSITES:
    for _w in _one.split():
        OPPOSITES[_w] = OPPOSITES.get(_w, frozenset()) | _set(_other)
    for _w in _other.split():
        OPPOSITES[_w] = OPPOSITES.get(_w, frozenset()) | _set(_one)
# Prepositions that give a word a role (`from X to Y`): the same words in swapped roles is another question.
_DIRECTIONS: Final = _set("to from into onto than vs versus")
# Number words as digits, so "fifteen" matches "15".
_DIGITS: Final = {
    w: str(i)
    for i, w in enumerate(
        _words(
            "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
            "sixteen seventeen eighteen nineteen twenty"
        )
    )
} | {
    "thirty": "30",
    "forty": "40",
    "fifty": "50",
    "sixty": "60",
    "seventy": "70",
    "eighty": "80",
    "ninety": "90",
    "hundred": "100",
    "thousand": "1000",
    "million": "1000000",
    "dozen": "12",
}
_SKIP_AFTER_DIRECTION: Final = _set("a an the my your our their his her its this that")
# Negating prefixes: `unsubscribe` against `subscribe`, `disallow` against `allow`.
_PREFIXES: Final = ("un", "dis", "non", "de", "in", "im", "il", "ir", "anti")
# Capitalised words that are not names.
_NOT_NAMES: Final = _set("i i'm i've i'd i'll ok hi hello hey thanks please dear")


def _fold(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


def _word(raw: str) -> str:
    """A token as the rules compare it: lower case, `don't` -> `dont` (NEGATIONS holds it), `Bob's` -> `bob`."""
    w = raw.lower().replace("\u2019", "'")
    if w.endswith("n't"):
        return w.replace("'", "")
    return w[:-2] if w.endswith("'s") else w


_SENTENCE_END = re.compile(r"[.?!:]")


class Analysed:
    """What the rules read of one text, computed once: its words (lower case, in order), the set of them,
    and the ones that look like names: a capital letter inside the word (`iPhone`, `HubSpot`), an acronym
    (`HMRC`), or a capitalised word that does not start a sentence. Both come from one pass, so a text's
    names are always among its own words."""

    __slots__ = ("names", "word_set", "words")

    def __init__(self, text: str) -> None:
        folded = _fold(text)
        words: list[str] = []
        names: set[str] = set()
        prev_end = 0
        for m in _TOKEN.finditer(folded):
            raw = m.group(0)
            w = _word(raw)
            words.append(w)
            starts_sentence = prev_end == 0 or _SENTENCE_END.search(folded, prev_end, m.start()) is not None
            prev_end = m.end()
            if not raw[0].isalpha() or w in _NOT_NAMES:
                continue
            upper = raw.isupper()
            acronym = upper and len(raw) > 1
            inner_capital = not upper and raw[1:] != raw[1:].lower()
            capitalised = raw[0].isupper() and not starts_sentence
            if acronym or inner_capital or capitalised:
                names.add(w)
        self.words = words
        self.word_set = frozenset(words)
        self.names = frozenset(names)


def tokens(text: str) -> list[str]:
    return Analysed(text).words


def _numbers_of(words: list[str]) -> frozenset[str]:
    out = set()
    for t in words:
        if t[0].isdigit():
            out.add(t.replace(",", ""))
        elif t in NUMBER_WORDS or t in DATE_WORDS:
            out.add(_DIGITS.get(t, t))
    return frozenset(out)


def numbers(text: str) -> frozenset[str]:
    """Digits (commas as thousands separators dropped), number words as digits, and date words."""
    return _numbers_of(tokens(text))


def names(text: str) -> frozenset[str]:
    return Analysed(text).names


def _negations(words: list[str]) -> int:
    return sum(w in NEGATIONS for w in words)


def _prefix_flip(a: frozenset[str], b: frozenset[str]) -> str | None:
    """A word on one side whose negated form (by prefix) is on the other: `mute` / `unmute`."""
    for x, y in ((a, b), (b, a)):
        for w in sorted(x - y):
            for p in _PREFIXES:
                if w.startswith(p) and len(w) - len(p) >= 3 and w[len(p) :] in y:
                    return f"{w[len(p) :]}/{w}"
    return None


def _opposite(a: frozenset[str], b: frozenset[str]) -> str | None:
    """A word on one side whose opposite is on the other side (and the word itself is not)."""
    for x, y in ((a, b), (b, a)):
        for w in sorted(x - y):
            hit = sorted((OPPOSITES.get(w, frozenset()) & y) - x)
            if hit:
                return f"{w}/{hit[0]}"
    return None


def _roles(words: list[str]) -> set[tuple[str, str]]:
    """(preposition, the word it governs) for the direction prepositions, determiners skipped. `to` counts
    only beside a `from` (alone it is mostly an infinitive: "how much notice to give")."""
    out = set()
    with_from = "from" in words
    for i, w in enumerate(words):
        if w in _DIRECTIONS and (w != "to" or with_from):
            j = i + 1
            while j < len(words) and words[j] in _SKIP_AFTER_DIRECTION:
                j += 1
            if j < len(words):
                out.add((w, words[j]))
    return out


def _numbers_rule(q: Analysed, c: Analysed) -> str | None:
    return "numbers differ" if _numbers_of(q.words) != _numbers_of(c.words) else None


def _negation_rule(q: Analysed, c: Analysed) -> str | None:
    if _negations(q.words) != _negations(c.words) or (q.word_set ^ c.word_set) & POLARITY:
        return "negation differs"
    if _prefix_flip(q.word_set, c.word_set) or _opposite(q.word_set, c.word_set):
        return "negation differs"
    return None


def _direction_rule(q: Analysed, c: Analysed) -> str | None:
    # The same things in other roles: "from savings to current" against "from current to savings".
    rq, rc = _roles(q.words), _roles(c.words)
    for p, x in rq - rc:
        if x in c.word_set and any(y in q.word_set for p2, y in rc - rq if p2 == p):
            return "direction differs"
    return None


def _names_rule(q: Analysed, c: Analysed) -> str | None:
    # A name on one side must be a word of the other, in any case ("visa" answers "Visa").
    if not (q.names <= c.word_set and c.names <= q.word_set):
        return "names differ"
    return None


RULES: Final[dict[str, Callable[[Analysed, Analysed], str | None]]] = {
    "numbers": _numbers_rule,
    "negation": _negation_rule,
    "names": _names_rule,
    "direction": _direction_rule,
}
# The rules `veto` applies (the measured set; cache_eval measures each one alone too).
DEFAULT_RULES: Final = ("numbers", "negation", "names", "direction")


def veto(query: str | Analysed, candidate: str | Analysed, rules: tuple[str, ...] = DEFAULT_RULES) -> str | None:
    """Why `candidate`'s answer must not be served for `query` (e.g. "numbers differ"), or None. Either may
    be given already analysed (`Analysed(text)`), so a query checked against several candidates is read once."""
    if not rules:
        return None
    q = query if isinstance(query, Analysed) else Analysed(query)
    c = candidate if isinstance(candidate, Analysed) else Analysed(candidate)
    for name in rules:
        reason = RULES[name](q, c)
        if reason is not None:
            return reason
    return None
