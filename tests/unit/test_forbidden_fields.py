"""Fields that would redirect or re-credential an upstream are refused wherever a proxy or an upstream reads
options from, however they are spelled; message content and tool schemas are data and are left alone."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.api.decode import decode
from gateway.errors import InvalidRequest

BASE = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
WORDS = ("api_key", "api_base", "base_url", "custom_llm_provider", "api_url", "azure_endpoint", "authorization")


def _decode(doc: dict[str, Any]) -> None:
    decode(json.dumps(doc).encode(), "chat")


def _refused(doc: dict[str, Any]) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        _decode(doc)
    assert info.value.status == 400
    return info.value


@st.composite
def spellings(draw: st.DrawFn) -> str:
    """api_key as apiKey, API-KEY, a_p_i_key, ApI__kEy...: case per letter, any `_`/`-` between letters."""
    word = draw(st.sampled_from(WORDS)).replace("_", "")
    out = []
    for ch in word:
        out.append(draw(st.sampled_from([ch.lower(), ch.upper()])))
        out.append(draw(st.sampled_from(["", "", "_", "-", "__"])))
    return "".join(out)


@given(
    name=spellings(),
    container=st.sampled_from([None, "extra_body", "extra_headers", "metadata"]),
    nesting=st.lists(st.sampled_from(["opts", "inner", 0]), max_size=3),
)
@settings(max_examples=300, deadline=None)
def test_any_spelling_anywhere_is_refused_with_its_path(
    name: str, container: str | None, nesting: list[str | int]
) -> None:
    steps: list[str | int] = [container, *nesting] if container else []
    value: Any = {name: "http://169.254.169.254/"}
    for step in reversed(steps[1:]):
        value = [value] if step == 0 else {step: value}
    doc = {**BASE, **value} if container is None else {**BASE, container: value}
    path = "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in [*steps, name]).lstrip(".")
    error = _refused(doc)
    assert error.param == path
    assert name in error.message


def test_the_measured_spellings() -> None:
    for doc, param in (
        ({"api_base": "http://evil"}, "api_base"),
        ({"API_BASE": "http://evil"}, "API_BASE"),
        ({"apiBase": "http://evil"}, "apiBase"),
        ({"extra_body": {"apiBase": "http://evil"}}, "extra_body.apiBase"),
        ({"extra_headers": {"Authorization": "Bearer stolen"}}, "extra_headers.Authorization"),
        # LiteLLM forwards a top-level `headers` object to the provider as request headers.
        ({"headers": {"x-api-key": "stolen"}}, "headers.x-api-key"),
        ({"metadata": {"x": {"Custom-LLM-Provider": "openai"}}}, "metadata.x.Custom-LLM-Provider"),
    ):
        assert _refused({**BASE, **doc}).param == param


def test_names_inside_message_content_and_tool_schemas_are_data() -> None:
    """A tool may legitimately take an `api_key` parameter; a user may write about `base_url`."""
    tool = {
        "type": "function",
        "function": {
            "name": "call_service",
            "parameters": {
                "type": "object",
                "properties": {"api_key": {"type": "string"}, "base_url": {"type": "string"}},
            },
        },
    }
    content = [{"type": "text", "text": json.dumps({"api_key": "k", "apiBase": "u"})}]
    _decode({**BASE, "messages": [{"role": "user", "content": content}], "tools": [tool]})
    _decode({**BASE, "metadata": {"topic": "api_key rotation"}, "extra_body": {"top_k": 5}})


def test_nested_containers_are_searched_to_any_depth_the_body_may_have() -> None:
    # Within the JSON depth limit (64 levels by default; deeper bodies are refused before this check).
    depth = 60
    nested = b'{"a":' * depth + b'{"api_key":"k"}' + b"}" * depth
    body = b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "metadata": ' + nested + b"}"
    with pytest.raises(InvalidRequest) as info:
        decode(body, "chat")
    assert info.value.param == "metadata" + ".a" * depth + ".api_key"


@pytest.mark.parametrize(
    "extra",
    [
        {"user_config": {"model_list": [{"litellm_params": {"api_base": "http://evil", "api_key": "k"}}]}},
        {"litellm_params": {"api_base": "http://evil"}},
        {"extra_query": {"api_base": "http://evil"}},
        {"extra_body": {"api base": "http://evil"}},
        {"extra_body": {"api.key": "k"}},
        {"\uff41\uff50\uff49_\uff4b\uff45\uff59": "k"},
        {"base\u200burl": "http://evil"},
        {"organization": "org-other"},
        {"api_version": "2024-01-01"},
    ],
)
def test_review_bypasses_are_refused(extra: dict[str, object]) -> None:
    """Found in review: each of these was forwarded."""
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], **extra}).encode()
    with pytest.raises(InvalidRequest) as info:
        decode(body, "chat")
    assert info.value.status == 400 and info.value.param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        # The decoded value keeps only the last `a` (clean); the bytes, which go upstream, hold the first.
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "metadata": {"a": {"api_key": "k"}, "a": {}}}',
            "metadata.api_key",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "extra_body": {"b\\u0061se_url": 1, "x": 2}}',
            "extra_body.base_url",
        ),
    ],
)
def test_a_forbidden_name_hidden_by_a_repeated_key_or_an_escape_is_still_refused(body: bytes, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        decode(body, "chat")
    assert info.value.param == param
