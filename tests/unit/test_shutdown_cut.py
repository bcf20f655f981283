"""The end of a shutdown's grace period, at the edge (gateway.inflight + gateway.api.asgi_send): a stream
still running ends with the `shutting_down` error event (never a silent cut) and is stopped once; one
that had already ended by itself ends as it would have; a JSON request cut while waiting for its upstream
is recorded with the 503 its client gets; a cut while the server holds a stream's head back still sends
the head and the error event; a cancellation that is not the shutdown's is
left alone. Against a real gateway process: tests/e2e/test_shutdown_live.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from gateway.api.asgi_send import send_reply
from gateway.context import RequestContext
from gateway.contracts import End, Outcome
from gateway.inflight import InFlight
from gateway.pipeline import Pipeline
from gateway.relay import EndTap
from gateway.reply import Reply


class HeldStream:
    """One event, then nothing until cancelled (an upstream that stalls); or, with `ended`, the stream
    had already ended by itself and only waits (as for its slots to be given back)."""

    def __init__(self, ended: Outcome | None = None) -> None:
        self.ended = ended
        self.pulled = 0
        self.stops: list[Outcome | None] = []

    async def next(self) -> list[bytes]:
        self.pulled += 1
        if self.pulled == 1:
            return [b'{"choices":[{"index":0,"delta":{"content":"hi"}}]}']
        await asyncio.Event().wait()
        return []

    @property
    def finished(self) -> bool:
        return False

    def stop(self, outcome: Outcome | None = None) -> End:
        self.stops.append(outcome)
        own = self.ended or outcome or "completed"
        return End(own, 200, partial=own != "completed", stream=True)

    def release(self) -> None:
        return None


def _edge(stream: HeldStream, inflight: InFlight, send: Any) -> asyncio.Future[None]:
    """The stream's reply sent as the edge sends it, the handler's task counted in flight; the client
    never leaves."""

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    ctx = RequestContext(request_id="r", operation="chat", started=0.0, headers={})
    reply = Reply(status=200, headers={}, stream=stream, media_type="text/event-stream")

    async def handler() -> None:
        task = asyncio.current_task()
        assert task is not None
        inflight.enter(task)
        try:
            await send_reply(reply, receive, send, ctx, inflight.was_cut)
        finally:
            inflight.leave(task)

    return asyncio.ensure_future(handler())


async def _serve(
    stream: HeldStream, inflight: InFlight, cut: bool
) -> tuple[list[dict[str, Any]], BaseException | None]:
    sent: list[dict[str, Any]] = []
    first_event = asyncio.Event()

    async def send(message: Any) -> None:
        sent.append(dict(message))
        if message["type"] == "http.response.body":
            first_event.set()

    task = _edge(stream, inflight, send)
    await first_event.wait()  # the stream is under way
    if cut:
        assert inflight.cut_all() == 1
    else:
        task.cancel()  # anyone else's cancellation (the server's own hard stop)
    error: BaseException | None = None
    try:
        await task
    except BaseException as exc:  # noqa: BLE001 - the outcome is what is checked
        error = exc
    return sent, error


async def test_a_stream_still_running_ends_with_the_shutdown_error_event() -> None:
    stream, inflight = HeldStream(), InFlight()
    sent, error = await _serve(stream, inflight, cut=True)
    assert error is None  # handled: the request ends normally, with its error event
    last = sent[-1]
    assert last["more_body"] is False
    body = last["body"].decode()
    assert body.startswith("data: ") and "[DONE]" not in body
    assert json.loads(body.removeprefix("data: "))["error"]["code"] == "shutting_down"
    assert stream.stops[0] == "client_gone"  # stopped (and so accounted) as cut short
    assert inflight.count == 0


async def test_a_stream_that_had_ended_by_itself_ends_as_it_would_have() -> None:
    stream = HeldStream(ended="completed")
    sent, error = await _serve(stream, InFlight(), cut=True)
    assert error is None
    assert sent[-1]["body"] == b"data: [DONE]\n\n" and sent[-1]["more_body"] is False


async def test_another_cancellation_is_not_taken_for_the_shutdown() -> None:
    stream = HeldStream()
    sent, error = await _serve(stream, InFlight(), cut=False)
    assert isinstance(error, asyncio.CancelledError)
    assert all(b"shutting_down" not in m.get("body", b"") for m in sent)
    assert stream.stops == ["client_gone"]  # still stopped once, in send_reply's finally


async def test_a_cut_while_the_server_holds_the_head_back_still_ends_with_the_shutdown_error_event() -> None:
    """The grace period ends while `send(http.response.start)` waits (uvicorn: a paused transport, before
    it writes anything): the head still goes out, followed by the error event, and the stream is stopped."""
    stream, inflight = HeldStream(), InFlight()
    sent: list[dict[str, Any]] = []
    head_held = asyncio.Event()
    held = True

    async def send(message: Any) -> None:
        nonlocal held
        if held and message["type"] == "http.response.start":
            held = False
            head_held.set()
            await asyncio.Event().wait()  # the server's flow control: nothing written yet
        sent.append(dict(message))

    task = _edge(stream, inflight, send)
    await head_held.wait()
    assert inflight.cut_all() == 1
    await task  # handled: no CancelledError
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 200 and sent[1]["more_body"] is False
    body = sent[1]["body"].decode()
    assert json.loads(body.removeprefix("data: "))["error"]["code"] == "shutting_down"
    assert stream.stops[0] == "client_gone" and stream.pulled == 0
    assert inflight.count == 0


def test_drain_is_idempotent_and_cuts_after_the_grace_period() -> None:
    async def run() -> tuple[int, bool]:
        inflight = InFlight()
        waiter = asyncio.ensure_future(asyncio.Event().wait())
        inflight.enter(waiter)
        inflight.drain(0.01)
        inflight.drain(100)  # a second signal does not move the deadline
        await asyncio.wait({waiter}, timeout=30)  # a deadline, not a synchronisation: the cut ends it
        return inflight.count, waiter.cancelled() and inflight.was_cut(waiter)

    assert asyncio.run(run()) == (1, True)


class _WaitingTerminal:
    """An upstream that has not answered yet (a JSON request waiting for it)."""

    name = "terminal"

    def __init__(self) -> None:
        self.asked = asyncio.Event()

    async def call(self, ctx: RequestContext) -> Reply:
        self.asked.set()
        await asyncio.Event().wait()
        raise AssertionError("never answered")


class _Ends(EndTap):
    name = "ends"

    def __init__(self) -> None:
        self.ends: list[End] = []

    def on_end(self, ctx: RequestContext, end: End) -> None:
        self.ends.append(end)


async def _json_request_cancelled(cut: bool) -> End:
    terminal, tap, inflight = _WaitingTerminal(), _Ends(), InFlight()
    pipeline = Pipeline([], terminal, taps=(tap,))

    async def handler() -> None:
        task = asyncio.current_task()
        assert task is not None
        inflight.enter(task)
        try:
            await pipeline.run(RequestContext(request_id="r", operation="chat", started=0.0, headers={}))
        finally:
            inflight.leave(task)

    task = asyncio.ensure_future(handler())
    await terminal.asked.wait()
    if cut:
        assert inflight.cut_all() == 1
    else:
        task.cancel()  # the client left (the disconnect cancels the handler)
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert len(tap.ends) == 1
    return tap.ends[0]


async def test_a_json_request_cut_by_the_shutdown_is_recorded_with_the_503_the_client_gets() -> None:
    end = await _json_request_cancelled(cut=True)
    assert (end.outcome, end.status, end.partial) == ("client_gone", 503, True)


async def test_a_json_request_whose_client_left_is_still_recorded_499() -> None:
    end = await _json_request_cancelled(cut=False)
    assert (end.outcome, end.status, end.partial) == ("client_gone", 499, True)
