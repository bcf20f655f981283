"""The commit point of a streamed answer: the events an upstream sends before it is trusted with the
client's response are held here, and a stream that fails before that point is a failed attempt the
dispatcher retries or fails over like one that never answered (gateway.upstream.dispatch).

`hold` reads an upstream stream (already answered 200) until its first content event: a chunk with a
choice whose delta carries content, a tool call, reasoning or a refusal, a legacy completion's text, or
a finish_reason. The role-only first chunk engines send at once (`delta: {role: assistant}`, content
empty or null) is not content: an engine that answers its head and role chunk, then never generates,
must not win the request. With `whole` (a route's `resume: restart`) it reads on to the stream's end:
the client then only ever sees one complete answer.

Until then the attempt fails (`NotCommitted`) when:
- the deadline passes (the route's `timeouts.first_token_s` from the attempt's start; with `whole`,
  after the first content, `timeouts.stall_s` of silence): class `timeout`;
- the stream breaks, or ends (with or without `[DONE]`) before content: class `reset` (the connection
  was made, then the answer failed), `timeout` if the adapter's own read timeout ended it;
- an in-band error event arrives: class `5xx` (the engine reported a failure).

What is held is bounded: past `MAX_HELD_EVENTS` events or `max_bytes` bytes without content (or, with
`whole`, without the end) the stream is committed as it is (logged): holding more would be a memory
cost per request, and such a stream is making progress. The held events go to the client in one batch,
first (`UpstreamResponse.head`), then the stream goes on where it was.

Runs under the attempt's one deadline (the dispatcher's `AttemptTimer`, moved from the head's deadline
to the first token's: no second one) and costs one small decode per held event, only before the commit point
(the relay's own per-event check is unchanged).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

import msgspec

from gateway.contracts import UpstreamResponse, UpstreamStreamBroken
from gateway.upstream.retry import Failure
from gateway.upstream.sse import DONE
from gateway.upstream.wire import UpstreamErrorBody

log = logging.getLogger("strait.upstream")

# Events held before the first content event (an engine sends one role chunk, a few keep-alives at most).
MAX_HELD_EVENTS: Final = 256
# Bytes held before the first content event (with `whole`, the backend's max_body_bytes is the bound).
MAX_HELD_BYTES: Final = 1024 * 1024


class _Delta(msgspec.Struct, gc=False):
    content: str | None = None
    tool_calls: list[object] | None = None
    function_call: object | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    refusal: str | None = None


class _Choice(msgspec.Struct, gc=False):
    index: int = 0
    delta: _Delta | None = None
    text: str | None = None
    finish_reason: str | None = None


class _Probe(msgspec.Struct, gc=False):
    choices: list[_Choice] | None = None
    error: UpstreamErrorBody | str | None = None


_probe = msgspec.json.Decoder(_Probe).decode
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError)


def _has_content(choice: _Choice) -> bool:
    if choice.finish_reason is not None or choice.text:
        return True
    delta = choice.delta
    if delta is None:
        return False
    return bool(
        delta.content
        or delta.tool_calls
        or delta.function_call
        or delta.reasoning_content
        or delta.reasoning
        or delta.refusal
    )


class NotCommitted(Exception):
    """The attempt failed before its answer was committed to the client."""

    def __init__(
        self,
        failure: Failure,
        reason: str,
        *,
        after_content: bool = False,
        client_message: str | None = None,
        code: str | None = None,
        upstream_text: bool = False,
    ) -> None:
        super().__init__(reason)
        self.failure: Failure = failure
        # Content had reached the hold (only with `whole`): a restart moves on to the next deployment.
        self.after_content = after_content
        # What the client is told if no other attempt answers: the gateway's own words, or with
        # `upstream_text` the upstream's (redacted by the dispatcher before it reaches the client).
        self.client_message = client_message
        self.code = code
        self.upstream_text = upstream_text
        # With `after_content`: the events held until the failure (set by the dispatcher's
        # `_send_stream`), for billing what the broken attempt generated.
        self.events: list[bytes] = []

    @property
    def timeout(self) -> bool:
        return self.failure == "timeout"


class Held:
    """What an attempt sent before its commit point (events, bytes, whether content came, which choices
    finished): the caller keeps it, so that a timeout can tell what it interrupted."""

    __slots__ = ("bytes", "content", "done", "events", "finished")

    def __init__(self) -> None:
        self.events: list[bytes] = []
        self.bytes = 0
        self.content = False
        self.done = False  # [DONE] seen (with `whole`: the stream is complete)
        self.finished: set[int] = set()  # choices that sent their finish_reason


def _inspect(held: Held, batch: list[bytes], whole: bool) -> None:
    """Add a batch to the hold; raises NotCommitted on an in-band error before the commit point. What
    follows the first content event in its batch is the relay's to check (committed from there on)."""
    for i, payload in enumerate(batch):
        if held.content and not whole:
            held.events.extend(batch[i:])
            return
        if payload == DONE:
            held.done = True
            held.events.append(payload)
            return  # nothing follows [DONE]
        held.events.append(payload)
        held.bytes += len(payload)
        try:
            probe = _probe(payload)
        except _DECODE_ERRORS:
            continue  # malformed: the relay skips and counts it
        error = probe.error
        if error is not None:
            body = error if isinstance(error, UpstreamErrorBody) else UpstreamErrorBody(message=error)
            raise NotCommitted(
                "5xx",
                "an error event in the stream",
                after_content=held.content,
                client_message=body.message or None,
                code=body.code if isinstance(body.code, str) else None,
                upstream_text=True,
            )
        if probe.choices:
            for choice in probe.choices:
                if _has_content(choice):
                    held.content = True
                if choice.finish_reason is not None:
                    held.finished.add(choice.index)


