"""The semantic tier's veto: cheap lexical checks that refuse a near neighbour whose meaning differs in a
way sentence embeddings are known to miss (one-word traps: another number or date, a negation, another
named thing). Pure Python, no model: it runs after the cosine threshold, on the few candidates above it.

Each rule was kept because it removed false hits on the fow-cache benchmark for less recall than it saved
(docs/cache.md has the per-rule table); `veto(query, candidate)` returns the first objection, or None.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from typing import Final


def _set(words: str) -> frozenset[str]:
    return frozenset(words.split())


# Words, numbers (with their decimal/thousands/time/date separators), and possessive 's kept on the word.
_TOKEN = re.compile(r"\d+(?:[.,:/]\d+)*|[^\W\d_]+(?:['\u2019][^\W\d_]+)*")

NUMBER_WORDS: Final = _set(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand million "
    "billion trillion dozen half quarter twice double triple first second third fourth fifth sixth seventh "
    "eighth ninth tenth once"
)
# Dates and times named by words: another day is another answer.
DATE_WORDS: Final = _set(
    "monday tuesday wednesday thursday friday saturday sunday weekday weekdays weekend weekends january february "
    "march april may june july august september october november december today tomorrow yesterday tonight "
    "morning afternoon evening night overnight daily weekly monthly yearly annual annually quarterly "
    "spring summer autumn fall winter christmas easter"
)
# Negation and polarity: the presence of any of these on one side only changes the question. `may` and
# `march` are months and verbs; they count as dates on both sides alike, so they only object to a change.
NEGATIONS: Final = _set(
    "not no never none nothing nobody nowhere neither nor without cannot cant dont doesnt didnt isnt arent wasnt "
    "werent wont wouldnt shouldnt couldnt hasnt havent hadnt mustnt"
)
POLARITY: Final = _set(
    "unsafe safe disable enable disabled enabled off closed open avoid cancel deny decrease increase remove add "
    "delete sell buy before after stop start exclude include reject accept refuse allow forbid ban lower raise "
    "less more minimum maximum min max lose gain withdraw deposit upgrade downgrade import export"
)
# Negating prefixes: `unsubscribe` against `subscribe`, `disallow` against `allow`.
_PREFIXES: Final = ("un", "dis", "non", "de", "in", "im", "il", "ir", "anti", "re")
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


class _Text:
    """One text's words (lower case, in order) and the ones that look like names: a capital letter inside
    the word (`iPhone`, `HubSpot`), an acronym (`HMRC`), or a capitalised word that does not start a
    sentence. Both come from one pass, so a text's names are always among its own words."""

    __slots__ = ("names", "words")

    def __init__(self, text: str) -> None:
        folded = _fold(text)
        self.words: list[str] = []
        self.names: set[str] = set()
        prev_end = 0
        for m in _TOKEN.finditer(folded):
            raw = m.group(0)
            w = _word(raw)
            self.words.append(w)
            starts_sentence = prev_end == 0 or any(ch in ".?!:" for ch in folded[prev_end : m.start()])
            prev_end = m.end()
            if not raw[0].isalpha():
                continue
            inner_capital = any(ch.isupper() for ch in raw[1:]) and not raw.isupper()
            acronym = len(raw) > 1 and raw.isupper()
            capitalised = raw[0].isupper() and not starts_sentence
            if (inner_capital or acronym or capitalised) and w not in _NOT_NAMES:
                self.names.add(w)


def tokens(text: str) -> list[str]:
    return _Text(text).words


def numbers(text: str) -> frozenset[str]:
    """Digits (commas as thousands separators dropped), number words, and date words."""
    out = set()
    for t in tokens(text):
        if t[0].isdigit():
            out.add(t.replace(",", ""))
        elif t in NUMBER_WORDS or t in DATE_WORDS:
            out.add(t)
    return frozenset(out)


def names(text: str) -> frozenset[str]:
    return frozenset(_Text(text).names)


def _polarity(words: list[str]) -> frozenset[str]:
    return frozenset(w for w in words if w in NEGATIONS or w in POLARITY)


def _prefix_flip(a: set[str], b: set[str]) -> str | None:
    """A word on one side whose negated form (by prefix) is on the other: `mute` / `unmute`."""
    for x, y in ((a, b), (b, a)):
        for w in sorted(x - y):
            for p in _PREFIXES:
                if w.startswith(p) and len(w) - len(p) >= 3 and w[len(p) :] in y:
                    return f"{w[len(p) :]}/{w}"
    return None


def _numbers_rule(q: str, c: str) -> str | None:
    return "numbers differ" if numbers(q) != numbers(c) else None


def _negation_rule(q: str, c: str) -> str | None:
    wq, wc = tokens(q), tokens(c)
    if _polarity(wq) != _polarity(wc):
        return "negation differs"
    flip = _prefix_flip(set(wq), set(wc))
    return "negation differs" if flip else None


def _names_rule(q: str, c: str) -> str | None:
    # A name on one side must be a word of the other, in any case ("visa" answers "Visa").
    tq, tc = _Text(q), _Text(c)
    if not (tq.names <= set(tc.words) and tc.names <= set(tq.words)):
        return "names differ"
    return None


RULES: Final[dict[str, Callable[[str, str], str | None]]] = {
    "numbers": _numbers_rule,
    "negation": _negation_rule,
    "names": _names_rule,
}
# The rules `veto` applies (the measured set; cache_eval measures each one alone too).
DEFAULT_RULES: Final = ("numbers", "negation", "names")


def veto(query: str, candidate: str, rules: tuple[str, ...] = DEFAULT_RULES) -> str | None:
    """Why `candidate`'s answer must not be served for `query` (e.g. "numbers differ"), or None."""
    for name in rules:
        reason = RULES[name](query, candidate)
        if reason is not None:
            return reason
    return None
