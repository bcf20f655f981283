"""Bad request bodies get a 400 that names the field; nothing malformed gets through."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.api.asgi_send import body_chunks
from gateway.api.decode import decode, read_body
from gateway.canonical import Request, Text, ToolCall
from gateway.errors import ClientClosedRequest, InvalidRequest, PayloadTooLarge, RequestTimeout


def _chat(body: bytes) -> Request:
    return decode(body, "chat")


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        (b"{not json", None, "could not parse the JSON body"),
        (b"", None, "empty"),
        (b"[1, 2]", None, "must be a JSON object"),
        (b'{"model": "m"}', "messages", "missing required field `messages`"),
        (b'{"model": 5, "messages": []}', "model", "Expected `str`, got `int`"),
        (b'{"model": "m", "messages": "hi"}', "messages", "Expected `array`"),
        (b'{"model": "m", "messages": [{"role": "robot", "content": "x"}]}', "messages[0].role", "Invalid enum value"),
        (b'{"model": "m", "messages": []}', "messages", "at least one message"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 0}', "n", "between 1 and 128"),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}',
            "max_tokens",
            "at least 1",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 1.5}',
            "top_p",
            "between 0 and 1",
        ),
        (b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}', None, "lone surrogate"),
    ],
)
def test_bad_bodies_are_refused_with_the_field_named(body: bytes, param: str | None, fragment: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        _chat(body)
    assert info.value.status == 400
    assert info.value.param == param
    assert fragment in info.value.message


def test_unknown_fields_are_kept_for_the_upstream() -> None:
    request = decode(b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "top_k": 5}', "chat")
    assert request.model == "m"
    assert request.messages[0].content == (Text(text="x"),)
    assert bytes(request.extra["top_k"]) == b"5"


def test_multipart_content_and_tools_decode() -> None:
    body = (
        b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "what"},'
        b' {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}],'
        b' "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],'
        b' "tool_choice": {"type": "function", "function": {"name": "f"}}, "response_format": {"type": "json_object"}}'
    )
    request = _chat(body)
    assert request.tools[0].name == "f" and bytes(request.tools[0].parameters or b"") == b'{"type": "object"}'
    assert request.tool_choice is not None and request.tool_choice.name == "f"
    assert request.uses_images()


def test_embedding_inputs_must_not_mix_kinds() -> None:
    with pytest.raises(InvalidRequest) as info:
        decode(b'{"model": "e", "input": ["a", 1]}', "embeddings")
    assert info.value.param == "input"
    request = decode(b'{"model": "e", "input": [[1, 2], [3]]}', "embeddings")
    assert request.inputs == ((1, 2), (3,))


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_escape_as_anything_but_invalid_request(body: bytes) -> None:
    try:
        _chat(body)
    except InvalidRequest as exc:
        assert exc.status == 400


async def _chunks(parts: list[bytes]):  # type: ignore[no-untyped-def]
    for p in parts:
        yield p


async def test_oversized_body_is_refused_from_content_length_before_reading() -> None:
    read: list[bytes] = []

    async def never_read():  # type: ignore[no-untyped-def]
        read.append(b"x")
        yield b"x"

    with pytest.raises(PayloadTooLarge):
        await read_body(never_read(), "5000", 1024)
    assert read == []


async def test_a_negative_or_garbled_content_length_is_a_400() -> None:
    for value in ("-1", "12abc"):
        with pytest.raises(InvalidRequest) as info:
            await read_body(_chunks([b"{}"]), value, 1024)
        assert info.value.status == 400


async def test_oversized_chunked_body_is_refused_while_streaming() -> None:
    with pytest.raises(PayloadTooLarge) as info:
        await read_body(_chunks([b"a" * 600, b"b" * 600, b"c" * 600]), None, 1024)
    assert info.value.status == 413
    assert await read_body(_chunks([b"a" * 600, b"b" * 400]), None, 1024) == b"a" * 600 + b"b" * 400


@pytest.mark.parametrize("field", ["api_key", "api_base", "base_url"])
def test_upstream_urls_and_keys_in_the_body_are_refused(field: str) -> None:
    body = (
        b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "%s": "http://169.254.169.254/"}'
        % field.encode()
    )
    with pytest.raises(InvalidRequest) as info:
        _chat(body)
    assert info.value.param == field


def test_tool_results_and_multipart_texts_are_prompt_text() -> None:
    request = _chat(
        b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},'
        b' {"type": "text", "text": "b"}]}, {"role": "assistant", "content": null, "tool_calls":'
        b' [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},'
        b' {"role": "tool", "tool_call_id": "c1", "content": "result"}]}'
    )
    assert request.prompt_texts() == ["a b", "", "result"]
    assert [m.role for m in request.messages] == ["user", "assistant", "tool"]


@pytest.mark.parametrize("where", [b'"content": "\xff"', b'"content": "x", "x_unknown": "\xed\xa0\x80"'])
def test_invalid_utf8_anywhere_is_refused_even_in_fields_passed_through(where: bytes) -> None:
    with pytest.raises(InvalidRequest) as info:
        _chat(b'{"model": "m", "messages": [{"role": "user", ' + where + b"}]}")
    assert info.value.code == "invalid_json" and "UTF-8" in info.value.message


def test_custom_and_unknown_tool_types_decode_to_their_kind() -> None:
    tools = [
        {"type": "custom", "custom": {"name": "run_sql", "format": {"type": "text"}}},
        {"type": "web_search_preview"},
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
    ]
    messages = [
        {"role": "user", "content": "x"},
        {
            "role": "assistant",
            "tool_calls": [{"id": "c1", "type": "custom", "custom": {"name": "run_sql", "input": "SELECT 1;"}}],
        },
    ]
    body = json.dumps(
        {
            "model": "m",
            "messages": messages,
            "tools": tools,
            "tool_choice": {"type": "custom", "custom": {"name": "run_sql"}},
        }
    ).encode()
    request = decode(body, "chat")
    assert [(t.kind, t.name) for t in request.tools] == [
        ("custom", "run_sql"),
        ("web_search_preview", "web_search_preview"),
        ("function", "f"),
    ]
    assert request.tools[0].parameters is not None and bytes(request.tools[0].parameters) == b'{"type": "text"}'
    assert request.messages[1].content == (ToolCall(id="c1", name="run_sql", arguments="SELECT 1;", kind="custom"),)
    assert request.tool_choice is not None and request.tool_choice.name == "run_sql"
    assert request.tool_outside(frozenset({"function", "custom"})) == request.tools[1]
    assert request.original is not None and request.original.body == body


def test_a_function_tool_without_its_function_is_refused_naming_it() -> None:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]})
    with pytest.raises(InvalidRequest) as info:
        decode(body.encode(), "chat")
    assert info.value.param == "tools[0].function"


def test_requests_with_custom_tools_are_never_cached() -> None:
    """The cache replays function calls only; a custom tool's call would come back without its input."""
    from gateway.policy.model import RouteCache
    from gateway.stages.cache import uncacheable

    bounds = RouteCache(tools=True)
    function = {"type": "function", "function": {"name": "f"}}
    custom = {"type": "custom", "custom": {"name": "run_sql"}}
    base = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    assert uncacheable(decode(json.dumps({**base, "tools": [function]}).encode(), "chat"), bounds) is None
    assert uncacheable(decode(json.dumps({**base, "tools": [function, custom]}).encode(), "chat"), bounds) == "tools"


