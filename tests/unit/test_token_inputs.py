"""Embedding token arrays decoded to text with cl100k_base for a model of another vocabulary."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.api.openai.decode import decode
from gateway.contracts import UpstreamCall
from gateway.errors import InvalidRequest
from gateway.tokens import encoding
from gateway.upstream.token_inputs import as_text, detokenize, needs_text

CL100K = encoding("cl100k_base")
# Any text but lone surrogates (not UTF-8: no tokenizer encodes them).
texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=200)


@settings(max_examples=300, deadline=None)
@given(text=texts)
def test_detokenize_inverts_cl100k_encode(text: str) -> None:
    assert detokenize(CL100K.encode(text, disallowed_special=())) == text


@settings(max_examples=200, deadline=None)
@given(text=texts.filter(lambda t: "\ufffd" not in t), cut=st.integers(min_value=0))
def test_an_array_cut_anywhere_decodes_to_the_texts_two_sides(text: str, cut: int) -> None:
    """LangChain cuts long texts every 8191 tokens: each side decodes to its part of the text, the bytes
    of a character cut in two becoming U+FFFD (never an error, never other characters)."""
    tokens = CL100K.encode(text, disallowed_special=())
    cut = cut % (len(tokens) + 1)
    head, tail = detokenize(tokens[:cut]), detokenize(tokens[cut:])
    assert text.startswith(head.rstrip("\ufffd")) and text.endswith(tail.lstrip("\ufffd"))
    if "\ufffd" not in head + tail:
        assert head + tail == text


@pytest.mark.parametrize("bad", [100261, 100277, -1, 2**70])
def test_an_id_cl100k_does_not_have_is_named(bad: int) -> None:
    with pytest.raises(ValueError) as info:
        detokenize([1171, bad])
    assert info.value.args[0] == bad


def _embeddings(body: str) -> UpstreamCall:
    request = decode(body.encode(), "embeddings")
    return UpstreamCall(operation="embeddings", request=request, model="up", stream=False, request_id="r")


def test_token_arrays_need_text_only_for_another_vocabulary() -> None:
    call = _embeddings('{"model": "m", "input": [[1171, 41776]]}')
    assert needs_text(call.request, "o200k_base") and not needs_text(call.request, "cl100k_base")
    assert not needs_text(_embeddings('{"model": "m", "input": ["red apples"]}').request, "o200k_base")


def test_the_upstream_body_gets_the_text_in_place_of_the_arrays() -> None:
    call = _embeddings('{"input" : [[1171, 41776], [15339]], "model": "m", "x_vendor": 1}')
    call.request, call.inputs = asyncio.run(as_text(call.request))
    assert call.request.inputs == ("red apples", "hello")
    assert call.passthrough("openai") == b'{"input" : ["red apples","hello"], "model": "up", "x_vendor": 1}'


def test_one_completion_prompt_becomes_one_string() -> None:
    request = decode(b'{"model": "m", "prompt": [1171, 41776], "max_tokens": 2}', "completions")
    call = UpstreamCall(operation="completions", request=request, model="up", stream=False, request_id="r")
    assert needs_text(request, "o200k_base")
    call.request, call.inputs = asyncio.run(as_text(call.request))
    assert call.passthrough("openai") == b'{"model": "up", "prompt": "red apples", "max_tokens": 2}'


def test_a_bad_id_is_a_400_naming_the_input() -> None:
    call = _embeddings('{"model": "m", "input": [[1171], [5, 100270]]}')
    with pytest.raises(InvalidRequest) as info:
        asyncio.run(as_text(call.request))
    assert info.value.param == "input[1]" and "100270" in info.value.message
