"""Remembered token counts (gateway.tokens): a text counted moments ago (a chat's system prompt and
history, resent every turn) is not tokenized again, the counts are exactly tiktoken's, the memory is
bounded, and no prompt text is kept."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import tokens

ENC = "cl100k_base"
TEXTS = st.lists(st.text(max_size=60), max_size=8)


@pytest.fixture(autouse=True)
def fresh_counts() -> Iterator[None]:
    tokens.forget_counts()
    yield
    tokens.forget_counts()


def _tokenized(monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], Callable[[str], list[int]]]:
    """From now on, every text the tokenizer really encodes (not a remembered count); and the real encoder."""
    enc = tokens.encoding(ENC)
    seen: list[str] = []
    real = enc.encode_ordinary

    def spy(text: str) -> list[int]:
        seen.append(text)
        return real(text)

    monkeypatch.setattr(enc, "encode_ordinary", spy)
    return seen, real


def direct(texts: list[str]) -> int:
    enc = tokens.encoding(ENC)
    return sum(len(enc.encode_ordinary(t)) for t in texts if t) + 3 * len(texts) + 3


@settings(max_examples=200)
@given(st.lists(TEXTS, min_size=1, max_size=4))
def test_counts_are_tiktokens_whether_remembered_or_not(prompts: list[list[str]]) -> None:
    for texts in prompts + prompts:  # every prompt twice: the second time from memory
        assert tokens.count_chat(texts, ENC) == direct(texts)
        assert [tokens.count_text(t, ENC) for t in texts] == [
            len(tokens.encoding(ENC).encode_ordinary(t)) for t in texts
        ]


def test_a_resent_text_is_not_tokenized_again_and_no_text_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    system = "You are a careful assistant. " * 20
    first = tokens.count_chat([system, "hello"], ENC)
    seen, real = _tokenized(monkeypatch)
    second = tokens.count_chat([system, "hello", "and a new question"], ENC)
    assert seen == ["and a new question"]  # the system prompt and the first turn came from memory
    assert second == first + len(real("and a new question")) + 3
    # Keys are (encoding, length, keyed digest): no prompt text outlives its request in the memo.
    for key, value in tokens._memo.items():
        assert key[0] == ENC and isinstance(key[1], int) and isinstance(key[2], bytes) and isinstance(value, int)
        assert system.encode() not in key[2] and len(key[2]) == 16


def test_the_memo_is_bounded_and_drops_the_oldest_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "MEMO_SIZE", 8)
    for i in range(20):
        tokens.count_text(f"text number {i}", ENC)
        assert len(tokens._memo) <= 8
    seen, _ = _tokenized(monkeypatch)
    for i in range(12, 20):  # the eight newest: remembered
        tokens.count_text(f"text number {i}", ENC)
    assert seen == []
    tokens.count_text("text number 11", ENC)  # the newest of the dropped ones: counted again
    assert seen == ["text number 11"] and len(tokens._memo) == 8
