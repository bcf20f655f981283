"""Redaction of captured text (gateway.contracts.TextRedactor): the built-in pattern redactor and the
lookup of plugin redactors by name.

`PatternRedactor(kinds)` replaces, in this order (an earlier kind wins where two would match):
  api_key  provider keys by their prefixes (sk-, sk_live_, ghp_, github_pat_, xox?-, AKIA, AIza, glpat-,
           hf_, ...), `Bearer <token>`, and any run of 32+ key characters holding both a letter and a digit
  email    local@domain.tld
  iban     two letters, two check digits, 11-30 more letters/digits (spaces allowed), valid mod 97
  card     13-19 digits (spaces or dashes between them) passing the Luhn check
  ip       IPv6 (validated by `ipaddress`) and dotted-quad IPv4
  phone    9-15 digits in the shapes people write them (+, 00, brackets, spaces, dots, dashes); 7-15
           after a `+`
with `[EMAIL]`, `[PHONE]`, `[CARD]`, `[IBAN]`, `[API_KEY]`, `[IP]`: none of which any kind matches, so
redacting twice changes nothing. A number that fails its check (Luhn, mod 97) is not redacted as that
kind; it may still be a phone number. Text with no digit, no `@` and no `:` is never changed.

`redactor_for(names)` composes the tenant's list: built-in kinds in one PatternRedactor, plugins (entry
point `strait.redactors`) after it, in the order named. `known_redactors()` is what a policy may name.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from functools import cache
from importlib.metadata import entry_points

from gateway.contracts import RedactorFactory, TextRedactor
from gateway.policy.model import BUILTIN_REDACTIONS

ENTRY_POINT = "strait.redactors"

_API_KEY = re.compile(
    r"(?:"
    r"\b(?:sk|pk|rk)[-_](?:live[-_]|test[-_]|proj[-_]|ant[-_]api\d\d[-_])?[A-Za-z0-9_-]{16,}"
    r"|\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{20,}"
    r"|\bgithub_pat_[A-Za-z0-9_]{20,}"
    r"|\bxox[abprs]-[A-Za-z0-9-]{10,}"
    r"|\bAKIA[0-9A-Z]{16}\b"
    r"|\bAIza[0-9A-Za-z_-]{30,}"
    r"|\bglpat-[A-Za-z0-9_-]{16,}"
    r"|\bhf_[A-Za-z0-9]{20,}"
    r"|\b[Bb]earer\s+[A-Za-z0-9._~+/=-]{16,}"
    r")"
)
# Any long run of key characters: a key when it mixes letters and digits (checked by `_long_token`).
_LONG_TOKEN = re.compile(r"(?<![A-Za-z0-9_+/=-])[A-Za-z0-9_+/=-]{32,}")
_DIGIT = re.compile(r"[0-9]")
_LETTER = re.compile(r"[A-Za-z]")
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}")
_CARD = re.compile(r"(?<![0-9])[0-9](?:[ -]?[0-9]){12,18}(?![0-9])")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|[0-9]{1,3}(?:\.[0-9]{1,3}){3})?(?![\w:])")
_IPV4 = re.compile(
    r"(?<![0-9])(?<![0-9]\.)(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}"
    r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(?![0-9])(?!\.[0-9])"
)
_PHONE = re.compile(r"(?<![\w+(])(?:\+|00)?\(?[0-9](?:(?:\) ?|[ .-])?[0-9]){6,16}(?![\w:])")

PLACEHOLDERS = {
    "email": "[EMAIL]",
    "phone": "[PHONE]",
    "card": "[CARD]",
    "iban": "[IBAN]",
    "api_key": "[API_KEY]",
    "ip": "[IP]",
}


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_valid(compact: str) -> bool:
    """ISO 13616: the first four characters moved to the end, letters as 10..35, the number mod 97 is 1."""
    if not 15 <= len(compact) <= 34:
        return False
    moved = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _redact_ibans(text: str) -> str:
    """Each candidate's longest prefix that is a valid IBAN, replaced; the scan goes on after it (a
    candidate may run on into the next word, or the next IBAN)."""
    out: list[str] = []
    pos = 0
    while (match := _IBAN.search(text, pos)) is not None:
        start = match.start()
        positions = [i for i in range(start, match.end()) if text[i] != " "]
        compact = "".join(text[i] for i in positions)
        end = next(
            (positions[n - 1] + 1 for n in range(min(len(compact), 34), 14, -1) if iban_valid(compact[:n])), None
        )
        if end is None:
            out.append(text[pos : start + 1])
            pos = start + 1
            continue
        out += [text[pos:start], "[IBAN]"]
        pos = end
    out.append(text[pos:])
    return "".join(out)


def _long_token(match: re.Match[str]) -> str:
    text = match.group(0)
    return "[API_KEY]" if _DIGIT.search(text) and _LETTER.search(text) else text


def _card(match: re.Match[str]) -> str:
    text = match.group(0)
    digits = "".join(c for c in text if c.isdigit())
    return "[CARD]" if 13 <= len(digits) <= 19 and luhn_valid(digits) else text


def _ipv6(match: re.Match[str]) -> str:
    text = match.group(0)
    if text.count(":") < 2:
        return text
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return text
    return "[IP]"


def _phone(match: re.Match[str]) -> str:
    text = match.group(0)
    digits = sum(c.isdigit() for c in text)
    international = text.startswith(("+", "00"))
    if (7 if international else 9) <= digits <= 15:
        return "[PHONE]"
    return text


def _sub(pattern: re.Pattern[str], replacement: str | Callable[[re.Match[str]], str]) -> Callable[[str], str]:
    return lambda text: pattern.sub(replacement, text)


# Each kind's steps, and what a text must hold for the step to find anything, worked out once per text
# (`_traits`): a prompt without a digit skips the number kinds' scans, so the common case costs a few
# string searches. A placeholder adds no digit, `@`, `:` or key mark, so the traits of the text as given
# stay true (or conservatively so) through every step.
_KEY_MARK = re.compile(r"[spr]k[-_]|gh|xox|AKIA|AIza|glpat-|hf_|earer")
DIGIT, AT, COLONS, DOT, KEY = 1, 2, 4, 8, 16


def _traits(text: str) -> int:
    traits = 0
    if _DIGIT.search(text) is not None:
        traits |= DIGIT
        if "." in text:
            traits |= DOT
    if "@" in text:
        traits |= AT
    if text.count(":") >= 2:
        traits |= COLONS
    if _KEY_MARK.search(text) is not None:
        traits |= KEY
    return traits


_STEPS: dict[str, tuple[tuple[Callable[[str], str], int], ...]] = {
    "api_key": ((_sub(_API_KEY, "[API_KEY]"), KEY), (_sub(_LONG_TOKEN, _long_token), DIGIT)),
    "email": ((_sub(_EMAIL, "[EMAIL]"), AT),),
    "iban": ((_redact_ibans, DIGIT),),
    "card": ((_sub(_CARD, _card), DIGIT),),
    "ip": ((_sub(_IPV6, _ipv6), COLONS), (_sub(_IPV4, "[IP]"), DOT)),
    "phone": ((_sub(_PHONE, _phone), DIGIT),),
}
# The order kinds run in, whatever order a policy names them in.
_ORDER = ("api_key", "email", "iban", "card", "ip", "phone")
assert set(_ORDER) == set(BUILTIN_REDACTIONS) == set(_STEPS)


class PatternRedactor:
    """The built-in redactor over the given kinds (all of them by default)."""

    name = "patterns"

    def __init__(self, kinds: Iterable[str] = BUILTIN_REDACTIONS) -> None:
        wanted = set(kinds)
        unknown = wanted - set(_STEPS)
        if unknown:
            raise ValueError(f"unknown redaction kinds: {sorted(unknown)}")
        self.kinds = tuple(k for k in _ORDER if k in wanted)
        self._steps = tuple(step for k in self.kinds for step in _STEPS[k])

    def redact(self, text: str) -> str:
        traits = _traits(text)
        for step, needs in self._steps:
            if traits & needs:
                text = step(text)
        return text


class Chain:
    """Several redactors, applied in order."""

    name = "chain"

    def __init__(self, redactors: Sequence[TextRedactor]) -> None:
        self.redactors = tuple(redactors)

    def redact(self, text: str) -> str:
        for r in self.redactors:
            text = r.redact(text)
        return text


class NoRedaction:
    """A tenant that asked for none (`redact: []`)."""

    name = "none"

    def redact(self, text: str) -> str:
        return text


@cache
def _plugins() -> dict[str, RedactorFactory]:
    return {ep.name: ep.load() for ep in entry_points(group=ENTRY_POINT)}


def known_redactors() -> frozenset[str]:
    """Every name a tenant's `capture.redact` may list: the built-in kinds and the installed plugins."""
    return frozenset(BUILTIN_REDACTIONS) | frozenset(_plugins())


def redactor_for(names: Sequence[str]) -> TextRedactor:
    """The redactor a tenant's `capture.redact` names (unknown names were refused at policy load)."""
    builtin = [n for n in names if n in _STEPS]
    parts: list[TextRedactor] = [PatternRedactor(builtin)] if builtin else []
    plugins = _plugins()
    for n in names:
        if n not in _STEPS:
            parts.append(plugins[n]())
    if not parts:
        return NoRedaction()
    return parts[0] if len(parts) == 1 else Chain(parts)
