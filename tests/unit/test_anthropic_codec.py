"""The Anthropic Messages codec in process: decoding (bounds, refusals), the translation to a chat body
and back (hypothesis round trips over generated text and tool content, whole and streamed in arbitrary
pieces), and Anthropic's error envelope and statuses."""

from __future__ import annotations

import itertools
import json
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.api.anthropic.decode import decode_messages
from gateway.api.anthropic.encode import error_status, gateway_error, messages_response, translated_error
from gateway.api.anthropic.sse_encode import MessagesStream
from gateway.api.inbound import InboundLimits
from gateway.context import RequestContext
from gateway.contracts import End
from gateway.errors import (
    AuthenticationFailed,
    ErrorBody,
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    PermissionDenied,
    RateLimited,
)
from gateway.tokens import PromptTokens
from gateway.upstream.chat_body import Untranslatable, chat_body

TOOL = {"name": "lookup", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}


def body(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "max_tokens": 16, **fields}).encode()


def chat(raw: bytes) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(raw)
    return out


# ---- decoding ----


def test_a_full_request_decodes_and_translates_to_a_chat_body() -> None:
    request = decode_messages(
        body(
            system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
            messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            stop_sequences=["END"],
            temperature=0.5,
            top_p=0.9,
            top_k=40,
            metadata={"user_id": "u-1"},
            tools=[TOOL],
            tool_choice={"type": "any", "disable_parallel_tool_use": True},
            thinking={"type": "enabled", "budget_tokens": 1024},
            stream=True,
        )
    )
    assert request.thinking is not None and request.thinking.budget_tokens == 1024
    sent = chat(chat_body(request, "up-model", stream=True))
    assert sent["model"] == "up-model"
    # System blocks are one system message (adjacent, as the model sees Anthropic's blocks).
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief.Be kind."},
        {"role": "user", "content": "hi"},
    ]
    assert (sent["max_tokens"], sent["stop"], sent["temperature"], sent["top_p"], sent["top_k"]) == (
        16,
        ["END"],
        0.5,
        0.9,
        40,
    )
    assert sent["user"] == "u-1"
    assert sent["tools"] == [{"type": "function", "function": {"name": "lookup", "parameters": TOOL["input_schema"]}}]
    assert sent["tool_choice"] == "required" and sent["parallel_tool_calls"] is False
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


def test_a_base64_image_becomes_a_data_url() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    request = decode_messages(body(messages=[{"role": "user", "content": [image, {"type": "text", "text": "?"}]}]))
    parts = chat(chat_body(request, "x", stream=False))["messages"][0]["content"]
    assert parts[0] == {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    assert parts[1] == {"type": "text", "text": "?"}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": None}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        (
            {"messages": [{"role": "system", "content": [{"type": "image", "source": {"type": "url", "url": "u"}}]}]},
            "messages[0].content[0]",
        ),
        # A block type Strait does not model is kept opaque (for an Anthropic upstream), not refused here:
        # tests/unit/test_anthropic_translate.py. A modelled one with a wrong field is refused.
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}, "messages[0].content[0].text"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_p": 2}, "top_p"),
        ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"name": "t"}]}, "tools[0].input_schema"),
        ({"messages": [{"role": "user", "content": "hi"}], "api_key": "sk-x"}, "api_key"),
        ({"messages": [{"role": "user", "content": "hi"}], "metadata": {"base_url": "http://x"}}, "metadata.base_url"),
    ],
)
def test_bad_requests_are_400s_naming_the_field(fields: dict[str, Any], param: str) -> None:
    raw = {"model": "m", "max_tokens": 16, **fields}
    if raw["max_tokens"] is None:
        del raw["max_tokens"]
    with pytest.raises(InvalidRequest) as info:
        decode_messages(json.dumps(raw).encode())
    assert info.value.status == 400
    assert info.value.param == param