def _receive(messages: list[dict[str, object]]):  # type: ignore[no-untyped-def]
    queue = list(messages)

    async def receive() -> dict[str, object]:
        if not queue:
            await asyncio.Event().wait()  # a client that sends nothing more
        return queue.pop(0)

    return receive


def _messages(parts: list[bytes]) -> list[dict[str, object]]:
    return [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]


@given(st.lists(st.binary(max_size=40), min_size=1, max_size=6), st.integers(min_value=0, max_value=200))
def test_the_edge_body_reads_as_its_chunks_joined_or_413(parts: list[bytes], limit: int) -> None:
    """The edge's body source (BodyChunks): read whole (read_body) or iterated, the same bytes; 413 past the limit."""

    async def run() -> tuple[bytes | None, list[bytes]]:
        try:
            whole: bytes | None = await read_body(body_chunks(_receive(_messages(parts)), 5.0, 10.0), None, limit)
        except PayloadTooLarge:
            whole = None
        chunks = [c async for c in body_chunks(_receive(_messages(parts)), 5.0, 10.0)]
        return whole, chunks

    whole, chunks = asyncio.run(run())
    joined = b"".join(parts)
    assert whole == (joined if len(joined) <= limit else None)
    assert chunks == [p for p in parts if p]


async def test_the_edge_body_times_out_with_408_and_a_client_leaving_is_a_499() -> None:
    source = body_chunks(_receive([{"type": "http.request", "body": b"{", "more_body": True}]), 0.05, 10.0)
    with pytest.raises(RequestTimeout) as info:
        await read_body(source, None, 1024)
    assert "between chunks" in info.value.message
    assert source._timer is None  # closed: no timer outlives the read
    left = [{"type": "http.request", "body": b"{", "more_body": True}, {"type": "http.disconnect"}]
    with pytest.raises(ClientClosedRequest):
        await read_body(body_chunks(_receive(left), 5.0, 10.0), None, 1024)
    # Cancelled by someone else (not its timer): the cancellation goes on.
    task = asyncio.ensure_future(read_body(body_chunks(_receive([]), 5.0, 10.0), None, 1024))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
