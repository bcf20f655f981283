"""The native Anthropic adapter's translators in process (plugins.anthropic_messages): the canonical
request as a Messages body, a Messages answer (JSON and streamed, from the documented shapes in
tests/fixtures/anthropic/) as OpenAI's chat format, and hypothesis round trips through the Messages edge
(gateway.api.anthropic) that must give an Anthropic client back every block it was sent: thinking with its
signature byte for byte, redacted thinking, text, tool_use ids and inputs, stop reason and cache usage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.api.anthropic.decode import decode_messages
from gateway.api.anthropic.encode import messages_response
from gateway.api.anthropic.sse_encode import MessagesStream
from gateway.api.openai.decode import decode as decode_openai
from gateway.canonical import Request
from gateway.context import RequestContext
from gateway.contracts import End
from gateway.tokens import PromptTokens
from gateway.upstream.chat_body import Untranslatable
from gateway.upstream.sse import SSEDecoder
from plugins.anthropic_messages.adapter import _Stream
from plugins.anthropic_messages.answer import chat_completion
from plugins.anthropic_messages.request import messages_body

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "anthropic"
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def openai_request(**fields: Any) -> Request:
    return decode_openai(json.dumps({"model": "route", **fields}).encode(), "chat")


def body_of(request: Request, **kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(
        messages_body(
            request, "claude-x", stream=kw.pop("stream", False), default_max_tokens=kw.pop("default", 512), **kw
        )
    )
    return out


# ---- requests ----


def test_system_is_split_out_and_tool_results_join_the_next_user_turn() -> None:
    request = openai_request(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": "Use metric units."},
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "toolu_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_1", "content": "3 C"},
            {"role": "user", "content": "and tomorrow?"},
        ],
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        stop=["END"],
        user="u-7",
        temperature=0.2,
    )
    body = body_of(request)
    assert body["model"] == "claude-x" and body["max_tokens"] == 512  # the backend's default: the client gave none
    assert body["system"] == "Be brief.\n\nUse metric units."
    assert [t["role"] for t in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][1]["content"] == [
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}
    ]
    assert body["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "3 C"}]},
        {"type": "text", "text": "and tomorrow?"},
    ]
    assert body["tools"] == [{"name": "get_weather", "input_schema": {"type": "object"}}]
    assert body["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert body["stop_sequences"] == ["END"] and body["metadata"] == {"user_id": "u-7"} and body["temperature"] == 0.2


def test_tool_arguments_reach_the_upstream_as_their_bytes() -> None:
    arguments = '{"n": 1.50, "s": "\\u00e9"}'
    request = openai_request(
        messages=[
            {"role": "user", "content": "x"},
            {
                "role": "assistant",
                "tool_calls": [{"id": "t", "type": "function", "function": {"name": "f", "arguments": arguments}}],
            },
            {"role": "tool", "tool_call_id": "t", "content": "ok"},
        ]
    )
    raw = messages_body(request, "m", stream=False, default_max_tokens=8)
    assert b'"input":' + arguments.encode() in raw


def test_cache_control_goes_back_on_each_block_tool_and_system_block() -> None:
    ephemeral = {"type": "ephemeral"}
    raw = json.dumps(
        {
            "model": "route",
            "max_tokens": 64,
            "system": [{"type": "text", "text": "Long rules.", "cache_control": ephemeral}],
            "tools": [
                {"name": "f", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral", "ttl": "1h"}}
            ],
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"},
                            "cache_control": ephemeral,
                        },
                        {"type": "text", "text": "Describe.", "cache_control": ephemeral},
                    ],
                }
            ],
        }
    ).encode()
    body = body_of(decode_messages(raw))
    assert body["system"] == [{"type": "text", "text": "Long rules.", "cache_control": ephemeral}]
    assert body["tools"][0]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    image, text = body["messages"][0]["content"]
    assert image == {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"},
        "cache_control": ephemeral,
    }
    assert text["cache_control"] == ephemeral


def test_thinking_goes_back_signed_byte_for_byte_and_unsigned_reasoning_is_left_out() -> None:
    signature = "EqQBCkgIARABGAIiQL2U+/=="
    request = openai_request(
        messages=[
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": "a",
                "thinking_blocks": [
                    {"type": "thinking", "thinking": "hmm", "signature": signature},
                    {"type": "redacted_thinking", "data": "EmwKAhgB"},
                    {"type": "thinking", "thinking": "engine reasoning, no signature"},
                ],
            },
            {"role": "user", "content": "again"},
        ],
        reasoning_effort="high",
    )
    body = body_of(request, default=20000)
    assert body["messages"][1]["content"] == [
        {"type": "thinking", "thinking": "hmm", "signature": signature},
        {"type": "redacted_thinking", "data": "EmwKAhgB"},
        {"type": "text", "text": "a"},
    ]
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 16384}


def test_an_openai_inline_image_becomes_a_base64_source() -> None:
    url = "data:image/jpeg;base64,/9j/4AAQ"
    request = openai_request(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])
    assert body_of(request)["messages"][0]["content"] == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"}}
    ]


def test_a_prefill_continues_a_final_assistant_turn_within_what_is_left_of_max_tokens() -> None:
    request = openai_request(messages=[{"role": "user", "content": "count"}], max_tokens=100)
    body = body_of(request, prefill="one two ", prefill_tokens=2)
    assert body["messages"][-1] == {"role": "assistant", "content": [{"type": "text", "text": "one two"}]}
    assert body["max_tokens"] == 98


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"n": 2}, "n:"),
        ({"logprobs": True}, "logprobs"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"response_format": {"type": "json_object"}}, "json_object"),
        ({"tools": [{"type": "custom", "custom": {"name": "sql"}}]}, "custom"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ],
)
def test_what_messages_cannot_carry_is_refused_not_dropped(fields: dict[str, Any], says: str) -> None:
    request = openai_request(messages=[{"role": "user", "content": "hi"}], **fields)
    with pytest.raises(Untranslatable, match=says):
        messages_body(request, "m", stream=False, default_max_tokens=8)


def test_json_schema_output_becomes_output_config_format() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    request = openai_request(
        messages=[{"role": "user", "content": "hi"}],
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    )
    assert body_of(request)["output_config"] == {"format": {"type": "json_schema", "schema": schema}}


# ---- answers ----


def test_the_documented_message_becomes_a_chat_completion_with_its_blocks_kept() -> None:
    raw = (FIXTURES / "message_thinking_tool_use.json").read_bytes()
    source = json.loads(raw)
    chat = json.loads(chat_completion(raw))
    choice = chat["choices"][0]
    message = choice["message"]
    assert chat["id"] == source["id"] and chat["object"] == "chat.completion"
    assert choice["finish_reason"] == "tool_calls"
    assert message["content"] == "I'll check the weather for you."
    assert message["reasoning_content"] == source["content"][0]["thinking"]
    assert message["thinking_blocks"] == source["content"][:2]  # thinking (signature) and redacted, in order
    assert message["tool_calls"] == [
        {
            "id": "toolu_01A09q90qw90lq917835lq9",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"location": "Paris"}'},
        }
    ]
    # prompt_tokens = input + cache read + cache write; the details split the cached part.
    assert chat["usage"] == {
        "prompt_tokens": 24 + 1530,
        "completion_tokens": 92,
        "total_tokens": 24 + 1530 + 92,
        "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 1530},
    }
    back = json.loads(messages_response(chat_completion(raw), "route", "req_1"))
    assert back["content"] == source["content"]
    assert back["usage"] == {"input_tokens": 24, "output_tokens": 92, "cache_creation_input_tokens": 1530}


def _translate(sse: bytes, cuts: list[int]) -> list[bytes]:
    """The chunk payloads the adapter yields for an SSE body arriving in pieces cut at `cuts`."""
    state = _Stream(1 << 20, None)
    out: list[bytes] = []
    points = sorted({c % (len(sse) + 1) for c in cuts})
    pieces = [sse[a:b] for a, b in zip([0, *points], [*points, len(sse)], strict=True)]
    for piece in pieces:
        out += state.translate(state.decoder.feed(piece))
    out += state.translate(state.decoder.close())
    return out


def _ctx(native: Any = None) -> RequestContext:
    ctx = RequestContext(
        request_id="req_1", operation="chat", started=0.0, headers={}, prompt_tokens=PromptTokens.of(9)
    )
    ctx.native = native
    return ctx


def test_the_documented_thinking_stream_becomes_chunks_with_the_signature() -> None:
    chunks = _translate((FIXTURES / "stream_thinking_text.sse").read_bytes(), [17, 300, 301])
    assert chunks[-1] == b"[DONE]"
    parsed = [json.loads(c) for c in chunks[:-1]]
    deltas = [p["choices"][0]["delta"] for p in parsed if p["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Let me add 27 and 453. That is 480."
    assert [d["thinking_blocks"] for d in deltas if "thinking_blocks" in d] == [
        [
            {
                "type": "thinking",
                "thinking": "",
                "signature": "EqQBCkgIARABGAIiQL2UoU0b7ZLn4CHH0eQu4Lc7a3Ks4ooi0ZQ8gJDG0O0C8uXmyqPgL4T2ZvYQ2JcZcBTmgMPKQyOFyLmYvSYtaiISDEx2BAi2Tz0AzB3mNhoMzWsZTRAbOXR8Bz5LIjCrL2NkZVdZ",
            }
        ]
    ]
    assert "".join(d.get("content") or "" for d in deltas) == "27 + 453 = 480"
    assert [p["choices"][0]["finish_reason"] for p in parsed if p["choices"]][-1] == "stop"
    assert parsed[-1]["choices"] == [] and parsed[-1]["usage"] == {
        "prompt_tokens": 12 + 1530,
        "completion_tokens": 41,
        "total_tokens": 1583,
        "prompt_tokens_details": {"cached_tokens": 1530, "cache_write_tokens": 0},
    }


def test_the_documented_tool_stream_becomes_tool_call_deltas() -> None:
    chunks = _translate((FIXTURES / "stream_tool_use.sse").read_bytes(), [])
    deltas = [json.loads(c)["choices"][0]["delta"] for c in chunks[:-1] if json.loads(c)["choices"]]
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0] == {
        "index": 0,
        "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    assert "".join(c["function"]["arguments"] for c in calls) == '{"location": "San Francisco, CA"}'


def test_a_mid_stream_error_event_becomes_an_in_band_error_and_nothing_after_it() -> None:
    chunks = _translate((FIXTURES / "stream_error.sse").read_bytes() + b"event: ping\ndata: {}\n\n", [40])
    assert b"[DONE]" not in chunks
    assert json.loads(chunks[-1]) == {
        "error": {"message": "Overloaded", "type": "overloaded_error", "code": "overloaded_error"}
    }


# ---- round trips through the Messages edge (hypothesis) ----

ascii_text = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), min_size=1, max_size=30)
signatures = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=", min_size=8, max_size=120)
json_inputs = st.dictionaries(
    st.text("abcxyz", min_size=1, max_size=5), st.integers() | ascii_text | st.booleans(), max_size=3
)


@st.composite
def answers(draw: st.DrawFn) -> list[dict[str, Any]]:
    """An assistant turn in the order Anthropic sends it: thinking (signed or redacted), text, tool calls."""
    blocks: list[dict[str, Any]] = []
    for kind in draw(st.lists(st.sampled_from(["thinking", "redacted_thinking"]), max_size=3)):
        if kind == "thinking":
            blocks.append({"type": "thinking", "thinking": draw(ascii_text), "signature": draw(signatures)})
        else:
            blocks.append({"type": "redacted_thinking", "data": draw(signatures)})
    if draw(st.booleans()):
        blocks.append({"type": "text", "text": draw(ascii_text)})
    for i in range(draw(st.integers(0, 2))):
        blocks.append(
            {
                "type": "tool_use",
                "id": f"toolu_{i}{draw(st.text('abc123', min_size=3, max_size=8))}",
                "name": draw(st.text("fgh", min_size=1, max_size=6)),
                "input": draw(json_inputs),
            }
        )
    return blocks


usages = st.fixed_dictionaries(
    {
        "input_tokens": st.integers(0, 10**6),
        "output_tokens": st.integers(0, 10**5),
        "cache_read_input_tokens": st.integers(0, 10**6),
        "cache_creation_input_tokens": st.integers(0, 10**6),
    }
)


def _sse(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + json.dumps(data).encode() + b"\n\n"


def _stream_of(blocks: list[dict[str, Any]], usage: dict[str, int], reason: str, cut: int) -> bytes:
    """Anthropic's events for `blocks` (deltas cut at `cut` characters), as its API sends them."""
    head = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {**usage, "output_tokens": 1},
    }
    out = [_sse("message_start", {"type": "message_start", "message": head}), _sse("ping", {"type": "ping"})]
    for i, b in enumerate(blocks):
        kind = b["type"]
        if kind == "redacted_thinking":
            out.append(_sse("content_block_start", {"type": "content_block_start", "index": i, "content_block": b}))
        else:
            empty = {
                "text": {"type": "text", "text": ""},
                "thinking": {"type": "thinking", "thinking": "", "signature": ""},
                "tool_use": {**b, "input": {}},
            }[kind]
            out.append(_sse("content_block_start", {"type": "content_block_start", "index": i, "content_block": empty}))
            whole, field, dtype = {
                "text": (b.get("text"), "text", "text_delta"),
                "thinking": (b.get("thinking"), "thinking", "thinking_delta"),
                "tool_use": (json.dumps(b.get("input")), "partial_json", "input_json_delta"),
            }[kind]
            assert whole is not None
            for piece in (whole[:cut], whole[cut:]):
                if piece:
                    out.append(
                        _sse(
                            "content_block_delta",
                            {"type": "content_block_delta", "index": i, "delta": {"type": dtype, field: piece}},
                        )
                    )
            if kind == "thinking":
                out.append(
                    _sse(
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": i,
                            "delta": {"type": "signature_delta", "signature": b["signature"]},
                        },
                    )
                )
        out.append(_sse("content_block_stop", {"type": "content_block_stop", "index": i}))
    out.append(
        _sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": reason, "stop_sequence": None},
                "usage": {"output_tokens": usage["output_tokens"]},
            },
        )
    )
    out.append(_sse("message_stop", {"type": "message_stop"}))
    return b"".join(out)