def test_the_openai_codecs_bounds_apply() -> None:
    deep = (
        b'{"model":"m","max_tokens":1,"messages":[{"role":"user","content":"x"}],"metadata":'
        + b"[" * 80
        + b"]" * 80
        + b"}"
    )
    with pytest.raises(InvalidRequest, match="nest"):
        decode_messages(deep, InboundLimits(max_json_depth=64))
    with pytest.raises(InvalidRequest, match="max_tokens"):
        decode_messages(body(messages=[{"role": "user", "content": "x"}], max_tokens=10**9))


def test_structured_output_becomes_a_json_schema_response_format() -> None:
    """`output_config.format` (the SDK's `messages.parse(output_format=...)`) is carried to a chat upstream
    as `response_format` json_schema with the client's schema bytes, never dropped."""
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    hello = [{"role": "user", "content": "hi"}]
    request = decode_messages(body(messages=hello, output_config={"format": {"type": "json_schema", "schema": schema}}))
    sent = json.loads(chat_body(request, "up", stream=False))
    assert sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "strict": True, "schema": schema},
    }
    for config in ({"effort": "high"}, {"format": None}):  # no format: none asked for
        assert "response_format" not in json.loads(
            chat_body(decode_messages(body(messages=hello, output_config=config)), "up", stream=False)
        )
    with pytest.raises(InvalidRequest) as info:
        decode_messages(body(messages=hello, output_config={"format": {"type": "json_schema", "schema": [1]}}))
    assert info.value.param == "output_config.format.schema"


def test_a_system_message_in_the_list_stays_where_it_stands() -> None:
    """SDK 2.17 types allow `role: system` among the messages (SystemMessageParam): a chat system message
    at that place, as well as the top-level `system` first."""
    turns = [
        {"role": "user", "content": "hi"},
        {"role": "system", "content": [{"type": "text", "text": "Now answer in French."}]},
        {"role": "user", "content": "again"},
    ]
    sent = json.loads(chat_body(decode_messages(body(system="Be terse.", messages=turns)), "up", stream=False))
    assert [(m["role"], m["content"]) for m in sent["messages"]] == [
        ("system", "Be terse."),
        ("user", "hi"),
        ("system", "Now answer in French."),
        ("user", "again"),
    ]


def test_count_tokens_needs_no_max_tokens() -> None:
    raw = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    assert decode_messages(raw, count_only=True).max_output_tokens is None


def test_what_chat_completions_cannot_carry_is_refused_not_dropped() -> None:
    thinking = {"type": "thinking", "thinking": "hmm", "signature": "sig=="}
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [thinking, {"type": "text", "text": "hello"}]},
        {"role": "user", "content": "again"},
    ]
    with pytest.raises(Untranslatable, match="signature"):
        chat_body(decode_messages(body(messages=history)), "x", stream=False)
    server_tool = {"type": "web_search_20250305", "name": "web_search"}
    request = decode_messages(body(messages=[{"role": "user", "content": "hi"}], tools=[server_tool]))
    with pytest.raises(Untranslatable, match="web_search"):
        chat_body(request, "x", stream=False)


# ---- round trips: Messages -> canonical -> chat body -> chat response -> Messages ----

texts = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)
tool_inputs = st.dictionaries(st.from_regex(r"[a-z_]{1,8}", fullmatch=True), json_values, max_size=4)
names = st.from_regex(r"[a-zA-Z][a-zA-Z0-9_]{0,15}", fullmatch=True)


@st.composite
def assistant_turns(draw: st.DrawFn) -> list[dict[str, Any]]:
    """An assistant turn as Anthropic writes it: optional text, then zero or more tool calls."""
    blocks: list[dict[str, Any]] = []
    if draw(st.booleans()):
        blocks.append({"type": "text", "text": draw(texts)})
    for i in range(draw(st.integers(0 if blocks else 1, 3))):
        blocks.append(
            {"type": "tool_use", "id": f"toolu_{i}{draw(names)}", "name": draw(names), "input": draw(tool_inputs)}
        )
    return blocks


