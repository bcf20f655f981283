"""The SSE decoder must yield the same events however the bytes are split across reads."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.api.openai.sse_encode import encode_event
from gateway.upstream.sse import MAX_EVENT_BYTES, SSEDecoder, SSELineTooLong

payload = st.binary(min_size=1, max_size=40).filter(lambda b: b"\n" not in b and b"\r" not in b)


def _decode_all(data: bytes, cuts: list[int]) -> list[bytes]:
    return _feed_all(SSEDecoder(), data, cuts)


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


# ---- the cap: a line (or an event) longer than the decoder's limit is refused, whatever the split ----

CAP = 64


def _feed_all(dec: SSEDecoder, data: bytes, cuts: list[int]) -> list[bytes]:
    out: list[bytes] = []
    last = 0
    for cut in sorted(set(c % (len(data) + 1) for c in cuts)):
        out += dec.feed(data[last:cut])
        last = cut
    out += dec.feed(data[last:])
    out += dec.close()
    return out


line_body = st.binary(min_size=0, max_size=3 * CAP).filter(lambda b: b"\n" not in b and b"\r" not in b)


@settings(max_examples=400)
@given(
    st.lists(payload, max_size=4),
    line_body,
    st.sampled_from([b"data: ", b": ", b"event: "]),
    st.sampled_from([b"\n", b"\r\n", b"\r"]),
    st.lists(st.integers(0, 10_000)),
)
def test_a_line_over_the_cap_is_refused_whatever_the_split(
    before: list[bytes], body: bytes, field: bytes, eol: bytes, cuts: list[int]
) -> None:
    line = field + body
    stream = b"".join(b"data: " + p + eol + eol for p in before) + line + eol + eol
    dec = SSEDecoder(max_bytes=CAP)
    if len(line) > CAP:
        with pytest.raises(SSELineTooLong):
            _feed_all(dec, stream, cuts)
    else:
        expected = before + ([body] if field == b"data: " else [])
        assert _feed_all(dec, stream, cuts) == expected


@given(st.lists(st.integers(0, 10_000)))
def test_an_event_whose_data_lines_add_up_over_the_cap_is_refused(cuts: list[int]) -> None:
    half = b"x" * (CAP // 2)
    ok = b"data: " + half[:-8] + b"\n" + b"data: " + half[:-8] + b"\n\n"
    assert _feed_all(SSEDecoder(max_bytes=CAP), ok, cuts) == [half[:-8] + b"\n" + half[:-8]]
    too_big = b"".join(b"data: " + half[:-4] + b"\n" for _ in range(3)) + b"\n"
    with pytest.raises(SSELineTooLong):
        _feed_all(SSEDecoder(max_bytes=CAP), too_big, cuts)


def test_a_huge_line_is_refused_once_the_cap_is_passed_not_at_its_end() -> None:
    """The 48 MiB attack: refused after the first MiB, without waiting for (or buffering) the rest."""
    dec = SSEDecoder()  # the default cap
    piece = b"x" * 65536
    assert dec.feed(b'data: {"pad":"') == []
    fed = 0
    with pytest.raises(SSELineTooLong) as refused:
        for _ in range(48 * 16):
            dec.feed(piece)
            fed += len(piece)
    assert refused.value.limit == MAX_EVENT_BYTES
    # Refused by the feed that took the line past the cap (`fed` counts the feeds that returned).
    assert fed <= MAX_EVENT_BYTES < fed + len(piece) + len(b'data: {"pad":"')