class Reschedulable(Protocol):
    """The attempt's deadline as `hold` moves it: `asyncio.Timeout`, or the dispatcher's `AttemptTimer`."""

    def reschedule(self, when: float | None) -> None: ...


class AttemptTimer:
    """One deadline for a streamed attempt (the loop's clock): when it passes, the waiting task is
    cancelled, and `stop` tells the dispatcher that the cancellation was this deadline's (as an
    `asyncio.timeout_at` block turns it into TimeoutError), withdrawn so an outer cancel still counts.
    One timer handle and a few stores, where the block cost its object, two coroutines and a
    rescheduling (about 10 us a streamed request, measured)."""

    __slots__ = ("_base", "_handle", "_loop", "_own", "_task", "expired")

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any], when: float) -> None:
        self._loop = loop
        self._task = task
        self._base = task.cancelling()
        self.expired = False
        self._own = False
        self._handle: asyncio.TimerHandle | None = loop.call_at(when, self._expire)

    def reschedule(self, when: float | None) -> None:
        """Move the deadline (None: no deadline); once it has passed, nothing moves it."""
        if self.expired:
            return
        if self._handle is not None:
            self._handle.cancel()
        self._handle = None if when is None else self._loop.call_at(when, self._expire)

    def _expire(self) -> None:
        self._handle = None
        self.expired = True
        self._task.cancel()

    def stop(self) -> bool:
        """Disarm (idempotent); whether the task's cancellation was this deadline's own: it passed, and
        no other cancellation is pending once its own is withdrawn."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self.expired:
            self.expired = False
            self._own = self._task.uncancel() <= self._base
        return self._own


def _puller(response: UpstreamResponse) -> Callable[[], Awaitable[list[bytes]]]:
    if response.batches is not None:
        return response.batches.__anext__
    assert response.events is not None
    events = response.events

    async def pull() -> list[bytes]:
        return [await events.__anext__()]

    return pull


async def hold(
    response: UpstreamResponse,
    timer: Reschedulable,
    held: Held,
    *,
    whole: bool = False,
    stall_s: float | None = None,
    choices: int = 1,
    max_bytes: int = MAX_HELD_BYTES,
    name: str = "upstream",
) -> list[bytes]:
    """The events up to the commit point (the first content event, or with `whole` the end); raises
    NotCommitted. Runs under the caller's `timer` (the attempt's one deadline: the first token's; with
    `whole`, moved on by `stall_s` after each read once content came): a timeout surfaces where the
    caller waits for it (a cancellation the timer owns, or an `asyncio.Timeout` block's TimeoutError), where `timed_out(held)` says what it means. The caller
    closes the response on failure."""
    pull = _puller(response)
    loop = asyncio.get_running_loop()
    limit_events = MAX_HELD_EVENTS if not whole else 1 << 30
    while True:
        try:
            batch = await pull()
        except StopAsyncIteration:
            batch = []
        except UpstreamStreamBroken as exc:
            if exc.clean_end and held.content and len(held.finished) >= choices:
                # Complete without `[DONE]` (some engines omit it): Strait sends it.
                held.events.append(DONE)
                return held.events
            failure: Failure = "timeout" if exc.timeout else "reset"
            raise NotCommitted(
                failure,
                f"{name}: {exc}",
                after_content=held.content,
                client_message=exc.client_message,
                code=exc.code,
            ) from None
        except Exception as exc:
            log.exception("%s: the stream failed before it was committed", name)
            raise NotCommitted("reset", f"{name}: {type(exc).__name__}", after_content=held.content) from None
        if not batch:
            what = "the answer's end" if whole and held.content else "any content"
            raise NotCommitted("reset", f"{name}: the stream ended before {what}", after_content=held.content)
        _inspect(held, batch, whole)
        if held.done:
            if not held.content:
                raise NotCommitted("reset", f"{name}: the stream ended before any content")
            return held.events
        if held.content and not whole:
            return held.events
        if held.bytes > max_bytes or len(held.events) > limit_events:
            log.warning(
                "%s: %d events (%d bytes) held %s: committed as it is",
                name,
                len(held.events),
                held.bytes,
                "without its end" if whole else "without content",
            )
            return held.events
        if held.content:
            # Holding the whole answer: from its first content on, only silence is bounded.
            timer.reschedule(None if stall_s is None else loop.time() + stall_s)


def timed_out(held: Held, name: str = "upstream") -> NotCommitted:
    """What a timeout during `hold` means: no content in time, or (holding the whole answer) a stall."""
    if held.content:
        return NotCommitted("timeout", f"{name}: the stream stalled past the route's stall_s", after_content=True)
    return NotCommitted("timeout", f"{name}: no content within the route's first_token_s")


async def hold_until(response: UpstreamResponse, deadline: float, **options: Any) -> list[bytes]:
    """`hold` under a timeout block of its own ending at `deadline` (the loop's clock)."""
    held = Held()
    try:
        async with asyncio.timeout_at(deadline) as timer:
            return await hold(response, timer, held, **options)
    except TimeoutError:
        raise timed_out(held, options.get("name", "upstream")) from None