def _completion(assistant: dict[str, Any]) -> dict[str, Any]:
    """The chat completion an upstream would answer with that assistant message."""
    message: dict[str, Any] = {"role": "assistant", "content": assistant.get("content")}
    if assistant.get("tool_calls"):
        message["tool_calls"] = assistant["tool_calls"]
    finish = "tool_calls" if assistant.get("tool_calls") else "stop"
    return {
        "id": "chatcmpl-abc",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13},
    }


def _chunks(completion: dict[str, Any], cuts: list[int]) -> list[bytes]:
    """The same completion as a stream: text and each call's arguments cut at `cuts` (as upstreams do)."""
    message = completion["choices"][0]["message"]

    def pieces(text: str) -> list[str]:
        points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
        return [text[a:b] for a, b in itertools.pairwise(points) if b > a]

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return json.dumps(
            {"id": "chatcmpl-abc", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        ).encode()

    out = [chunk({"role": "assistant", "content": ""})]
    out += [chunk({"content": p}) for p in pieces(message["content"] or "")]
    for i, call in enumerate(message.get("tool_calls") or ()):
        f = call["function"]
        out.append(
            chunk(
                {
                    "tool_calls": [
                        {
                            "index": i,
                            "id": call["id"],
                            "type": "function",
                            "function": {"name": f["name"], "arguments": ""},
                        }
                    ]
                }
            )
        )
        out += [chunk({"tool_calls": [{"index": i, "function": {"arguments": p}}]}) for p in pieces(f["arguments"])]
    out.append(chunk({}, completion["choices"][0]["finish_reason"]))
    out.append(json.dumps({"id": "chatcmpl-abc", "choices": [], "usage": completion["usage"]}).encode())
    return out


def _assemble(stream: bytes) -> tuple[list[str], dict[str, Any]]:
    """The event names and the message an Anthropic SDK would assemble from them."""
    names: list[str] = []
    message: dict[str, Any] = {}
    partial: dict[int, str] = {}
    for frame in stream.decode().split("\n\n"):
        if not frame:
            continue
        head, data = frame.split("\n", 1)
        assert head.startswith("event: ") and data.startswith("data: ")
        name, payload = head[7:], json.loads(data[6:])
        assert payload["type"] == name
        names.append(name)
        if name == "message_start":
            message = payload["message"]
        elif name == "content_block_start":
            assert payload["index"] == len(message["content"])
            message["content"].append(dict(payload["content_block"]))
        elif name == "content_block_delta":
            block, delta = message["content"][payload["index"]], payload["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            else:
                partial[payload["index"]] = partial.get(payload["index"], "") + delta["partial_json"]
        elif name == "content_block_stop":
            if payload["index"] in partial:
                message["content"][payload["index"]]["input"] = json.loads(partial[payload["index"]])
        elif name == "message_delta":
            message["stop_reason"] = payload["delta"]["stop_reason"]
            message["usage"].update(payload["usage"])
    return names, message


def _ctx() -> RequestContext:
    return RequestContext(
        request_id="req_1", operation="chat", started=0.0, headers={}, prompt_tokens=PromptTokens.of(9)
    )


@settings(max_examples=60, deadline=None)
@given(turn=assistant_turns(), cuts=st.lists(st.integers(0, 200), max_size=4), result=texts)
def test_messages_to_chat_and_back_keeps_text_and_tool_content(
    turn: list[dict[str, Any]], cuts: list[int], result: str
) -> None:
    calls = [b for b in turn if b["type"] == "tool_use"]
    results = [{"type": "tool_result", "tool_use_id": c["id"], "content": result} for c in calls]
    history = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": turn},
        {"role": "user", "content": [*results, {"type": "text", "text": "and?"}]},
    ]
    request = decode_messages(body(messages=history, tools=[TOOL]))
    sent = chat(chat_body(request, "up", stream=False))["messages"]
    # The tool results follow the assistant's calls, one `role: tool` message each, ids kept.
    assert [m["role"] for m in sent] == ["user", "assistant", *["tool"] * len(calls), "user"]
    assert [(m["tool_call_id"], m["content"]) for m in sent[2 : 2 + len(calls)]] == [(c["id"], result) for c in calls]
    # The assistant turn, answered back by an upstream, is the same Messages content, whole or streamed.
    completion = _completion(sent[1])
    whole = json.loads(messages_response(json.dumps(completion).encode(), "route-x", "req_1"))
    assert whole["content"] == turn
    assert whole["model"] == "route-x" and whole["id"].startswith("msg_")
    assert whole["stop_reason"] == ("tool_use" if calls else "end_turn")
    assert whole["usage"] == {"input_tokens": 9, "output_tokens": 4}
    encoder = MessagesStream(_ctx(), "route-x")
    stream = encoder.batch(_chunks(completion, cuts)) + encoder.end(_ctx(), End("completed", 200))
    names, streamed = _assemble(stream)
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert streamed["content"] == turn
    assert streamed["stop_reason"] == whole["stop_reason"]
    assert streamed["usage"]["output_tokens"] == 4


def test_a_stream_split_across_batches_is_one_message() -> None:
    completion = _completion({"content": "hello world", "tool_calls": None})
    events = _chunks(completion, [3, 7])
    encoder = MessagesStream(_ctx(), "r")
    out = b"".join(encoder.batch([e]) for e in events) + encoder.end(_ctx(), End("completed", 200))
    names, message = _assemble(out)
    assert names.count("message_start") == 1 and names.count("content_block_start") == 1
    assert message["content"] == [{"type": "text", "text": "hello world"}]


def test_a_failed_stream_ends_with_an_error_event_and_no_message_stop() -> None:
    encoder = MessagesStream(_ctx(), "r")
    head = encoder.batch(_chunks(_completion({"content": "partial"}), [])[:2])
    error = ErrorBody(message="The upstream stream failed.", type="server_error", code="upstream_stream_broken")
    tail = encoder.end(_ctx(), End("upstream_failed", 502, error=error))
    assert b"event: message_start" in head
    assert tail.startswith(b"event: error\ndata: ")
    payload = json.loads(tail.split(b"data: ", 1)[1])
    assert payload["type"] == "error" and payload["error"] == {"type": "api_error", "message": error.message}
    assert b"message_stop" not in tail


# ---- errors ----


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        (InvalidRequest("bad"), 400, "invalid_request_error"),
        (AuthenticationFailed("no key"), 401, "authentication_error"),
        (PermissionDenied("no"), 403, "permission_error"),
        (ModelNotFound("model: x"), 404, "not_found_error"),
        (RateLimited("slow down"), 429, "rate_limit_error"),
        (GatewayError("boom"), 500, "api_error"),
        (Overloaded("busy"), 529, "overloaded_error"),
    ],
)
def test_errors_take_anthropics_envelope_and_status(error: GatewayError, status: int, kind: str) -> None:
    got_status, raw = gateway_error(error, "req_9")
    assert got_status == status
    assert msgspec.json.decode(raw) == {
        "type": "error",
        "error": {"type": kind, "message": error.message},
        "request_id": "req_9",
    }


