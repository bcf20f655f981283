"""The SSE decoder must yield the same events however the bytes are split across reads."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.api.sse import SSEDecoder, encode_event

payload = st.binary(min_size=1, max_size=40).filter(lambda b: b"\n" not in b and b"\r" not in b)


def _decode_all(data: bytes, cuts: list[int]) -> list[bytes]:
    dec = SSEDecoder()
    out: list[bytes] = []
    last = 0
    for cut in sorted(set(c % (len(data) + 1) for c in cuts)):
        out += dec.feed(data[last:cut])
        last = cut
    out += dec.feed(data[last:])
    out += dec.close()
    return out


@settings(max_examples=300)
@given(
    st.lists(payload, min_size=1, max_size=8),
    st.sampled_from([b"\n", b"\r\n", b"\r"]),
    st.lists(st.integers(0, 10_000)),
)
def test_any_split_yields_the_same_events(payloads: list[bytes], eol: bytes, cuts: list[int]) -> None:
    stream = b"".join(b"data: " + p + eol + eol for p in payloads)
    assert _decode_all(stream, cuts) == payloads


@given(st.lists(payload, min_size=1, max_size=5), st.lists(st.integers(0, 10_000)))
def test_comments_and_other_fields_are_ignored(payloads: list[bytes], cuts: list[int]) -> None:
    stream = b": ping\n\n" + b"".join(b"event: message\nid: 7\ndata: " + p + b"\n\n" for p in payloads)
    assert _decode_all(stream, cuts) == payloads


def test_multiline_data_is_joined_with_newline() -> None:
    assert SSEDecoder().feed(b"data: a\ndata: b\n\n") == [b"a\nb"]


def test_final_event_without_blank_line_is_kept_on_close() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: x\n\ndata: [DONE]") == [b"x"]
    assert dec.close() == [b"[DONE]"]


def test_encode_event_round_trips() -> None:
    assert SSEDecoder().feed(encode_event(b'{"a":1}')) == [b'{"a":1}']
