"""The redactor contract (gateway.contracts.TextRedactor) over every implementation, and the built-in
pattern redactor's properties: no generated email, phone, card, IBAN, key or address survives it, and
text with nothing to redact comes back unchanged."""

from __future__ import annotations

import ipaddress
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.capture.redact import (
    Chain,
    NoRedaction,
    PatternRedactor,
    iban_valid,
    known_redactors,
    luhn_valid,
    redactor_for,
)
from gateway.contracts import TextRedactor
from plugins.redact_long_numbers import LongNumbers

REDACTORS: list[TextRedactor] = [
    PatternRedactor(),
    *(PatternRedactor([k]) for k in ("email", "phone", "card", "iban", "api_key", "ip")),
    LongNumbers(),
    Chain([PatternRedactor(), LongNumbers()]),
    NoRedaction(),
]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("redactor", REDACTORS, ids=lambda r: f"{r.name}:{','.join(getattr(r, 'kinds', ()))}")
@FAST
@given(text=st.text(max_size=300))
def test_any_text_gives_a_str_and_redacting_twice_changes_nothing(redactor: TextRedactor, text: str) -> None:
    once = redactor.redact(text)
    assert isinstance(once, str)
    assert redactor.redact(once) == once


@pytest.mark.parametrize("redactor", REDACTORS, ids=lambda r: r.name)
def test_empty_and_plain_text_come_back_unchanged(redactor: TextRedactor) -> None:
    for text in ("", "Hello, world! How are you today?", "The meeting is at noon; bring 3 apples."):
        assert redactor.redact(text) == text


def test_a_tenants_list_composes_builtins_and_plugins_in_order() -> None:
    assert {"email", "phone", "card", "iban", "api_key", "ip", "long_numbers"} <= known_redactors()
    chain = redactor_for(["email", "long_numbers"])
    assert chain.redact("a@b.io 1234567 4111111111111111") == "[EMAIL] [NUMBER] [NUMBER]"
    assert redactor_for([]).redact("a@b.io") == "a@b.io"


# ---- generators of what must never survive ----

_word = st.text(alphabet=string.ascii_lowercase, min_size=1, max_size=10)
emails = st.builds(
    lambda user, host, tld: f"{user}@{host}.{tld}",
    st.text(alphabet=string.ascii_letters + string.digits + "._+-", min_size=1, max_size=20).filter(
        lambda u: u[0].isalnum()
    ),
    _word,
    st.sampled_from(["com", "io", "co.uk", "de", "travel"]),
)


def _luhn_complete(body: str) -> str:
    for d in "0123456789":
        if luhn_valid(body + d):
            return body + d
    raise AssertionError


def _grouped(text: str, sep: str) -> str:
    return sep.join(text[i : i + 4] for i in range(0, len(text), 4))


def _card(prefix: str, body: str, sep: str) -> str:
    return _grouped(_luhn_complete(prefix + body), sep)


cards = st.builds(
    _card,
    st.sampled_from(["4", "51", "37", "6011"]),
    st.text(alphabet=string.digits, min_size=11, max_size=14),
    st.sampled_from(["", " ", "-"]),
)


def _iban(country: str, bban: str, spaced: bool) -> str:
    for check in range(100):
        candidate = f"{country}{check:02d}{bban}"
        if iban_valid(candidate):
            return _grouped(candidate, " " if spaced else "")
    raise AssertionError


ibans = st.builds(
    _iban,
    st.sampled_from(["DE", "GB", "FR", "NL", "ES", "IT", "CH"]),
    st.text(alphabet=string.digits + string.ascii_uppercase, min_size=12, max_size=26),
    st.booleans(),
)
phones = st.one_of(
    st.builds(
        lambda cc, rest: f"+{cc} {rest[:3]} {rest[3:6]} {rest[6:]}",
        st.integers(1, 99),
        st.text(string.digits, min_size=8, max_size=10),
    ),
    st.builds(
        lambda a, b, c: f"({a}) {b}-{c}",
        st.text(string.digits, min_size=3, max_size=3),
        st.text(string.digits, min_size=3, max_size=3),
        st.text(string.digits, min_size=4, max_size=4),
    ),
    st.builds(
        lambda a, b, c: f"{a}.{b}.{c}",
        st.text(string.digits, min_size=3, max_size=3),
        st.text(string.digits, min_size=3, max_size=3),
        st.text(string.digits, min_size=4, max_size=4),
    ),
)
keys = st.one_of(
    st.builds(lambda s: "sk-proj-" + s, st.text(string.ascii_letters + string.digits, min_size=20, max_size=48)),
    st.builds(lambda s: "ghp_" + s, st.text(string.ascii_letters + string.digits, min_size=36, max_size=36)),
    st.builds(lambda s: "AKIA" + s, st.text(string.ascii_uppercase + string.digits, min_size=16, max_size=16)),
    st.builds(lambda s: "Bearer " + s, st.text(string.ascii_letters + string.digits + "._-", min_size=20, max_size=60)),
    st.builds(
        lambda s: s + "7a",
        st.text(string.ascii_letters + string.digits + "_-", min_size=32, max_size=64),
    ),
)
ips = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: str(ipaddress.IPv6Address(a))),
)
SECRETS = {"email": emails, "card": cards, "iban": ibans, "phone": phones, "api_key": keys, "ip": ips}
# Filler with nothing any kind matches: letters, spaces, sentence punctuation (no digit, `@` or `:`).
filler = st.text(alphabet=string.ascii_letters + " ,;!?'\"()\n", max_size=40)


@pytest.mark.parametrize("kind", sorted(SECRETS))
@FAST
@given(data=st.data())
def test_no_generated_secret_survives(kind: str, data: st.DataObject) -> None:
    secrets = data.draw(st.lists(SECRETS[kind], min_size=1, max_size=3))
    parts = [data.draw(filler)]
    for s in secrets:
        parts += [" ", s, " ", data.draw(filler)]
    text = "".join(parts)
    out = PatternRedactor().redact(text)
    for s in secrets:
        assert s not in out
    # Only the kind's own placeholder replaced it (an earlier kind may claim an overlap: a key-shaped
    # IPv6, a phone-shaped card), and the filler is all still there.
    assert PatternRedactor().redact(out) == out


@FAST
@given(text=filler)
def test_text_without_anything_to_redact_is_untouched(text: str) -> None:
    assert PatternRedactor().redact(text) == text


@FAST
@given(words=st.lists(st.one_of(_word, st.integers(0, 999).map(str)), max_size=30))
def test_short_numbers_among_words_are_untouched(words: list[str]) -> None:
    # No two numbers side by side: "12 345 678 901" is phone-shaped on purpose.
    text = " ".join(w for i, w in enumerate(words) if not (w.isdigit() and i and words[i - 1].isdigit()))
    assert PatternRedactor().redact(text) == text


def test_checks_keep_what_is_not_a_card_or_iban() -> None:
    r = PatternRedactor(["card", "iban"])
    assert r.redact("4111 1111 1111 1112") == "4111 1111 1111 1112"  # fails Luhn
    assert r.redact("DE00 3704 0044 0532 0130 00") == "DE00 3704 0044 0532 0130 00"  # fails mod 97
    assert r.redact("pay DE89 3704 0044 0532 0130 00 ABC now") == "pay [IBAN] ABC now"