def test_an_upstream_error_in_openais_envelope_is_translated() -> None:
    raw = b'{"error":{"message":"Rate limit reached","type":"rate_limit_error","code":"rate_limit_exceeded"}}'
    status, out = translated_error(429, raw, "req_2")
    assert status == 429
    assert msgspec.json.decode(out)["error"] == {"type": "rate_limit_error", "message": "Rate limit reached"}
    assert error_status(503) == 529 and error_status(502) == 502


# ---- an upstream's reasoning_content as thinking blocks, and back ----


def test_reasoning_content_becomes_an_unsigned_thinking_block() -> None:
    completion = {
        "id": "chatcmpl-r",
        "choices": [
            {"index": 0, "message": {"content": "42", "reasoning_content": "6 times 7"}, "finish_reason": "stop"}
        ],
    }
    message = json.loads(messages_response(json.dumps(completion).encode(), "r", "req_1"))
    assert message["content"] == [
        {"type": "thinking", "thinking": "6 times 7", "signature": ""},
        {"type": "text", "text": "42"},
    ]
    chunks = [
        json.dumps({"id": "chatcmpl-r", "choices": [{"index": 0, "delta": {"reasoning_content": piece}}]}).encode()
        for piece in ("6 times", " 7")
    ]
    chunks.append(json.dumps({"id": "chatcmpl-r", "choices": [{"index": 0, "delta": {"content": "42"}}]}).encode())
    encoder = MessagesStream(_ctx(), "r")
    stream = encoder.batch(chunks) + encoder.end(_ctx(), End("completed", 200))
    assert b'"type":"thinking_delta","thinking":" 7"' in stream
    events = [frame.split("\n", 1) for frame in stream.decode().split("\n\n") if frame]
    starts = [json.loads(data[6:])["content_block"] for head, data in events if head == "event: content_block_start"]
    assert starts == [{"type": "thinking", "thinking": "", "signature": ""}, {"type": "text", "text": ""}]


