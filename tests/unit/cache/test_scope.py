"""scope_of: the namespace is fail-closed (every answer-changing field moves it, the delivery fields do not),
the exact key follows the last user message, tenants never share a namespace."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gateway.cache.scope import NOT_ANSWER_CHANGING, normalise, scope_of
from gateway.canonical import (
    Image,
    Message,
    Request,
    ResponseFormat,
    Text,
    ThinkingConfig,
    Tool,
    ToolChoice,
)
from gateway.passthrough import Original

WHERE = {"tenant": "acme", "route": "chat", "deployment": "chat-a", "embedder_tag": "m@1"}

short_text = st.text(min_size=1, max_size=12)
raw_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
).map(lambda v: msgspec.Raw(msgspec.json.encode(v)))
tools = st.lists(
    st.builds(
        Tool, name=st.text(min_size=1, max_size=8), description=st.none() | short_text, parameters=st.none() | raw_json
    ),
    max_size=2,
).map(tuple)

# One strategy per answer-changing field of Request: every field not in NOT_ANSWER_CHANGING must be here
# (test_every_field_is_covered), so a field added to Request later is tested the day it is added.
CHANGES: dict[str, st.SearchStrategy[Any]] = {
    "operation": st.sampled_from(["chat", "completions", "embeddings"]),
    "model": short_text,
    "tools": tools,
    "tool_choice": st.none()
    | st.builds(ToolChoice, mode=st.sampled_from(["auto", "none", "required", "tool"]), name=st.none() | short_text),
    "response_format": st.none()
    | st.builds(
        ResponseFormat, type=st.sampled_from(["text", "json_object", "json_schema"]), json_schema=st.none() | raw_json
    ),
    "thinking": st.none()
    | st.builds(ThinkingConfig, enabled=st.booleans(), budget_tokens=st.none() | st.integers(0, 10**5)),
    "inputs": st.lists(short_text, max_size=3).map(tuple),
    "encoding_format": st.sampled_from([None, "float", "base64"]),
    "dimensions": st.none() | st.integers(1, 4096),
    "max_output_tokens": st.none() | st.integers(1, 10**6),
    "output_tokens_field": st.sampled_from(["max_tokens", "max_completion_tokens", "max_output_tokens"]),
    "n": st.none() | st.integers(1, 16),
    "best_of": st.none() | st.integers(1, 16),
    "temperature": st.none() | st.floats(0, 2, allow_nan=False),
    "top_p": st.none() | st.floats(0, 1, allow_nan=False),
    "top_k": st.none() | st.integers(-1, 500),
    "seed": st.none() | st.integers(-(2**63), 2**63 - 1),
    "presence_penalty": st.none() | st.floats(-2, 2, allow_nan=False),
    "frequency_penalty": st.none() | st.floats(-2, 2, allow_nan=False),
    "stop": st.lists(short_text, max_size=4).map(tuple),
    "logprobs": st.none() | st.booleans() | st.integers(0, 20),
    "top_logprobs": st.none() | st.integers(0, 20),
    "preferences": st.none() | raw_json,
    "extra": st.dictionaries(st.text(min_size=1, max_size=8), raw_json, max_size=3),
}
DELIVERY: dict[str, st.SearchStrategy[Any]] = {
    "stream": st.booleans(),
    "include_usage": st.booleans(),
    "user": st.none() | short_text,
    "metadata": st.none() | st.dictionaries(short_text, short_text, max_size=3),
    "original": st.none()
    | st.builds(Original, protocol=st.just("openai"), body=st.binary(max_size=20), model=st.just((0, 1))),
}


def chat(*messages: tuple[str, str], **fields: Any) -> Request:
    return Request(
        operation="chat",
        model="chat",
        messages=tuple(Message(role=r, content=(Text(text=t),)) for r, t in messages),  # type: ignore[arg-type]
        **fields,
    )


BASE = chat(
    ("system", "You are terse."),
    ("user", "What is a VAT return?"),
    ("assistant", "A tax form."),
    ("user", "When is it due?"),
)


def canonical(value: Any) -> bytes:
    """What scope_of can see of a value: its JSON, keys sorted (`None` and `Raw(b"null")` are one value)."""
    return msgspec.json.encode(msgspec.json.decode(msgspec.json.encode(value)), order="sorted")


def test_every_field_is_covered() -> None:
    assert set(Request.__struct_fields__) == set(CHANGES) | set(DELIVERY) | {"messages"}
    assert set(DELIVERY) | {"messages"} == NOT_ANSWER_CHANGING


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_each_answer_changing_field_changes_the_namespace(data: st.DataObject) -> None:
    field = data.draw(st.sampled_from(sorted(CHANGES)))
    v1, v2 = data.draw(CHANGES[field]), data.draw(CHANGES[field])
    assume(canonical(v1) != canonical(v2))
    s1 = scope_of(msgspec.structs.replace(BASE, **{field: v1}), **WHERE)
    s2 = scope_of(msgspec.structs.replace(BASE, **{field: v2}), **WHERE)
    assert s1.namespace != s2.namespace, field
    assert s1.exact_key != s2.exact_key, field


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_delivery_fields_change_nothing(data: st.DataObject) -> None:
    changes = {f: data.draw(s) for f, s in DELIVERY.items() if data.draw(st.booleans())}
    assert scope_of(msgspec.structs.replace(BASE, **changes), **WHERE) == scope_of(BASE, **WHERE)


@settings(max_examples=200, deadline=None)
@given(where=st.sampled_from(sorted(WHERE)), value=st.text(min_size=1, max_size=16))
def test_tenant_route_deployment_embedder_change_the_namespace(where: str, value: str) -> None:
    assume(value != WHERE[where])
    other = scope_of(BASE, **{**WHERE, where: value})
    mine = scope_of(BASE, **WHERE)
    assert other.namespace != mine.namespace
    assert other.exact_key != mine.exact_key


@settings(max_examples=200, deadline=None)
@given(a=st.text(min_size=1, max_size=8), b=st.text(min_size=1, max_size=8), prompt=st.text(min_size=1, max_size=40))
def test_tenants_never_share_a_namespace_even_with_identical_prompts(a: str, b: str, prompt: str) -> None:
    assume(a != b)
    request = chat(("user", prompt))
    sa = scope_of(request, **{**WHERE, "tenant": a})
    sb = scope_of(request, **{**WHERE, "tenant": b})
    assert sa.namespace != sb.namespace and sa.exact_key != sb.exact_key


def test_no_tenant_no_cache() -> None:
    with pytest.raises(ValueError, match="no tenant"):
        scope_of(BASE, **{**WHERE, "tenant": ""})


@settings(max_examples=200, deadline=None)
@given(index=st.integers(0, 2), text=st.text(max_size=30))
def test_system_prompt_and_prior_turns_change_the_namespace(index: int, text: str) -> None:
    """Any message before the last user turn (system prompt, prior user and assistant turns) is context."""
    messages = list(BASE.messages)
    old = messages[index]
    assume(text != old.content[0].text)  # type: ignore[union-attr]
    messages[index] = Message(role=old.role, content=(Text(text=text),))
    changed = scope_of(msgspec.structs.replace(BASE, messages=tuple(messages)), **WHERE)
    assert changed.namespace != scope_of(BASE, **WHERE).namespace


@settings(max_examples=300, deadline=None)
@given(a=st.text(min_size=1, max_size=40), b=st.text(min_size=1, max_size=40))
def test_the_exact_key_follows_the_last_user_message(a: str, b: str) -> None:
    sa, sb = (
        scope_of(chat(("system", "s"), ("user", a)), **WHERE),
        scope_of(chat(("system", "s"), ("user", b)), **WHERE),
    )
    assert sa.namespace == sb.namespace  # the semantic tier compares these two
    assert (sa.exact_key == sb.exact_key) == (normalise(a) == normalise(b))
    assert sa.query == (a if a.strip() else None)  # white space alone: nothing to embed


@given(text=st.text(min_size=1, max_size=30), pad=st.sampled_from([" ", "  ", "\n", "\t ", "\u00a0"]))
def test_white_space_does_not_change_the_exact_key(text: str, pad: str) -> None:
    spaced = f"{pad}{text.replace(' ', pad)}{pad}"
    assert scope_of(chat(("user", spaced)), **WHERE).exact_key == scope_of(chat(("user", text)), **WHERE).exact_key


def test_key_order_of_opaque_json_does_not_matter() -> None:
    one = msgspec.structs.replace(BASE, extra={"x": msgspec.Raw(b'{"a": 1, "b": [2, 3]}')})
    two = msgspec.structs.replace(BASE, extra={"x": msgspec.Raw(b'{"b":[2,3],"a":1}')})
    assert scope_of(one, **WHERE) == scope_of(two, **WHERE)


def test_query_is_none_unless_the_last_message_is_plain_user_text() -> None:
    image = Request(
        operation="chat",
        model="chat",
        messages=(Message(role="user", content=(Text(text="what is this?"), Image(url="https://x/y.png"))),),
    )
    assert scope_of(image, **WHERE).query is None
    assert scope_of(chat(("user", "hi"), ("assistant", "Hello")), **WHERE).query is None
    assert scope_of(chat(("user", "   ")), **WHERE).query is None
    # Another image is another exact key even though neither has a query.
    other = msgspec.structs.replace(
        image, messages=(Message(role="user", content=(Text(text="what is this?"), Image(url="https://x/z.png"))),)
    )
    assert scope_of(image, **WHERE).exact_key != scope_of(other, **WHERE).exact_key


def test_a_message_after_the_last_user_turn_is_context() -> None:
    """An assistant prefill after the question changes the answer: it is in the namespace."""
    a = scope_of(chat(("user", "Name a colour."), ("assistant", "Red")), **WHERE)
    b = scope_of(chat(("user", "Name a colour."), ("assistant", "Blue")), **WHERE)
    assert a.namespace != b.namespace
