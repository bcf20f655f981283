"""The veto: symmetric, never objects to a text against itself, always objects to another number, an
added negation, a swapped name or an opposite; and decide() applies it after the threshold."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gateway.cache.match import best_match, decide
from gateway.cache.veto import DEFAULT_RULES, OPPOSITES, RULES, numbers, veto

words = st.sampled_from(
    [
        "how",
        "do",
        "I",
        "change",
        "my",
        "the",
        "account",
        "password",
        "order",
        "a",
        "new",
        "card",
        "for",
        "is",
        "it",
        "open",
        "on",
        "can",
        "you",
    ]
)
sentences = st.lists(words, min_size=1, max_size=10).map(" ".join)
any_text = st.text(max_size=60)


@settings(max_examples=400, deadline=None)
@given(a=any_text, b=any_text)
def test_symmetric(a: str, b: str) -> None:
    assert veto(a, b) == veto(b, a)


@settings(max_examples=400, deadline=None)
@given(a=any_text, spaces=st.sampled_from([" ", "  ", "\n"]))
def test_never_objects_to_the_same_text(a: str, spaces: str) -> None:
    assert veto(a, a) is None
    assert veto(a, a.replace(" ", spaces)) is None


@settings(max_examples=300, deadline=None)
@given(s=sentences, x=st.integers(0, 10**6), y=st.integers(0, 10**6))
def test_another_number_is_vetoed(s: str, x: int, y: int) -> None:
    assume(x != y)
    assert veto(f"{s} {x}", f"{s} {y}") == "numbers differ"
    assert veto(f"{s} {x}", s) == "numbers differ"


@settings(max_examples=300, deadline=None)
@given(s=sentences, neg=st.sampled_from(["not", "never", "don't", "can't", "cannot", "without", "no"]))
def test_an_added_negation_is_vetoed(s: str, neg: str) -> None:
    assert veto(s, f"{neg} {s}") == "negation differs"


@settings(max_examples=300, deadline=None)
@given(s=sentences, word=st.sampled_from(sorted(OPPOSITES)))
def test_an_opposite_is_vetoed(s: str, word: str) -> None:
    opposite = sorted(OPPOSITES[word])[0]
    assume(word not in s.split() and opposite not in s.split())
    assert veto(f"{s} {word}", f"{s} {opposite}", rules=("negation",)) == "negation differs"
    assert veto(f"{s} {word}", f"{s} {opposite}") is not None


@settings(max_examples=300, deadline=None)
@given(
    s=sentences,
    a=st.sampled_from(["Salesforce", "HubSpot", "Paris", "Octopus"]),
    b=st.sampled_from(["Zendesk", "Berlin", "iPhone", "HMRC"]),
)
def test_a_swapped_name_is_vetoed(s: str, a: str, b: str) -> None:
    assert veto(f"{s} {a}", f"{s} {b}") == "names differ"
    assert veto(f"{s} {a}", f"{s} {a.lower()}") is None  # the same name in lower case is not another name


def test_examples() -> None:
    assert veto(
        "Transfer £50 from my savings to my current account", "Transfer £50 from my current account to my savings"
    )
    assert veto("Remind me at 7am", "Remind me at 7pm") == "numbers differ"
    assert veto("How do I mute notifications?", "How do I unmute notifications?") == "negation differs"
    assert veto("What's 15% of 200?", "Calculate fifteen percent of 200") is None
    assert veto("I can't log in", "I cannot log in") is None
    assert (
        veto("How do I order a replacement debit card?", "Hi, quick one: how do I order a replacement debit card?")
        is None
    )
    assert numbers("Open on Saturday at 9:30") == {"saturday", "9:30"}


def test_rules_are_named() -> None:
    assert set(DEFAULT_RULES) <= set(RULES)


def unit(rows: list[list[float]]) -> np.ndarray:
    m = np.asarray(rows, dtype=np.float32)
    return (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.lists(st.floats(-1, 1, allow_nan=False), min_size=4, max_size=4), min_size=1, max_size=20), st.data()
)
def test_best_match_is_the_top_cosine(rows: list[list[float]], data: st.DataObject) -> None:
    assume(all(np.linalg.norm(r) > 1e-3 for r in rows))
    matrix = unit(rows)
    q = matrix[data.draw(st.integers(0, len(rows) - 1))]
    found = best_match(q, matrix)
    assert found is not None
    i, sim = found
    assert sim == pytest.approx(float((matrix @ q).max()), abs=1e-6)
    assert sim == pytest.approx(float(matrix[i] @ q), abs=1e-6)


def test_decide() -> None:
    matrix = unit([[1, 0, 0], [0.96, 0.28, 0], [0, 1, 0]])
    texts = ["Are you open on Sunday?", "Are you open on Saturday?", "unrelated"]
    q = unit([[0.97, 0.243, 0]])[0]  # nearest to row 1, then row 0
    assert best_match(q, np.zeros((0, 3), np.float32)) is None
    assert decide("x", q, [], np.zeros((0, 3), np.float32), 0.5) is None
    assert decide("Are you open on Sunday?", q, texts, matrix, 0.9999) is None  # nothing above the threshold
    # The best candidate (Saturday) is vetoed; the second (Sunday) is served.
    m = decide("Are you open on Sunday?", q, texts, matrix, 0.9)
    assert m is not None and m.index == 0 and m.vetoed is None
    # Cosine only serves the best one, whatever it says.
    m = decide("Are you open on Sunday?", q, texts, matrix, 0.9, rules=())
    assert m is not None and m.index == 1
    # Every candidate vetoed: a miss that says why.
    m = decide("Are you open on Monday?", q, texts, matrix, 0.9)
    assert m is not None and m.index is None and m.vetoed == "numbers differ" and m.similarity > 0.99
    with pytest.raises(ValueError):
        decide("x", q, ["one"], matrix, 0.9)