def test_an_unsigned_thinking_block_sent_back_is_left_out_a_signed_one_refused() -> None:
    def history(signature: str | None) -> bytes:
        thinking: dict[str, Any] = {"type": "thinking", "thinking": "6 times 7"}
        if signature is not None:
            thinking["signature"] = signature
        turns = [
            {"role": "user", "content": "6*7?"},
            {"role": "assistant", "content": [thinking, {"type": "text", "text": "42"}]},
            {"role": "user", "content": "thanks"},
        ]
        return body(messages=turns)

    for unsigned in (None, ""):
        sent = chat(chat_body(decode_messages(history(unsigned)), "x", stream=False))["messages"]
        assert sent[1] == {"role": "assistant", "content": "42"}
    with pytest.raises(Untranslatable):
        chat_body(decode_messages(history("EqQBCgIYAhIM")), "x", stream=False)


# ---- stop_sequence: only when the upstream says which sequence matched (vLLM's stop_reason) ----


@pytest.mark.parametrize(
    ("finish", "matched", "expected"),
    [
        ("stop", "END", ("stop_sequence", "END")),
        ("stop", "OTHER", ("end_turn", None)),  # not one of the client's: not claimed
        ("stop", 128009, ("end_turn", None)),  # a stop token id (vLLM's eos), not a sequence
        ("stop", None, ("end_turn", None)),  # OpenAI, llama.cpp: no word on it
        ("length", "END", ("max_tokens", None)),
    ],
)
def test_stop_sequence_is_reported_when_the_upstream_names_it(
    finish: str, matched: str | int | None, expected: tuple[str, str | None]
) -> None:
    completion = {
        "id": "chatcmpl-s",
        "choices": [{"index": 0, "message": {"content": "a b"}, "finish_reason": finish, "stop_reason": matched}],
    }
    whole = json.loads(messages_response(json.dumps(completion).encode(), "r", "req_1", ("END", "HALT")))
    assert (whole["stop_reason"], whole["stop_sequence"]) == expected
    ctx = _ctx()
    ctx.request = decode_messages(body(messages=[{"role": "user", "content": "x"}], stop_sequences=["END", "HALT"]))
    encoder = MessagesStream(ctx, "r")
    chunk = {
        "id": "chatcmpl-s",
        "choices": [{"index": 0, "delta": {}, "finish_reason": finish, "stop_reason": matched}],
    }
    stream = encoder.batch([json.dumps(chunk).encode()]) + encoder.end(ctx, End("completed", 200))
    delta = next(
        json.loads(data[6:])["delta"]
        for head, data in (f.split("\n", 1) for f in stream.decode().split("\n\n") if f)
        if head == "event: message_delta"
    )
    assert (delta["stop_reason"], delta["stop_sequence"]) == expected
