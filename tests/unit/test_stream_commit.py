"""The commit point of a stream (gateway.upstream.commit): what counts as content, what fails an attempt
before it, and what is held for the client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.contracts import UpstreamResponse, UpstreamStreamBroken
from gateway.upstream.commit import MAX_HELD_EVENTS, NotCommitted, hold_until

ROLE = b'{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}'
ROLE_NULL = b'{"choices":[{"index":0,"delta":{"role":"assistant","content":null}}]}'
CONTENT = b'{"choices":[{"index":0,"delta":{"content":"Hi"}}]}'
TOOL = b'{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{"}}]}}]}'
FINISH = b'{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}'
TEXT = b'{"choices":[{"index":0,"text":"Hi"}]}'
ERROR = b'{"error":{"message":"CUDA OOM"}}'
DONE = b"[DONE]"


def _response(*batches: list[bytes], then: BaseException | None = None, forever: bool = False) -> UpstreamResponse:
    async def gen() -> AsyncIterator[list[bytes]]:
        for b in batches:
            yield b
        if then is not None:
            raise then
        if forever:
            await asyncio.Event().wait()

    return UpstreamResponse(status=200, batches=gen())


def _later() -> float:
    return asyncio.get_running_loop().time() + 60


@pytest.mark.parametrize("first", [CONTENT, TOOL, FINISH, TEXT])
async def test_the_first_content_event_commits_and_everything_before_it_is_held(first: bytes) -> None:
    held = await hold_until(_response([ROLE], [ROLE_NULL, first, CONTENT]), _later())
    assert held == [ROLE, ROLE_NULL, first, CONTENT]


async def test_the_stream_goes_on_after_the_held_events() -> None:
    response = _response([ROLE, CONTENT], [FINISH, DONE])
    assert await hold_until(response, _later()) == [ROLE, CONTENT]
    assert response.batches is not None
    assert await response.batches.__anext__() == [FINISH, DONE]


async def test_an_error_after_content_in_the_same_read_is_the_relays_business() -> None:
    assert await hold_until(_response([ROLE, CONTENT, ERROR]), _later()) == [ROLE, CONTENT, ERROR]


@pytest.mark.parametrize(
    ("response", "failure"),
    [
        (_response([ROLE]), "reset"),  # ended after the role chunk
        (_response([ROLE, DONE]), "reset"),  # [DONE] without content
        (_response([ROLE], then=UpstreamStreamBroken("cut")), "reset"),
        (_response([ROLE], then=UpstreamStreamBroken("silent", timeout=True)), "timeout"),
        (_response([ROLE], then=RuntimeError("adapter bug")), "reset"),
        (_response([ROLE, ERROR]), "5xx"),
    ],
)
async def test_a_stream_that_fails_before_content_is_a_failed_attempt(response: UpstreamResponse, failure: str) -> None:
    with pytest.raises(NotCommitted) as caught:
        await hold_until(response, _later())
    assert caught.value.failure == failure


async def test_no_content_by_the_deadline_is_a_timeout() -> None:
    loop = asyncio.get_running_loop()
    with pytest.raises(NotCommitted) as caught:
        await hold_until(_response([ROLE], forever=True), loop.time() + 0.05)
    assert caught.value.failure == "timeout" and caught.value.timeout


async def test_what_is_held_is_bounded() -> None:
    many = [ROLE] * (MAX_HELD_EVENTS + 5)
    held = await hold_until(_response(many, forever=True), _later())
    assert len(held) == MAX_HELD_EVENTS + 5  # committed as it is, not held further


async def test_whole_holds_to_the_end_and_fails_on_a_break_after_content() -> None:
    assert await hold_until(_response([ROLE, CONTENT], [FINISH, DONE]), _later(), whole=True) == [
        ROLE,
        CONTENT,
        FINISH,
        DONE,
    ]
    with pytest.raises(NotCommitted) as caught:
        await hold_until(_response([ROLE, CONTENT], then=UpstreamStreamBroken("cut")), _later(), whole=True)
    assert caught.value.failure == "reset" and caught.value.after_content
    # A clean end after every choice finished is complete without [DONE]: Strait adds it.
    clean = UpstreamStreamBroken("no [DONE]", clean_end=True)
    assert await hold_until(_response([ROLE, CONTENT, FINISH], then=clean), _later(), whole=True) == [
        ROLE,
        CONTENT,
        FINISH,
        DONE,
    ]


async def test_whole_bounds_silence_after_content_with_stall_s() -> None:
    loop = asyncio.get_running_loop()
    with pytest.raises(NotCommitted) as caught:
        await hold_until(_response([ROLE, CONTENT], forever=True), loop.time() + 60, whole=True, stall_s=0.05)
    assert caught.value.failure == "timeout" and caught.value.after_content


@given(
    st.lists(st.sampled_from([ROLE, ROLE_NULL, b"not json", b'{"choices":[]}']), max_size=6),
    st.lists(st.sampled_from([CONTENT, TOOL, TEXT]), min_size=1, max_size=8),
    st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=20),
)
async def test_nothing_is_lost_or_reordered_whatever_the_reads(
    before: list[bytes], content: list[bytes], sizes: list[int]
) -> None:
    """The held events, then what the stream yields after, are exactly the upstream's events in order."""
    events = [*before, *content, FINISH, DONE]
    batches: list[list[bytes]] = []
    i = 0
    for size in sizes * len(events):
        if i >= len(events):
            break
        batches.append(events[i : i + size])
        i += size
    response = _response(*batches)
    held = await hold_until(response, _later())
    rest: list[bytes] = []
    assert response.batches is not None
    async for batch in response.batches:
        rest += batch
    assert held + rest == events
    # Held up to the read that brought the first content, not beyond it.
    first = len(before)
    assert first < len(held) <= first + 4
