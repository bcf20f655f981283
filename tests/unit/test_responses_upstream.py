"""An upstream's Responses answer read for the pipeline (plugins/openai_responses.py): the JSON object and
the SSE stream translated to OpenAI chat (what the taps read), the native events kept in order whatever
the read splits; and the request side, the client's body spliced for a Responses upstream
(gateway.api.responses.decode)."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.api.responses import decode
from gateway.contracts import NativeAnswer, UpstreamCall
from gateway.upstream.sse import DONE
from plugins.openai_responses import ResponsesStreamState, chat_completion

FIXTURES = Path(__file__).parent.parent / "fixtures" / "openai"
RESPONSE = (FIXTURES / "responses_response.json").read_bytes()
STREAM = (FIXTURES / "responses_stream.sse").read_bytes()

CALL_STREAM = b"".join(
    b"event: " + kind.encode() + b"\ndata: " + json.dumps({"type": kind, **fields}).encode() + b"\n\n"
    for kind, fields in [
        ("response.created", {"response": {"id": "resp_1", "model": "m", "output": []}}),
        (
            "response.output_item.added",
            {"output_index": 1, "item": {"type": "function_call", "call_id": "call_9", "name": "f", "arguments": ""}},
        ),
        ("response.function_call_arguments.delta", {"output_index": 1, "delta": '{"a"'}),
        ("response.function_call_arguments.delta", {"output_index": 1, "delta": ":1}"}),
        ("response.future.event", {"anything": [1, 2]}),
        (
            "response.completed",
            {"response": {"id": "resp_1", "status": "completed", "usage": {"input_tokens": 4, "output_tokens": 2}}},
        ),
    ]
)


def _chunks(payloads: list[bytes]) -> list[dict]:
    return [json.loads(p) for p in payloads if p != DONE]


def test_json_answer_becomes_a_chat_completion_with_every_usage_component() -> None:
    chat = json.loads(chat_completion(RESPONSE))
    assert chat["object"] == "chat.completion"
    assert chat["id"] == json.loads(RESPONSE)["id"]
    message = chat["choices"][0]["message"]
    assert message["content"] == "The capital of France is Paris."
    assert message["reasoning_content"] == "**Answering a simple question**"
    assert chat["choices"][0]["finish_reason"] == "stop"
    assert chat["usage"] == {
        "prompt_tokens": 13,
        "completion_tokens": 74,
        "total_tokens": 87,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 64},
    }


def test_function_call_and_incomplete_answers() -> None:
    call = {"type": "function_call", "call_id": "call_1", "name": "get", "arguments": '{"x":1}'}
    chat = json.loads(chat_completion(json.dumps({"id": "r", "output": [call]}).encode()))
    choice = chat["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert choice["message"]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "get", "arguments": '{"x":1}'}}
    ]
    cut = {"id": "r", "status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"}, "output": []}
    assert json.loads(chat_completion(json.dumps(cut).encode()))["choices"][0]["finish_reason"] == "length"


def test_an_answer_of_another_shape_is_refused() -> None:
    for raw in (b"[]", b'{"output": 3}', b"not json"):
        try:
            chat_completion(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        raise AssertionError(raw)


def _run(data: bytes, cuts: list[int]) -> tuple[list[bytes], list[tuple[bytes, bytes]], ResponsesStreamState]:
    state = ResponsesStreamState(1 << 20, NativeAnswer("responses"))
    out: list[bytes] = []
    start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        out.extend(state.feed(data[start:cut]))
        start = cut
    out.extend(state.feed(b""))
    assert state.native is not None
    return out, state.native.take(), state


def test_stream_translates_text_reasoning_and_usage() -> None:
    out, frames, state = _run(STREAM, [])
    assert out[-1] == DONE and out.count(DONE) == 1 and state.done
    chunks = _chunks(out)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    reasoning = "".join(c["choices"][0]["delta"].get("reasoning_content") or "" for c in chunks if c["choices"])
    assert text == "The capital of France is Paris."
    assert reasoning == "**Answering a simple question**"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["usage"]["completion_tokens_details"] == {"reasoning_tokens": 64}
    # Every event kept, in order, its data bytes as they came: re-framed, they are the upstream's stream.
    assert b"".join(b"event: " + n + b"\ndata: " + d + b"\n\n" for n, d in frames) == STREAM


def test_stream_function_call_and_unknown_events() -> None:
    out, frames, _ = _run(CALL_STREAM, [])
    chunks = _chunks(out)
    calls = [
        c["choices"][0]["delta"]["tool_calls"][0]
        for c in chunks
        if c["choices"] and "tool_calls" in c["choices"][0]["delta"]
    ]
    assert calls[0]["id"] == "call_9" and calls[0]["function"]["name"] == "f"
    assert {c["index"] for c in calls} == {0}
    assert "".join(c["function"]["arguments"] for c in calls) == '{"a":1}'
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"
    assert chunks[-1]["usage"]["prompt_tokens"] == 4
    assert b"response.future.event" in [n for n, _ in frames]


def test_failed_stream_ends_in_band_and_is_not_relayed() -> None:
    failed = b'event: response.failed\ndata: {"type":"response.failed","response":{"id":"r","status":"failed"}}\n\n'
    out, frames, state = _run(STREAM.split(b"event: response.output_text.delta")[0] + failed, [])
    assert "error" in json.loads(out[-1])
    assert DONE not in out and state.translator.errored and not state.done
    assert all(name != b"response.failed" for name, _ in frames)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM) + len(CALL_STREAM)), max_size=30), st.booleans())
def test_any_split_gives_the_same_translation_and_frames(cuts: list[int], calls: bool) -> None:
    data = CALL_STREAM if calls else STREAM
    whole_out, whole_frames, _ = _run(data, [])
    out, frames, _ = _run(data, [c for c in cuts if c <= len(data)])
    strip = [{k: v for k, v in c.items() if k != "created"} for c in _chunks(out)]
    assert strip == [{k: v for k, v in c.items() if k != "created"} for c in _chunks(whole_out)]
    assert out[-1] == DONE
    assert frames == whole_frames


# ---- the request side ----


def _original(body: dict, previous: list | None = None) -> tuple[bytes, bytes]:
    raw = json.dumps(body, indent=1).encode()
    wire, top = decode.parse(raw)
    stored = None if previous is None else [msgspec.Raw(json.dumps(i).encode()) for i in previous]
    request, _ = decode.build(wire, top, stored, raw)
    call = UpstreamCall(operation="chat", request=request, model="gpt-up", stream=False, request_id="r1")
    spliced = call.passthrough("responses")
    assert spliced is not None
    assert call.passthrough("openai") is None  # a chat upstream gets the translation
    return raw, spliced


def test_the_client_bytes_go_up_with_only_the_model_replaced() -> None:
    body = {"model": "route", "input": [{"type": "reasoning", "encrypted_content": "gAAAA\u00e9"}], "x_unknown": 1.0}
    raw, spliced = _original(body)
    assert spliced == raw.replace(b'"route"', b'"gpt-up"')


def test_a_previous_response_id_is_resolved_into_the_input() -> None:
    earlier = [{"role": "user", "content": "hi"}, {"type": "reasoning", "id": "rs_1", "encrypted_content": "gAAAAx"}]
    body = {"model": "route", "previous_response_id": "resp_abc", "input": "again", "store": True}
    _, spliced = _original(body, earlier)
    sent = json.loads(spliced)
    assert "previous_response_id" not in sent
    assert sent["model"] == "gpt-up" and sent["store"] is True
    again = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "again"}]}
    assert sent["input"] == [*earlier, again]