def _assemble(stream: bytes) -> dict[str, Any]:
    """The message the anthropic SDK would assemble from the edge's events."""
    message: dict[str, Any] = {}
    partial: dict[int, str] = {}
    for frame in stream.decode().split("\n\n"):
        if not frame:
            continue
        head, data = frame.split("\n", 1)
        name, payload = head[7:], json.loads(data[6:])
        assert payload["type"] == name
        if name == "message_start":
            message = payload["message"]
        elif name == "content_block_start":
            assert payload["index"] == len(message["content"])
            message["content"].append(dict(payload["content_block"]))
        elif name == "content_block_delta":
            block, delta = message["content"][payload["index"]], payload["delta"]
            kind = delta["type"]
            if kind == "text_delta":
                block["text"] += delta["text"]
            elif kind == "thinking_delta":
                block["thinking"] += delta["thinking"]
            elif kind == "signature_delta":
                block["signature"] = delta["signature"]
            else:
                partial[payload["index"]] = partial.get(payload["index"], "") + delta["partial_json"]
        elif name == "content_block_stop" and payload["index"] in partial:
            message["content"][payload["index"]]["input"] = json.loads(partial.pop(payload["index"]))
        elif name == "message_delta":
            message["stop_reason"] = payload["delta"]["stop_reason"]
            message["usage"].update(payload["usage"])
    return message


