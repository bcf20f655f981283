"""Inbound body limits: JSON nesting depth and integer ranges are refused with a 400 naming the limit,
whatever shape the nesting takes (brackets inside strings and escapes do not count)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.api.decode import decode
from gateway.api.inbound import (
    NUMBER_FIELDS,
    InboundLimits,
    _all_plain,
    _check_each,
    check_numbers,
    depth_bound_holds,
    depth_exceeds,
)
from gateway.canonical import Operation
from gateway.errors import InvalidRequest

LIMIT = 64
MESSAGES = [{"role": "user", "content": "hi"}]


def chat(extra: dict[str, Any] | None = None, **fields: Any) -> bytes:
    return json.dumps({"model": "m", "messages": MESSAGES, **(extra or {}), **fields}).encode()


def nest(depth: int, kinds: list[bool], leaf: Any) -> Any:
    """`depth` levels of arrays/objects (kinds[i]: object at level i), around `leaf`."""
    value = leaf
    for i in range(depth):
        value = {"k": value} if kinds[i % len(kinds)] else [value]
    return value


def nest_text(depth: int, kinds: list[bool], leaf: str) -> bytes:
    """Like `nest`, as JSON text (json.dumps itself recurses too deep for these)."""
    opens = [b'{"k": ' if kinds[i % len(kinds)] else b"[" for i in range(depth)]
    closes = [b"}" if kinds[i % len(kinds)] else b"]" for i in reversed(range(depth))]
    return b"".join(opens) + json.dumps(leaf).encode() + b"".join(closes)


def depth_of(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth_of(v) for v in value), default=0)
    return 0


# Strings full of brackets, quotes and backslashes: they must never count as nesting.
tricky_text = st.text(alphabet='[]{}"\\ab\n', max_size=30)


@settings(max_examples=150, deadline=None)
@given(
    depth=st.integers(min_value=1, max_value=LIMIT - 1),
    kinds=st.lists(st.booleans(), min_size=1, max_size=5),
    leaf=tricky_text,
)
def test_any_depth_within_the_limit_is_accepted(depth: int, kinds: list[bool], leaf: str) -> None:
    # The body object itself is one level: `x` may nest LIMIT - 1 more.
    body = chat(x=nest(depth, kinds, leaf))
    request = decode(body, "chat")
    assert depth_of(json.loads(body)) == max(3, depth + 1) <= LIMIT
    assert request.model == "m" and "x" in request.extra


@settings(max_examples=150, deadline=None)
@given(
    excess=st.integers(min_value=0, max_value=5000),
    kinds=st.lists(st.booleans(), min_size=1, max_size=5),
    leaf=tricky_text,
    where=st.sampled_from(["extra", "content"]),
)
def test_any_depth_over_the_limit_is_refused_with_400(excess: int, kinds: list[bool], leaf: str, where: str) -> None:
    # Depth LIMIT + 1 + excess counting the body object (and in `content`, the list and the message too).
    deep = nest_text(LIMIT + excess, kinds, leaf)
    if where == "content":
        body = b'{"model": "m", "messages": [{"role": "user", "content": ' + deep + b"}]}"
    else:
        body = b'{"model": "m", "messages": [], "x": ' + deep + b"}"
    with pytest.raises(InvalidRequest) as info:
        decode(body, "chat")
    assert info.value.status == 400
    assert f"deeper than the limit of {LIMIT} levels" in info.value.message


@settings(max_examples=200, deadline=None)
@given(
    value=st.recursive(
        st.none() | st.integers() | tricky_text,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(tricky_text, inner, max_size=4),
        max_leaves=40,
    ),
    limit=st.integers(min_value=2, max_value=8),
)
# Found by hypothesis: a string "]" before a real "[" and a string "[" after it made depth 4 look like 3.
@example(value=[["]", [], "["]], limit=3)
def test_the_fast_bound_never_accepts_what_is_too_deep(value: Any, limit: int) -> None:
    body = json.dumps({"v": value}).encode()
    too_deep = depth_of({"v": value}) > limit
    assert depth_exceeds(json.loads(body), limit) == too_deep
    if too_deep:
        assert not depth_bound_holds(body, limit)


def test_brackets_inside_strings_do_not_count() -> None:
    text = "[" * 5000 + '\\"{' * 100
    request = decode(chat(messages=[{"role": "user", "content": text}]), "chat")
    assert request.prompt_texts() == [text]


def test_100000_nested_arrays_are_a_400_not_a_recursion_error() -> None:
    body = b'{"model": "m", "messages": [], "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    # Either limit may speak first: 100,000 arrays are also past the container cap.
    with pytest.raises(InvalidRequest, match=r"deeper than the limit|more than 50000 arrays/objects"):
        decode(body, "chat")
    unbalanced = b'{"model": "m", "x": ' + b"[" * 100_000
    with pytest.raises(InvalidRequest) as info:
        decode(unbalanced, "chat")
    assert info.value.status == 400


def test_the_depth_limit_is_a_setting() -> None:
    body = chat(x=[[[1]]])  # depth 4
    decode(body, "chat", InboundLimits(max_json_depth=4))
    with pytest.raises(InvalidRequest, match="limit of 3 levels"):
        decode(body, "chat", InboundLimits(max_json_depth=3))


RANGES = [
    ("max_tokens", 1, 1_000_000),
    ("max_completion_tokens", 1, 1_000_000),
    ("n", 1, 128),
    ("seed", -(2**63), 2**63 - 1),
    ("top_logprobs", 0, 1_000_000),
    ("best_of", 1, 128),
]


@settings(max_examples=100, deadline=None)
@given(case=st.sampled_from(RANGES), data=st.data())
def test_any_integer_outside_its_range_is_refused_naming_the_param(case: tuple[str, int, int], data: Any) -> None:
    name, lo, hi = case
    outside = data.draw(
        st.integers(max_value=lo - 1) | st.integers(min_value=hi + 1) | st.sampled_from([10**400, -(10**400)])
    )
    with pytest.raises(InvalidRequest) as info:
        decode(chat(**{name: outside}), "chat")
    assert info.value.status == 400
    assert info.value.param == name
    assert name in info.value.message


@settings(max_examples=100, deadline=None)
@given(case=st.sampled_from(RANGES), data=st.data())
def test_any_integer_inside_its_range_is_accepted(case: tuple[str, int, int], data: Any) -> None:
    name, lo, hi = case
    value = data.draw(st.integers(min_value=lo, max_value=hi))
    request = decode(chat(**{name: value}), "chat")
    # Forwarded as the client wrote it; modelled ones read as the same number.
    assert request.original is not None and b'"%s": %d' % (name.encode(), value) in request.original.body
    assert {"max_tokens": request.max_output_tokens, "max_completion_tokens": request.max_output_tokens}.get(
        name, value
    ) == value


@pytest.mark.parametrize(
    ("kind", "body", "param", "fragment"),
    [
        ("chat", chat(max_tokens=52_125_000), "max_tokens", "between 1 and 1000000"),
        ("chat", chat(max_tokens=10**400), "max_tokens", "about 401 digits"),
        ("chat", chat(top_logprobs=True), "top_logprobs", "must be an integer"),
        ("completions", b'{"model": "m", "prompt": "x", "logprobs": -1}', "logprobs", "between 0 and 1000000"),
        (
            "completions",
            b'{"model": "m", "prompt": "x", "presence_penalty": 1%s}' % (b"0" * 400),
            "presence_penalty",
            "too large",
        ),
        ("embeddings", b'{"model": "m", "input": "x", "dimensions": 0}', "dimensions", "between 1 and 65536"),
        ("chat", b'{"model": "m", "messages": [], "temperature": 1e400}', "temperature", "out of range"),
    ],
)
def test_out_of_range_numbers(kind: Operation, body: bytes, param: str | None, fragment: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        decode(body, kind)
    assert info.value.status == 400
    assert info.value.param == param
    assert fragment in info.value.message


def test_chat_logprobs_is_a_boolean_and_the_output_cap_is_a_setting() -> None:
    decode(chat(logprobs=True, top_logprobs=5), "chat")
    decode(chat(max_tokens=2_000_000), "chat", InboundLimits(max_output_tokens=2_000_000))
    with pytest.raises(InvalidRequest, match="between 1 and 1000"):
        decode(chat(max_tokens=1001), "chat", InboundLimits(max_output_tokens=1000))


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"top_k": 10**30}, "top_k"),
        ({"logit_bias": {"1": 10**400}}, "logit_bias.1"),
        ({"logit_bias": {"7": "ban"}}, "logit_bias.7"),
    ],
)
def test_review_found_unchecked_numbers_are_refused(extra: dict[str, object], param: str) -> None:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], **extra}).encode()
    with pytest.raises(InvalidRequest) as info:
        decode(body, "chat")
    assert info.value.param == param


def test_a_body_of_too_many_containers_is_refused_before_decoding_and_strings_do_not_count() -> None:
    """Found in review: a 3 MB body of a million empty arrays cost 0.6 s of CPU to decode."""
    from gateway.api.inbound import MAX_CONTAINERS

    flood = b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "extra": [' + b"[]," * 1_000_000 + b"[]]}"
    with pytest.raises(InvalidRequest) as info:
        decode(flood, "chat")
    assert f"more than {MAX_CONTAINERS}" in info.value.message
    # Brackets inside strings are text: a prompt full of them is fine.
    text = "[{" * (MAX_CONTAINERS + 10)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]}).encode()
    request = decode(body, "chat")
    assert request.prompt_texts() == [text]


# OpenAI's product limits, which llama.cpp and vLLM do not have: not Strait's to enforce (an OpenAI upstream
# answers its own 400). Each body is forwarded as the client wrote it.
OPENAI_ONLY = [
    ("chat", chat(stop=["a", "b", "c", "d", "e", "f"])),
    ("completions", b'{"model": "m", "prompt": "x", "stop": ["1", "2", "3", "4", "5"]}'),
    ("chat", chat(temperature=2.5)),
    ("chat", chat(temperature=-1)),
    ("chat", chat(presence_penalty=2.5, frequency_penalty=-3)),
    ("chat", chat(logprobs=True, top_logprobs=50)),
    ("completions", b'{"model": "m", "prompt": "x", "logprobs": 21}'),
    ("chat", chat(logit_bias={"15043": 200, "2": False, "3": -1e5})),
    ("chat", chat(response_format={"type": "structural_tag", "structures": [], "triggers": []})),
    ("chat", chat(response_format={"type": "json_object", "schema": {"type": "object"}})),
    ("chat", chat(metadata={"run": {"id": 7}, "tags": ["a"], "user": "u"})),
]


@pytest.mark.parametrize(("kind", "body"), OPENAI_ONLY)
def test_openai_only_limits_are_left_to_the_upstream(kind: Operation, body: bytes) -> None:
    request = decode(body, kind)
    assert request.original is not None and request.original.body == body


_ANY_NUMBER_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 16, 128, 129, 65_536, 1_000_000, 1_000_001, 2**63 - 1, 2**63, -(2**63), -1]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=3),
    st.dictionaries(st.text(max_size=3), st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans())),
)


@given(
    st.dictionaries(st.sampled_from(NUMBER_FIELDS), _ANY_NUMBER_VALUE, max_size=6),
    st.integers(min_value=1, max_value=300_000),
)
def test_the_fast_number_check_decides_as_the_full_one(raw: dict[str, Any], max_output_tokens: int) -> None:
    """check_numbers' field-by-field pass accepts only what the range-by-range check accepts."""
    limits = InboundLimits(max_output_tokens=max_output_tokens)
    try:
        _check_each(raw, limits)
        full = None
    except InvalidRequest as exc:
        full = exc.param
    if _all_plain(raw, max_output_tokens):
        assert full is None
    try:
        check_numbers(raw, limits)
        fast = None
    except InvalidRequest as exc:
        fast = exc.param
    assert fast == full
