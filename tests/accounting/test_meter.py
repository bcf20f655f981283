"""The meter's count when an upstream reports no usage: answer text and reasoning text are both completion
tokens, the reasoning counted apart (priced at its own rate), however the stream is cut into events and
however long it is (what is held is folded into counts and dropped)."""

from __future__ import annotations

import itertools
import json
from unittest import mock

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.accounting import meter
from gateway.accounting.meter import StreamMeter, completion_counts_of
from gateway.tokens import count_text

ENC = "o200k_base"
WORDS = st.sampled_from(["alpha", "bravo", "charlie", "delta", "echo", "thinking", "about", "it", "42", "the"])


def _chunk(**delta: object) -> bytes:
    return json.dumps({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]}).encode()


def _pieces(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in itertools.pairwise(points) if text[a:b]]


def test_reasoning_deltas_are_completion_tokens_and_counted_apart() -> None:
    m = StreamMeter(ENC)
    m.add([_chunk(role="assistant", content="")])
    m.add([_chunk(reasoning_content="Let me think about"), _chunk(reasoning_content=" the question first.")])
    m.add([_chunk(content="The answer is 42.")])
    thinking = count_text("Let me think about the question first.", ENC)
    answer = count_text("The answer is 42.", ENC)
    assert m.counts() == (answer + thinking, thinking)
    assert m.tokens() == answer + thinking


def test_a_string_reasoning_field_counts_and_any_other_shape_is_ignored_not_fatal() -> None:
    m = StreamMeter(ENC)
    m.add([_chunk(reasoning="Considering options")])
    # An object where a string was expected: its content still counts (the chunk is not dropped).
    m.add([_chunk(content="Done", reasoning={"summary": "x"})])
    thinking = count_text("Considering options", ENC)
    assert m.counts() == (thinking + count_text("Done", ENC), thinking)


def test_a_json_body_counts_its_message_reasoning() -> None:
    body = json.dumps(
        {"choices": [{"index": 0, "message": {"content": "Paris.", "reasoning_content": "France's capital is"}}]}
    ).encode()
    reasoning = count_text("France's capital is", ENC)
    assert completion_counts_of([body], ENC) == (count_text("Paris.", ENC) + reasoning, reasoning)


@given(
    st.lists(WORDS, min_size=1, max_size=60),
    st.lists(WORDS, max_size=60),
    st.lists(st.integers(min_value=0, max_value=10_000), max_size=20),
    st.lists(st.integers(min_value=0, max_value=10_000), max_size=20),
)
@settings(max_examples=150, deadline=None)
def test_counts_do_not_depend_on_how_the_stream_is_cut_or_folded(
    thinking_words: list[str], answer_words: list[str], thinking_cuts: list[int], answer_cuts: list[int]
) -> None:
    thinking = " ".join(thinking_words)
    answer = " " + " ".join(answer_words) if answer_words else ""
    events = [_chunk(reasoning_content=p) for p in _pieces(thinking, thinking_cuts)]
    events += [_chunk(content=p) for p in _pieces(answer, answer_cuts)]
    # Tiny thresholds, so that holding, decoding and folding all happen within a short stream.
    with mock.patch.object(meter, "RAW_HOLD_BYTES", 150), mock.patch.object(meter, "TEXT_FOLD_CHARS", 20):
        m = StreamMeter(ENC)
        for event in events:
            m.add([event])
        got = m.counts()
    want = count_text(thinking, ENC)
    assert got == (want + (count_text(answer, ENC) if answer else 0), want)
