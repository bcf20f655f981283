"""Mid-stream rescue's pieces (gateway.upstream.rescue, gateway.passthrough.with_prefill): what the client
has of a broken stream, the continuation's request body, and the stitching of its events."""

from __future__ import annotations

import json

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from gateway.passthrough import with_prefill
from gateway.upstream.rescue import Stitch, add_usage, compacted, what_was_sent
from gateway.upstream.wire import CompletionTokensDetails, PromptTokensDetails, Usage

ID = {"id": "chatcmpl-first", "created": 111, "model": "first-model", "system_fingerprint": "fp-1"}


def _chunk(delta: dict[str, object], finish: str | None = None, **head: object) -> bytes:
    body = {**ID, **head, "object": "chat.completion.chunk"}
    body["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}]
    return json.dumps(body).encode()


@given(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=30))
def test_what_was_sent_is_the_text_relayed_in_order(pieces: list[str]) -> None:
    events = [_chunk({"role": "assistant", "content": ""})] + [_chunk({"content": p}) for p in pieces]
    events.insert(2, b"not json")  # a malformed event the relay skipped is not text
    sent = what_was_sent(events)
    assert sent is not None
    assert sent.text == "".join(pieces)
    assert sent.identity == ID


def test_what_cannot_be_continued() -> None:
    text = _chunk({"content": "Hello"})
    assert what_was_sent([]) is None
    assert what_was_sent([_chunk({"role": "assistant", "content": ""})]) is None  # no text yet
    assert what_was_sent([text, _chunk({"tool_calls": [{"index": 0}]})]) is None
    assert what_was_sent([text, _chunk({}, finish="stop")]) is None  # it had finished
    other = json.dumps({**ID, "choices": [{"index": 1, "delta": {"content": "x"}}]}).encode()
    assert what_was_sent([text, other]) is None  # several choices


def test_the_continuation_body_asks_to_continue_the_prefix() -> None:
    body = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 30, "stream": True}
    ).encode()
    out = with_prefill(body, "Hello wor", 12)
    assert out is not None
    data = json.loads(out)
    assert data["messages"][-1] == {"role": "assistant", "content": "Hello wor"}
    assert data["continue_final_message"] is True and data["add_generation_prompt"] is False
    assert data["max_tokens"] == 18
    assert json.loads(with_prefill(body, "x", 99) or b"{}")["max_tokens"] == 1  # never 0 or less
    # The client's own assistant prefill is extended, not followed by a second assistant message.
    own = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure: "}]})
    data = json.loads(with_prefill(own.encode(), "one two", 0) or b"{}")
    assert data["messages"][-1] == {"role": "assistant", "content": "Sure: one two"}
    assert with_prefill(b'{"prompt": "x"}', "y", 0) is None  # not a chat body


def test_a_continuation_is_stitched_into_the_stream_the_client_has() -> None:
    earlier = Usage(prompt_tokens=10, completion_tokens=4, total_tokens=14)
    stitch = Stitch(ID, earlier)
    other = {"id": "chatcmpl-second", "created": 222, "model": "second-model", "system_fingerprint": "fp-2"}
    usage = json.dumps(
        {**other, "choices": [], "usage": {"prompt_tokens": 15, "completion_tokens": 6, "total_tokens": 21}}
    ).encode()
    out = stitch.events(
        [
            _chunk({"role": "assistant", "content": ""}, **other),  # the second role chunk: dropped
            _chunk({"role": "assistant", "content": "ld"}, **other),
            _chunk({}, finish="stop", **other),
            usage,
            b"[DONE]",
        ]
    )
    assert out[-1] == b"[DONE]"
    chunks = [msgspec.json.decode(e) for e in out[:-1]]
    assert len(chunks) == 3
    assert all({k: c[k] for k in ID} == ID for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"content": "ld"}
    assert chunks[2]["usage"] == {"prompt_tokens": 25, "completion_tokens": 10, "total_tokens": 35}


def test_every_token_kind_of_the_earlier_attempts_is_summed_into_the_stitched_usage() -> None:
    first = Usage(
        prompt_tokens=10,
        completion_tokens=4,
        total_tokens=14,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=6, cache_write_tokens=3),
        completion_tokens_details=CompletionTokensDetails(reasoning_tokens=2),
    )
    second = Usage(
        prompt_tokens=12,
        completion_tokens=5,
        total_tokens=17,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=1),
    )
    earlier = add_usage(add_usage(None, first), second)
    assert msgspec.json.decode(msgspec.json.encode(earlier)) == {
        "prompt_tokens": 22,
        "completion_tokens": 9,
        "total_tokens": 31,
        "prompt_tokens_details": {"cached_tokens": 7, "cache_write_tokens": 3},
        "completion_tokens_details": {"reasoning_tokens": 2},
    }
    own = {
        "prompt_tokens": 15,
        "completion_tokens": 6,
        "total_tokens": 21,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    out = Stitch(ID, earlier).events([json.dumps({**ID, "choices": [], "usage": own}).encode()])
    assert msgspec.json.decode(out[0])["usage"] == {
        "prompt_tokens": 37,
        "completion_tokens": 15,
        "total_tokens": 52,
        "prompt_tokens_details": {"cached_tokens": 11, "cache_write_tokens": 3},
        "completion_tokens_details": {"reasoning_tokens": 2},
    }


@given(
    st.lists(st.text(max_size=12), max_size=30),
    st.integers(min_value=0, max_value=30),
    st.sampled_from([None, "tool", "finish"]),
)
def test_compacting_the_relayed_events_changes_nothing_a_rescue_reads(
    pieces: list[str], at: int, ending: str | None
) -> None:
    events = [_chunk({"role": "assistant", "content": ""})] + [_chunk({"content": p}) for p in pieces]
    if ending == "tool":
        events.append(_chunk({"tool_calls": [{"index": 0}]}))
    elif ending == "finish":
        events.append(_chunk({}, finish="stop"))
    at = min(at, len(events))
    # Compacted at any point, then the rest relayed after it: what a rescue reads is the same.
    kept = compacted(events[:at])
    if kept is None:
        assert what_was_sent(events) is None
        return
    assert what_was_sent([*kept, *events[at:]]) == what_was_sent(events)
    assert len(kept) <= 1
