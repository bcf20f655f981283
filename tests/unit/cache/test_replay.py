"""replay.py: stored answers replayed as stream chunks, relayed streams aggregated into the answer to
store, fresh ids. Property tests over generated answers, shape checks against the recorded fixtures,
and the official `openai` SDK's own stream accumulator as an independent reader of the replay."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from gateway.cache.replay import StreamAggregator, replay_chunks, replayable, with_id

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def sse_payloads(path: Path) -> list[bytes]:
    """The `data:` payloads of a recorded SSE body, `[DONE]` included."""
    return [line[len(b"data: ") :] for line in path.read_bytes().split(b"\n") if line.startswith(b"data: ")]


def aggregate(payloads: list[bytes], **kw: Any) -> dict[str, Any] | None:
    agg = StreamAggregator(**kw)
    for p in payloads:
        agg.feed(p)
    out = agg.result()
    return None if out is None else json.loads(out)


# -- generated answers ---------------------------------------------------------------------------------

text = st.text(max_size=300)
tool_call = st.fixed_dictionaries(
    {
        "id": st.from_regex(r"call_[A-Za-z0-9]{1,24}", fullmatch=True),
        "type": st.just("function"),
        "function": st.fixed_dictionaries({"name": st.from_regex(r"[a-z_]{1,20}", fullmatch=True), "arguments": text}),
    }
)
usage = st.fixed_dictionaries(
    {
        "prompt_tokens": st.integers(0, 10**6),
        "completion_tokens": st.integers(0, 10**6),
        "total_tokens": st.integers(0, 2 * 10**6),
    },
    optional={"prompt_tokens_details": st.fixed_dictionaries({"cached_tokens": st.integers(0, 100)})},
)


@st.composite
def answers(draw: st.DrawFn, with_usage: bool = True) -> dict[str, Any]:
    calls = draw(st.lists(tool_call, max_size=3))
    message: dict[str, Any] = {"role": "assistant", "content": draw(st.none() | text) if calls else draw(text)}
    if draw(st.booleans()):
        message["refusal"] = draw(st.none() | st.text(min_size=1, max_size=50))
    if calls:
        message["tool_calls"] = calls
    body: dict[str, Any] = {
        "id": "chatcmpl-" + draw(st.from_regex(r"[A-Za-z0-9]{1,30}", fullmatch=True)),
        "object": "chat.completion",
        "created": draw(st.integers(0, 2**33)),
        "model": draw(st.text(min_size=1, max_size=40)),
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": draw(st.sampled_from(["stop", "length", "tool_calls", "content_filter"])),
            }
        ],
    }
    if with_usage:
        body["usage"] = draw(usage)
    if draw(st.booleans()):
        body["system_fingerprint"] = draw(st.none() | st.from_regex(r"fp_[0-9a-f]{10}", fullmatch=True))
    if draw(st.booleans()):
        body["service_tier"] = "default"
    return body


def same_answer(got: dict[str, Any], want: dict[str, Any], *, with_usage: bool = True) -> None:
    g, w = got["choices"][0], want["choices"][0]
    assert g["message"] == w["message"]
    assert g["finish_reason"] == w["finish_reason"]
    # A stream carries usage only when the client asked for it (include_usage).
    assert got.get("usage") == (want.get("usage") if with_usage else None)
    for field in ("model", "system_fingerprint", "service_tier"):
        assert got.get(field) == want.get(field)


@settings(max_examples=300)
@given(answers(), st.booleans())
def test_aggregating_a_replay_gives_back_the_answer(body: dict[str, Any], include_usage: bool) -> None:
    raw = json.dumps(body).encode()
    chunks = replay_chunks(raw, response_id="chatcmpl-new", created=123, include_usage=include_usage)
    got = aggregate(chunks)
    assert got is not None
    same_answer(got, body, with_usage=include_usage)
    assert got["id"] == "chatcmpl-new" and got["created"] == 123 and got["object"] == "chat.completion"


@settings(max_examples=200)
@given(answers(), st.booleans())
def test_replay_chunks_are_chunk_json_with_a_usage_chunk_iff_asked(body: dict[str, Any], include_usage: bool) -> None:
    chunks = replay_chunks(json.dumps(body).encode(), response_id="r-1", created=7, include_usage=include_usage)
    decoded = [msgspec.json.decode(c) for c in chunks]
    assert all(d["object"] == "chat.completion.chunk" and d["id"] == "r-1" and d["created"] == 7 for d in decoded)
    usage_chunks = [d for d in decoded if d["choices"] == []]
    if include_usage:
        assert len(usage_chunks) == 1 and decoded[-1] is usage_chunks[0]
        assert decoded[-1]["usage"] == body["usage"]
        assert all(d["usage"] is None for d in decoded[:-1])  # as OpenAI: null on every other chunk
    else:
        assert usage_chunks == [] and all("usage" not in d for d in decoded)
    finishes = [d["choices"][0]["finish_reason"] for d in decoded if d["choices"]]
    assert finishes[-1] == body["choices"][0]["finish_reason"] and all(f is None for f in finishes[:-1])


@settings(max_examples=150)
@given(answers(), st.booleans())
def test_the_openai_sdk_reads_a_replay_as_the_answer(body: dict[str, Any], include_usage: bool) -> None:
    """An independent reader: the SDK's own stream accumulator (what `client.chat.completions.stream`
    uses) rebuilds the same message from our chunks."""
    chunks = replay_chunks(json.dumps(body).encode(), response_id="r", created=1, include_usage=include_usage)
    state: ChatCompletionStreamState[None] = ChatCompletionStreamState()
    for c in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate_json(c))
    # The accumulated snapshot (get_final_completion() refuses length / content_filter answers).
    final = state.current_completion_snapshot
    message, want = final.choices[0].message, body["choices"][0]["message"]
    assert message.content == want["content"]
    assert [(t.id, t.function.name, t.function.arguments) for t in message.tool_calls or []] == [
        (t["id"], t["function"]["name"], t["function"]["arguments"]) for t in want.get("tool_calls", [])
    ]
    assert final.choices[0].finish_reason == body["choices"][0]["finish_reason"]
    if include_usage:
        assert final.usage is not None and final.usage.prompt_tokens == body["usage"]["prompt_tokens"]


def test_a_body_without_usage_replays_without_a_usage_chunk() -> None:
    body = {
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    }
    chunks = [
        json.loads(c) for c in replay_chunks(json.dumps(body).encode(), response_id="r", created=1, include_usage=True)
    ]
    assert all(c["choices"] for c in chunks)


def test_long_content_goes_in_a_few_pieces() -> None:
    content = " ".join(f"word{i}" for i in range(400))
    body = {
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
    }
    chunks = replay_chunks(json.dumps(body).encode(), response_id="r", created=1, include_usage=False)
    pieces = [json.loads(c)["choices"][0]["delta"].get("content") for c in chunks[1:-1]]
    assert 4 <= len(pieces) <= 12 and "".join(pieces) == content


# -- the recorded fixtures -----------------------------------------------------------------------------


def test_aggregating_the_recorded_openai_stream_gives_the_recorded_answer() -> None:
    got = aggregate(sse_payloads(FIXTURES / "openai" / "chat_completion_stream_usage.sse"))
    want = json.loads((FIXTURES / "openai" / "chat_completion.json").read_text())
    assert got is not None
    assert got["choices"][0]["message"] == want["choices"][0]["message"]  # role, content, refusal: null
    assert got["choices"][0]["finish_reason"] == "stop"
    assert got["usage"] == want["usage"]
    assert got["system_fingerprint"] == "fp_06737a9306" and got["model"] == want["model"]
    assert got["service_tier"] == "default"
    assert list(got) == list(want)  # the same top-level keys in OpenAI's order


def test_aggregating_the_recorded_tool_call_stream() -> None:
    got = aggregate(sse_payloads(FIXTURES / "openai" / "chat_completion_stream_tool_calls.sse"))
    assert got is not None
    message = got["choices"][0]["message"]
    assert message["content"] is None and message["refusal"] is None
    assert message["tool_calls"] == [
        {
            "id": "call_Xq7bM2sKd0Lr9vYw3JhNfT1e",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"location":"Paris","unit":"celsius"}'},
        }
    ]
    assert got["choices"][0]["finish_reason"] == "tool_calls" and got["usage"]["total_tokens"] == 76


def test_aggregating_the_recorded_llamacpp_stream_gives_its_answer() -> None:
    got = aggregate(sse_payloads(FIXTURES / "llamacpp" / "chat_completion_stream_usage.sse"))
    want = json.loads((FIXTURES / "llamacpp" / "chat_completion.json").read_text())
    assert got is not None
    assert got["choices"][0]["message"] == want["choices"][0]["message"]  # no refusal key, as recorded
    assert got["choices"][0]["finish_reason"] == want["choices"][0]["finish_reason"]
    assert got["usage"]["completion_tokens"] == want["usage"]["completion_tokens"]
    # Without the usage chunk (stream_options not asked): no usage unless the caller supplies it.
    plain = sse_payloads(FIXTURES / "llamacpp" / "chat_completion_stream.sse")
    assert "usage" not in (aggregate(plain) or {"usage": 1})
    agg = StreamAggregator()
    for p in plain:
        agg.feed(p)
    supplied = agg.result(usage=b'{"prompt_tokens":37,"completion_tokens":14,"total_tokens":51}')
    assert supplied is not None and json.loads(supplied)["usage"]["total_tokens"] == 51


def keys_of(chunk: dict[str, Any]) -> tuple[Any, ...]:
    """A chunk's shape: its keys, its choice's keys, its delta's keys (values ignored)."""
    choice = chunk["choices"][0] if chunk["choices"] else {}
    return (tuple(sorted(chunk)), tuple(sorted(choice)), tuple(sorted(choice.get("delta", {}))))


