"""The comparison's normalisation (gateway.capture.compare) translates punctuation through a table filled as
code points are met; on any text it equals the definition it implements: NFKC, case folded, each
punctuation character (Unicode category P*) a space, whitespace runs collapsed and trimmed."""

from __future__ import annotations

import re
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.capture import compare
from gateway.capture.compare import _text


def reference(text: str) -> str:
    folded = unicodedata.normalize("NFKC", text).casefold()
    kept = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in folded)
    return re.sub(r"\s+", " ", kept).strip()


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=200))
def test_the_table_normalises_exactly_as_the_definition(text: str) -> None:
    assert _text(text) == reference(text)


def test_past_its_size_the_table_still_answers_without_growing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compare, "MAX_TABLE", 50)
    table = compare._PunctuationAsSpace()
    for code in range(0x2000, 0x2200):
        ch = chr(code)
        assert ch.translate(table) == (" " if unicodedata.category(ch).startswith("P") else ch)
    assert len(table) == 50
    assert "a,b!".translate(table) == "a b "