def _reason(blocks: list[dict[str, Any]]) -> str:
    return "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"


@settings(max_examples=80, deadline=None)
@given(blocks=answers(), usage=usages)
def test_a_json_answer_round_trips_to_an_anthropic_client(blocks: list[dict[str, Any]], usage: dict[str, int]) -> None:
    reason = _reason(blocks)
    raw = json.dumps(
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "c",
            "content": blocks,
            "stop_reason": reason,
            "stop_sequence": None,
            "usage": usage,
        }
    ).encode()
    back = json.loads(messages_response(chat_completion(raw), "route", "req_1"))
    # Thinking first, then text, then tool calls: Anthropic's own order for a turn, kept.
    assert back["content"] == blocks
    assert back["id"] == "msg_1" and back["stop_reason"] == reason
    assert back["usage"]["input_tokens"] == usage["input_tokens"]
    assert back["usage"].get("cache_read_input_tokens", 0) == usage["cache_read_input_tokens"]
    assert back["usage"].get("cache_creation_input_tokens", 0) == usage["cache_creation_input_tokens"]


@settings(max_examples=80, deadline=None)
@given(blocks=answers(), usage=usages, cut=st.integers(0, 40), reads=st.lists(st.integers(0, 4000), max_size=6))
def test_a_stream_round_trips_to_an_anthropic_client_through_the_translation(
    blocks: list[dict[str, Any]], usage: dict[str, int], cut: int, reads: list[int]
) -> None:
    reason = _reason(blocks)
    chunks = _translate(_stream_of(blocks, usage, reason, cut), reads)
    assert chunks[-1] == b"[DONE]"
    encoder = MessagesStream(_ctx(), "route")
    out = encoder.batch(chunks[:-1]) + encoder.end(_ctx(), End("completed", 200))
    message = _assemble(out)
    assert message["content"] == blocks  # every signature, redacted block, tool id and input as sent
    assert message["stop_reason"] == reason
    assert message["usage"]["input_tokens"] == usage["input_tokens"]
    assert message["usage"].get("cache_read_input_tokens", 0) == usage["cache_read_input_tokens"]
    assert message["usage"].get("cache_creation_input_tokens", 0) == usage["cache_creation_input_tokens"]