def test_replayed_chunks_have_the_recorded_openai_shapes() -> None:
    recorded = [json.loads(p) for p in sse_payloads(FIXTURES / "openai" / "chat_completion_stream_usage.sse")[:-1]]
    body = (FIXTURES / "openai" / "chat_completion.json").read_bytes()
    replayed = [json.loads(c) for c in replay_chunks(body, response_id="chatcmpl-x", created=1, include_usage=True)]
    # role delta, content deltas, finish delta, usage chunk: each shaped as the recorded one
    assert keys_of(replayed[0]) == keys_of(recorded[0])
    assert {keys_of(c) for c in replayed[1:-2]} == {keys_of(c) for c in recorded[1:-2]}
    assert keys_of(replayed[-2]) == keys_of(recorded[-2])
    assert sorted(replayed[-1]) == sorted(recorded[-1]) and replayed[-1]["usage"] == recorded[-1]["usage"]
    assert replayed[0]["choices"][0]["delta"] == recorded[0]["choices"][0]["delta"]


def test_replayed_tool_calls_have_the_recorded_delta_shapes() -> None:
    path = FIXTURES / "openai" / "chat_completion_stream_tool_calls.sse"
    recorded = [json.loads(p) for p in sse_payloads(path)[:-1]]
    body = StreamAggregator()
    for p in sse_payloads(path):
        body.feed(p)
    stored = body.result()
    assert stored is not None
    replayed = [json.loads(c) for c in replay_chunks(stored, response_id="r", created=1, include_usage=True)]

    def tool_items(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [t for c in chunks if c["choices"] for t in c["choices"][0]["delta"].get("tool_calls", [])]

    def shape(item: dict[str, Any]) -> tuple[list[str], list[str]]:
        return sorted(item), sorted(item["function"])

    rec, rep = tool_items(recorded), tool_items(replayed)
    assert shape(rep[0]) == shape(rec[0])  # header: index, id, type, function{name, arguments: ""}
    assert rep[0]["function"]["arguments"] == rec[0]["function"]["arguments"] == ""
    assert {str(shape(i)) for i in rep[1:]} == {str(shape(i)) for i in rec[1:]}  # index, function{arguments}
    assert "".join(i["function"]["arguments"] for i in rep) == "".join(i["function"]["arguments"] for i in rec)
    # The role delta of a tool-call answer carries content null, as recorded.
    assert replayed[0]["choices"][0]["delta"]["content"] is None


# -- what the aggregator refuses -------------------------------------------------------------------------

OK_STREAM = sse_payloads(FIXTURES / "openai" / "chat_completion_stream_usage.sse")


def test_a_stream_without_finish_reason_is_not_an_answer() -> None:
    cut = [p for p in OK_STREAM if b'"finish_reason":"stop"' not in p]
    assert aggregate(cut) is None
    assert aggregate(OK_STREAM[:3]) is None


def test_an_error_chunk_or_garbage_or_fail_voids_the_stream() -> None:
    error = b'{"error":{"message":"upstream died","type":"server_error"}}'
    assert aggregate([*OK_STREAM[:3], error, *OK_STREAM[3:]]) is None
    assert aggregate([*OK_STREAM[:3], b"{not json", *OK_STREAM[3:]]) is None
    agg = StreamAggregator()
    for p in OK_STREAM:
        agg.feed(p)
    agg.fail()
    assert agg.result() is None and agg.failed


def test_a_second_choice_is_not_rebuilt() -> None:
    second = OK_STREAM[1].replace(b'"index":0', b'"index":1')
    assert aggregate([*OK_STREAM[:2], second, *OK_STREAM[2:]]) is None


def test_the_aggregator_stops_past_its_size_bound() -> None:
    total = sum(len(p) for p in OK_STREAM)
    assert aggregate(OK_STREAM, max_bytes=total) is not None
    assert aggregate(OK_STREAM, max_bytes=total - 1) is None


# -- fresh ids -------------------------------------------------------------------------------------------


def test_with_id_changes_id_and_created_and_keeps_every_other_value_byte_for_byte() -> None:
    body = (FIXTURES / "openai" / "chat_completion.json").read_bytes()
    fresh = with_id(body, "chatcmpl-fresh", 1800000000)
    before = msgspec.json.decode(body, type=dict[str, msgspec.Raw])
    after = msgspec.json.decode(fresh, type=dict[str, msgspec.Raw])
    assert list(after) == list(before)
    assert json.loads(bytes(after["id"])) == "chatcmpl-fresh" and json.loads(bytes(after["created"])) == 1800000000
    assert all(bytes(after[k]) == bytes(before[k]) for k in before if k not in ("id", "created"))


@given(answers())
def test_with_id_keeps_the_answer(body: dict[str, Any]) -> None:
    fresh = json.loads(with_id(json.dumps(body).encode(), "x", 5))
    assert {**fresh, "id": body["id"], "created": body["created"]} == body
    assert fresh["id"] == "x" and fresh["created"] == 5


def test_with_id_leaves_a_non_object_alone() -> None:
    assert with_id(b"[1,2]", "x", 1) == b"[1,2]"


def test_replayable_says_which_bodies_replay() -> None:
    assert replayable((FIXTURES / "openai" / "chat_completion.json").read_bytes())
    assert replayable((FIXTURES / "llamacpp" / "chat_completion.json").read_bytes())
    assert not replayable(b"not json")
    assert not replayable(b'{"choices": "nope"}')
    # Nulls where a lax upstream leaves them still replay (as an assistant message, empty names).
    lax = b'{"choices":[{"message":{"role":null,"content":"hi","tool_calls":[{"id":null,"function":{"name":null,"arguments":null}}]},"finish_reason":"stop"}]}'
    assert replayable(lax)
    got = aggregate(replay_chunks(lax, response_id="r", created=1, include_usage=False))
    assert got is not None and got["choices"][0]["message"]["content"] == "hi"