@settings(max_examples=60, deadline=None)
@given(blocks=answers(), usage=usages, cut=st.integers(0, 40), reads=st.lists(st.integers(0, 4000), max_size=6))
def test_a_native_stream_reaches_an_anthropic_client_byte_for_byte(
    blocks: list[dict[str, Any]], usage: dict[str, int], cut: int, reads: list[int]
) -> None:
    from gateway.contracts import NativeAnswer

    sse = _stream_of(blocks, usage, _reason(blocks), cut)
    native = NativeAnswer("anthropic")
    state = _Stream(1 << 20, native)
    ctx = _ctx(native)
    encoder = MessagesStream(ctx, "route")
    decoder: SSEDecoder = state.decoder
    out = b""
    points = sorted({r % (len(sse) + 1) for r in reads})
    for a, b in zip([0, *points], [*points, len(sse)], strict=True):
        chunks = [c for c in state.translate(decoder.feed(sse[a:b])) if c != b"[DONE]"]
        if chunks:
            out += encoder.batch(chunks)
    out += encoder.end(ctx, End("completed", 200))
    assert out == sse


@settings(max_examples=60, deadline=None)
@given(blocks=answers(), text=ascii_text)
def test_an_assistant_turn_goes_up_as_it_came_from_an_anthropic_client(blocks: list[dict[str, Any]], text: str) -> None:
    """Messages -> canonical -> Messages (what a rescue or a translated retry sends) keeps every block."""
    turns = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    if blocks:
        turns.append({"role": "assistant", "content": blocks})
        calls = [b for b in blocks if b["type"] == "tool_use"]
        if calls:
            turns.append(
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": c["id"], "content": [{"type": "text", "text": "ok"}]}
                        for c in calls
                    ],
                }
            )
    request = decode_messages(json.dumps({"model": "r", "max_tokens": 9, "messages": turns}).encode())
    body = json.loads(messages_body(request, "m", stream=False, default_max_tokens=1))
    assert body["messages"] == turns
    assert msgspec.json.decode(messages_body(request, "m", stream=True, default_max_tokens=1))["stream"] is True
