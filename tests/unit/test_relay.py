"""The SSE relay in-process, driven event by event: no sockets, no sleeps.

The upstream is a stream the test feeds: each event, a reset, an error event or the end arrives exactly
when the test says, and the client reads (or leaves) at an exact point. The relay is the one the
pipeline composes (the upstream stage's event source with its taps and accounting's); a whole answer is
read through the edge's ASGI send path (`send_reply`, the OpenAI SSE codec). Each test states which
tokens are charged and that every cleanup (upstream close, accounting.complete, signals.finished) ran
once.
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import tracemalloc
from collections.abc import Iterator, Sequence
from typing import Any

import msgspec
import pytest

from gateway.accounting.records import UsageRecord
from gateway.api.asgi_send import Message, send_reply
from gateway.canonical import Request
from gateway.context import RequestContext
from gateway.contracts import End, UpstreamResponse, UpstreamStreamBroken
from gateway.pipeline import Pipeline
from gateway.policy.index import Principal, Target
from gateway.policy.model import Backend, Deployment, Model, Price
from gateway.reply import EventStream, Reply, close_stream
from gateway.stages.accounting import AccountingStage
from gateway.stages.upstream import UpstreamStage
from gateway.state import MemoryStore
from gateway.telemetry import Metrics
from gateway.tokens import PromptTokens, count_chat, count_text
from gateway.upstream.dispatch import Dispatcher
from gateway.upstream.redact import redactor_for
from gateway.upstream.signals import LiveSignals

ENCODING = "cl100k_base"
END = object()


def chunk(text: str) -> bytes:
    return msgspec.json.encode(
        {
            "id": "c1",
            "object": "chat.completion.chunk",
            "model": "m",
            "choices": [{"index": 0, "delta": {"content": text}}],
        }
    )


def usage_chunk(prompt: int, completion: int) -> bytes:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    return msgspec.json.encode({"id": "c1", "object": "chat.completion.chunk", "choices": [], "usage": usage})


def framed(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


ERROR_EVENT = b'{"error":{"message":"engine died","type":"server_error","code":"engine_error"}}'


class DrivenUpstream:
    """An upstream stream the test drives. `buffered` is what the adapter had received but not handed
    over when the stream stopped (what `drain` returns). Items pushed as a list arrive as one batch
    (one read) when `batched`."""

    def __init__(self, *, batched: bool = False) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.buffered: list[bytes] = []
        self.closed = 0
        self.drained = 0
        self.handed = 0
        self.batched = batched
        self.waiting = asyncio.Event()  # set while the relay waits for the next event

    def push(self, *items: Any) -> None:
        for item in items:
            self.queue.put_nowait(item)

    def __aiter__(self) -> DrivenUpstream:
        return self

    async def __anext__(self) -> Any:
        self.waiting.set()
        try:
            item = await self.queue.get()
        finally:
            self.waiting.clear()
        if item is END:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        self.handed += len(item) if isinstance(item, list) else 1
        return item

    def drain(self) -> list[bytes]:
        self.drained += 1
        out, self.buffered = self.buffered, []
        return out

    async def close(self) -> None:
        self.closed += 1

    def response(self) -> UpstreamResponse:
        if self.batched:
            return UpstreamResponse(status=200, batches=self, close=self.close, drain=self.drain)
        return UpstreamResponse(status=200, events=self, close=self.close, drain=self.drain)


class Writer:
    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    def submit(self, record: UsageRecord) -> None:
        self.records.append(record)


class CountingAccounting(AccountingStage):
    def __init__(self, writer: Writer) -> None:
        super().__init__(writer, MemoryStore(), Metrics())  # type: ignore[arg-type]
        self.completed: list[End] = []

    def complete(self, ctx: RequestContext, end: End) -> tuple[int, int]:
        self.completed.append(end)
        return super().complete(ctx, end)


class CountingSignals(LiveSignals):
    def __init__(self) -> None:
        super().__init__()
        self.finished_calls: list[str] = []

    def finished(self, backend: str) -> None:
        self.finished_calls.append(backend)
        super().finished(backend)


def make_ctx(*, include_usage: bool = False) -> RequestContext:
    backend = Backend(name="b1", adapter="openai", base_url="http://upstream.invalid/v1")
    deployment = Deployment(backend="b1", upstream_model="m", price=Price(input_per_mtok=1, output_per_mtok=2))
    model = Model(name="model", deployments=(deployment,), tokenizer=ENCODING)
    ctx = RequestContext(
        request_id="r1",
        operation="chat",
        started=0.0,
        headers={},
        route_name="chat",
        stream=True,
        include_usage=include_usage,
        principal=Principal(tenant="t", key_id="k", allowed_routes=None),
    )
    ctx.target = Target(model=model, deployment=deployment, backend=backend)
    ctx.prompt_tokens = PromptTokens.of(9)
    ctx.request = Request(operation="chat", model="chat", stream=True, include_usage=include_usage)
    return ctx


class FixedDispatcher:
    """The dispatcher's place: hands the upstream stage the test's upstream."""

    def __init__(self, upstream: DrivenUpstream) -> None:
        self.upstream = upstream

    async def call(self, ctx: RequestContext) -> UpstreamResponse:
        return self.upstream.response()


class Client:
    """The ASGI side of one response: what was sent, and a disconnect the test triggers."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.disconnect = asyncio.Event()

    async def receive(self) -> Message:
        await self.disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.messages.append(message)

    def events(self) -> list[bytes]:
        body = b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body")
        return [part + b"\n\n" for part in body.split(b"\n\n") if part]


class Harness:
    """The relay as the runtime composes it: Pipeline(upstream stage, taps=(accounting,))."""

    def __init__(self, *, include_usage: bool = False, batched: bool = False) -> None:
        self.upstream = DrivenUpstream(batched=batched)
        self.writer = Writer()
        self.accounting = CountingAccounting(self.writer)
        self.signals = CountingSignals()
        self.ctx = make_ctx(include_usage=include_usage)
        stage = UpstreamStage(FixedDispatcher(self.upstream), Metrics(), self.signals)  # type: ignore[arg-type]
        self.pipeline = Pipeline([], stage, taps=(self.accounting,))
        self._relay: EventStream | None = None
        self.client = Client()

    async def reply(self) -> Reply:
        reply = await self.pipeline.run(self.ctx)
        assert reply.stream is not None
        self._relay = reply.stream
        return reply

    @property
    def relay(self) -> EventStream:
        assert self._relay is not None
        return self._relay

    async def read(self) -> list[bytes]:
        if self._relay is None:
            await self.reply()
        return await self.relay.next()

    async def read_all(self) -> list[bytes]:
        """The whole answer through the edge's send path: the client's SSE events, framed."""
        await send_reply(await self.reply(), self.client.receive, self.client.send, self.ctx)
        return self.client.events()

    def record(self) -> UsageRecord:
        """The one usage record, after every cleanup ran exactly once."""
        assert self.upstream.closed == 1
        assert self.upstream.drained <= 1
        assert len(self.accounting.completed) == 1
        assert self.signals.finished_calls == ["b1"]
        [record] = self.writer.records
        return record


def tokens(*texts: str) -> int:
    return count_text("".join(texts), ENCODING)


WORDS = [" alpha", " delta", " echo", " golf", " hotel"]  # one cl100k token each


def texts(n: int) -> list[str]:
    return ["".join(WORDS[(i + j) % 5] for j in range(3)) for i in range(n)]  # 3 tokens per event


async def test_complete_stream_charges_the_providers_usage_and_ends_with_done() -> None:
    h = Harness()
    t = texts(3)
    h.upstream.push(*(chunk(x) for x in t), usage_chunk(9, 9), END)
    out = await h.read_all()
    assert out[-1] == b"data: [DONE]\n\n"
    assert len(out) == 4  # three chunks; the usage chunk the client did not ask for is dropped
    r = h.record()
    assert (r.completion_tokens, r.usage_source, r.partial, r.status) == (9, "provider", False, 200)
    assert h.upstream.drained == 0  # a complete stream has nothing left to drain


async def test_upstream_reset_charges_relayed_and_salvaged_events_and_sends_no_done() -> None:
    h = Harness()
    t = texts(5)
    h.upstream.push(chunk(t[0]), chunk(t[1]), UpstreamStreamBroken("reset"))
    # Received by the adapter before the reset, never handed over: charged, not relayed.
    h.upstream.buffered = [chunk(t[2]), chunk(t[3])]
    out = await h.read_all()
    assert out[:2] == [framed(chunk(t[0])), framed(chunk(t[1]))]
    assert len(out) == 3 and json.loads(out[2][6:])["error"]["code"] == "upstream_stream_broken"
    assert all(b"[DONE]" not in e for e in out)
    r = h.record()
    assert h.upstream.drained == 1
    assert (r.completion_tokens, r.usage_source, r.partial, r.status) == (tokens(*t[:4]), "estimated", True, 502)
    assert r.completion_tokens == 12


async def test_client_leaving_mid_stream_charges_what_the_upstream_had_delivered() -> None:
    h = Harness()
    t = texts(6)
    h.upstream.push(*(chunk(x) for x in t[:3]))
    h.upstream.buffered = [chunk(t[3]), chunk(t[4])]
    assert await h.read() == [chunk(t[0])]
    assert await h.read() == [chunk(t[1])]
    await close_stream(h.relay, "client_gone")  # the client went away at its second event (the edge's finally)
    r = h.record()
    # Relayed (2) + handed over but not yet read by the client (0: the relay pulls one at a time)
    # + buffered (2). The third queued event was never received by Strait: not charged.
    assert h.upstream.handed == 2
    assert (r.completion_tokens, r.partial, r.status, r.usage_source) == (
        tokens(*t[:2], *t[3:5]),
        True,
        200,
        "estimated",
    )


async def test_client_leaving_while_the_relay_waits_for_the_upstream_closes_it_once() -> None:
    h = Harness()
    t = texts(2)
    h.upstream.push(chunk(t[0]))
    sending = asyncio.ensure_future(send_reply(await h.reply(), h.client.receive, h.client.send, h.ctx))
    await h.upstream.waiting.wait()  # event 0 relayed; the relay now waits for the upstream's next event
    assert h.upstream.handed == 1 and h.accounting.completed == []
    h.client.disconnect.set()
    await sending  # the watcher cancelled the wait; send_reply ends quietly
    r = h.record()
    assert (r.completion_tokens, r.partial) == (3, True)
    assert h.accounting.completed[0].outcome == "client_gone"
    assert h.client.events() == [framed(chunk(t[0]))]  # no [DONE], no error event: nobody is listening


async def test_upstream_error_event_mid_stream_is_relayed_as_an_error_without_done() -> None:
    h = Harness()
    t = texts(2)
    h.upstream.push(chunk(t[0]), chunk(t[1]), ERROR_EVENT, chunk("never"), END)
    out = await h.read_all()
    assert len(out) == 3 and json.loads(out[2][6:])["error"]["code"] == "engine_error"
    r = h.record()
    assert (r.completion_tokens, r.status, r.partial) == (6, 502, True)


async def test_a_usage_chunk_among_the_drained_events_wins() -> None:
    h = Harness()
    t = texts(2)
    h.upstream.push(chunk(t[0]))
    h.upstream.buffered = [chunk(t[1]), usage_chunk(9, 6)]
    await h.read()
    await close_stream(h.relay, "client_gone")
    r = h.record()
    assert (r.completion_tokens, r.usage_source, r.partial) == (6, "provider", True)


async def test_stream_without_usage_gets_the_chunk_openai_would_have_sent() -> None:
    h = Harness(include_usage=True)
    t = texts(4)
    h.upstream.push(*(chunk(x) for x in t), END)
    out = await h.read_all()
    assert out[-1] == b"data: [DONE]\n\n"
    added = json.loads(out[-2][6:])
    assert added["usage"] == {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}
    assert added["id"] == "c1" and added["model"] == "m"
    r = h.record()
    assert (r.completion_tokens, r.usage_source, r.partial) == (12, "estimated", False)


# ---- memory: a relay holds O(1) of a stream, whatever its length ----

_VOCAB = ["the", "cat", "sat", "on", "a", "mat,", "and", "then", "it", "ran.", "Why?", "42", "naïve", "über", "\n"]


def _words(n: int) -> Iterator[str]:
    rng = random.Random(7)
    for _ in range(n):
        word = rng.choice(_VOCAB)
        yield " " + word if rng.random() < 0.9 else word


class GeneratedUpstream(DrivenUpstream):
    """`n` small events made on demand, so the test itself holds none of them."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.words = _words(n)

    async def __anext__(self) -> bytes:
        word = next(self.words, None)
        if word is None:
            raise StopAsyncIteration
        self.handed += 1
        return chunk(word)


async def _relay_peak(n: int) -> tuple[int, UsageRecord]:
    h = Harness()
    h.upstream = GeneratedUpstream(n)
    h.pipeline.terminal.dispatcher = FixedDispatcher(h.upstream)  # type: ignore[attr-defined]
    reply = await h.reply()
    assert reply.stream is not None
    count_text("load the encoding before measuring", ENCODING)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        while await reply.stream.next():
            pass
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return peak, h.record()


async def test_a_long_stream_does_not_grow_the_relay_and_is_counted_closely() -> None:
    n = 150_000
    await _relay_peak(2_000)  # first use: one-time allocations (tiktoken, decoders) are not the stream's
    small_peak, small = await _relay_peak(n // 10)
    peak, record = await _relay_peak(n)
    # Before: every event was kept to the end (150,000 events: a 28 MiB peak, 15,000: 4 MiB). Now the
    # peak does not depend on the length (~250 KiB for both, measured).
    assert peak < 1024 * 1024, peak
    assert peak < small_peak + 128 * 1024, (small_peak, peak)
    # Against tiktoken over the whole text at once: the meter counts ~8 KiB pieces cut before a
    # whitespace, so it may differ by at most a token per piece.
    for events, r in ((n // 10, small), (n, record)):
        whole = "".join(_words(events))
        exact = count_text(whole, ENCODING)
        pieces = len(whole) // (8 * 1024) + 1
        assert abs(r.completion_tokens - exact) <= pieces, (r.completion_tokens, exact, pieces)
        assert r.usage_source == "estimated"


# ---- the edge's send path: the stream always ends, promptly, also before its first event ----


class FailingHead(Client):
    """A client already gone when the response head is written (servers that raise on a closed socket)."""

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            raise OSError("connection reset by peer")
        await super().send(message)


async def test_a_client_gone_before_the_first_chunk_is_ended_at_once_not_at_garbage_collection() -> None:
    gc.disable()  # nothing may depend on a collection
    try:
        h = Harness()
        h.upstream.push(chunk("never sent"))
        h.client = FailingHead()
        with pytest.raises(OSError):
            await send_reply(await h.reply(), h.client.receive, h.client.send, h.ctx)
        # Before: the relay was a generator never started, so its `finally` never ran: no close, no
        # record, the backend's in-flight count never went down.
        r = h.record()
        assert h.upstream.handed == 0 and h.client.messages == []
        assert (r.status, r.partial, r.completion_tokens) == (200, True, 0)
        assert h.accounting.completed[0].outcome == "client_gone"
    finally:
        gc.enable()


class PausedHead(Client):
    """A client that stopped reading: writing the head waits (the server's flow control) until the test
    lets it go."""

    def __init__(self) -> None:
        super().__init__()
        self.paused = asyncio.Event()
        self.release = asyncio.Event()

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.paused.set()
            await self.release.wait()
        await super().send(message)


async def test_a_handler_cancelled_while_writing_the_head_still_ends_the_stream_once() -> None:
    gc.disable()
    try:
        h = Harness()
        h.client = client = PausedHead()
        sending = asyncio.ensure_future(send_reply(await h.reply(), client.receive, client.send, h.ctx))
        await client.paused.wait()
        sending.cancel()  # shutdown, or the server giving up on the connection
        with pytest.raises(asyncio.CancelledError):
            await sending
        h.record()
        assert h.accounting.completed[0].outcome == "client_gone"
    finally:
        gc.enable()


async def test_a_client_that_left_before_the_upstream_sent_anything_is_ended_by_the_watcher() -> None:
    gc.disable()
    try:
        h = Harness()
        h.client.disconnect.set()  # gone already: the first receive says so
        await send_reply(await h.reply(), h.client.receive, h.client.send, h.ctx)
        r = h.record()
        assert h.upstream.handed == 0 and (r.partial, r.status) == (True, 200)
        assert [m["type"] for m in h.client.messages] == ["http.response.start"]
    finally:
        gc.enable()


async def test_a_stage_failing_on_a_stream_reply_ends_the_stream() -> None:
    h = Harness()

    class Broken:
        name = "broken"

        async def on_request(self, ctx: RequestContext) -> None:
            return None

        async def on_response(self, ctx: RequestContext, reply: Reply) -> Reply:
            raise RuntimeError("a stage bug")

    h.pipeline = Pipeline([Broken()], h.pipeline.terminal, taps=(h.accounting,))
    with pytest.raises(RuntimeError):
        await h.pipeline.run(h.ctx)
    h.record()


# ---- batches: the events of one upstream read go to the client in one write ----


async def test_a_batch_is_one_write_and_the_usage_chunk_inside_it_is_dropped() -> None:
    h = Harness(batched=True)
    t = texts(3)
    h.upstream.push([chunk(t[0]), chunk(t[1])], [chunk(t[2]), usage_chunk(9, 9)], END)
    out = await h.read_all()
    bodies = [m["body"] for m in h.client.messages if m["type"] == "http.response.body"]
    assert bodies == [
        framed(chunk(t[0])) + framed(chunk(t[1])),
        framed(chunk(t[2])),
        b"data: [DONE]\n\n",
    ]
    assert out[-1] == b"data: [DONE]\n\n" and len(out) == 4
    r = h.record()
    assert (r.completion_tokens, r.usage_source, r.partial) == (9, "provider", False)


async def test_a_batch_that_brings_the_upstreams_end_goes_out_with_the_end_in_one_write() -> None:
    h = Harness(batched=True)
    t = texts(3)
    h.upstream.push([chunk(t[0])], [chunk(t[1]), chunk(t[2]), usage_chunk(9, 9), b"[DONE]"])
    out = await h.read_all()
    bodies = [(m["body"], m["more_body"]) for m in h.client.messages if m["type"] == "http.response.body"]
    assert bodies == [
        (framed(chunk(t[0])), True),
        (framed(chunk(t[1])) + framed(chunk(t[2])) + b"data: [DONE]\n\n", False),
    ]
    assert len(out) == 4
    r = h.record()
    assert (r.completion_tokens, r.usage_source, r.partial, r.status) == (9, "provider", False, 200)
    assert h.upstream.drained == 0


async def test_an_error_inside_a_batch_relays_the_events_before_it_then_the_error() -> None:
    h = Harness(batched=True)
    t = texts(3)
    h.upstream.push([chunk(t[0]), ERROR_EVENT, chunk(t[1])], END)
    out = await h.read_all()
    assert out[0] == framed(chunk(t[0])) and len(out) == 2
    assert json.loads(out[1][6:])["error"]["code"] == "engine_error"
    r = h.record()
    # Received is charged, relayed or not (the event after the error came in the same read).
    assert (r.completion_tokens, r.status, r.partial) == (6, 502, True)
    assert h.accounting.completed[0].outcome == "upstream_failed"


async def test_an_invalid_event_is_skipped_and_the_answer_goes_on() -> None:
    h = Harness()
    t = texts(2)
    h.upstream.push(chunk(t[0]), b"{not json", chunk(t[1]), END)
    out = await h.read_all()
    assert out[:2] == [framed(chunk(t[0])), framed(chunk(t[1]))]
    assert out[-1] == b"data: [DONE]\n\n"
    assert h.record().status == 200


async def test_a_stream_that_keeps_sending_invalid_events_ends_with_an_error() -> None:
    from gateway.stages.respond import MAX_MALFORMED_EVENTS

    h = Harness()
    h.upstream.push(chunk(texts(1)[0]), *([b"{not json"] * (MAX_MALFORMED_EVENTS + 1)), END)
    out = await h.read_all()
    assert len(out) == 2 and json.loads(out[1][6:])["error"]["code"] == "upstream_bad_event"
    assert h.record().status == 502


async def test_a_stalled_upstream_is_timed_out() -> None:
    h = Harness()
    h.upstream.push(
        chunk(texts(1)[0]),
        UpstreamStreamBroken("stalled", code="upstream_timeout", client_message="late", timeout=True),
    )
    out = await h.read_all()
    assert json.loads(out[-1][6:])["error"] == {
        "message": "late",
        "type": "server_error",
        "param": None,
        "code": "upstream_timeout",
    }
    r = h.record()
    assert (r.status, r.partial) == (504, True) and h.accounting.completed[0].outcome == "timed_out"


async def test_upstream_error_text_mid_stream_is_redacted() -> None:
    h = Harness()
    h.ctx.redact = redactor_for(["env:SECRET_KEY"], {"SECRET_KEY": "sk-live-abcdef0123456789"})
    error = {"error": {"message": "died on gpu-7.corp.internal:8000 with sk-live-abcdef0123456789", "type": "x"}}
    h.upstream.push(msgspec.json.encode(error), END)
    out = await h.read_all()
    message = json.loads(out[-1][6:])["error"]["message"]
    assert "sk-live" not in message and "corp.internal" not in message


class OneStreamAdapter:
    def __init__(self, upstream: DrivenUpstream) -> None:
        self.upstream = upstream

    async def send(self, call: Any) -> UpstreamResponse:
        return self.upstream.response()

    async def aclose(self) -> None:
        return None


@pytest.mark.parametrize("batched", [True, False])
async def test_a_stream_holds_its_backends_in_flight_count_until_it_ends(batched: bool) -> None:
    h = Harness(batched=batched)
    assert h.ctx.target is not None
    h.ctx.plan = (h.ctx.target,)
    dispatcher = Dispatcher({"b1": OneStreamAdapter(h.upstream)}, Metrics(), h.signals)  # type: ignore[dict-item]
    h.pipeline.terminal.dispatcher = dispatcher  # type: ignore[attr-defined]
    h.upstream.push([chunk("a")] if batched else chunk("a"))
    await h.reply()
    assert await h.read() == [chunk("a")]
    assert h.signals.in_flight == {"b1": 1}  # still generating for this stream
    h.upstream.push(END)
    assert await h.read() == []
    assert h.signals.in_flight == {"b1": 0} and h.signals.finished_calls == ["b1"]


async def test_an_adapter_bug_mid_stream_is_an_error_event_and_the_stream_still_ends_once() -> None:
    h = Harness()
    h.upstream.push(chunk(texts(1)[0]), RuntimeError("adapter bug"))
    out = await h.read_all()
    assert len(out) == 2 and json.loads(out[1][6:])["error"]["code"] == "upstream_stream_broken"
    r = h.record()
    assert (r.status, r.partial, r.completion_tokens) == (502, True, 3)


async def test_a_long_prompt_left_uncounted_is_counted_off_the_event_loop_when_no_usage_arrives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Prompts are counted lazily; a client that leaves before the usage chunk (or an engine that sends
    none) leaves accounting to estimate one. A few MB of text take seconds to tokenize: on the event
    loop that stalls every request of the process, so the count runs in a worker thread, and the
    record and the release follow it."""
    import threading

    import gateway.tokens

    counted_on: list[threading.Thread] = []
    real = gateway.tokens.count_chat

    def spy(texts: list[str], encoding_name: str = ENCODING) -> int:
        counted_on.append(threading.current_thread())
        return real(texts, encoding_name)

    monkeypatch.setattr(gateway.tokens, "count_chat", spy)
    h = Harness()
    prompt = ["word " * 5_000] * 2  # past OFFLOAD_CHARS
    h.ctx.prompt_tokens = PromptTokens(lambda: prompt, chat=True, encoding_name=ENCODING)
    t = texts(2)
    h.upstream.push(chunk(t[0]), chunk(t[1]))
    assert await h.read() == [chunk(t[0])]
    await close_stream(h.relay, "client_gone")
    assert h.ctx.settling is not None
    await h.ctx.settling  # what the edge awaits before the last byte
    [thread] = counted_on
    assert thread is not threading.main_thread()
    r = h.record()
    assert (r.prompt_tokens, r.completion_tokens, r.partial) == (real(prompt, ENCODING), tokens(t[0]), True)
    await h.accounting.drain()


async def test_a_short_uncounted_prompt_is_still_counted_at_once() -> None:
    h = Harness()
    h.ctx.prompt_tokens = PromptTokens(lambda: ["hello there"], chat=True, encoding_name=ENCODING)
    h.upstream.push(chunk(texts(1)[0]))
    await h.read()
    await close_stream(h.relay, "client_gone")
    assert h.ctx.settling is None  # in-process state, nothing deferred: recorded within the tap
    assert h.record().prompt_tokens == count_chat(["hello there"], ENCODING)


async def test_a_long_json_answer_without_usage_is_counted_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A JSON answer may be up to the upstream body limit (16 MiB by default): without provider usage
    its completion is tokenized in a worker thread, and the record and release follow it."""
    import threading

    import gateway.stages.accounting

    counted_on: list[threading.Thread] = []
    real = gateway.stages.accounting.completion_counts_of

    def spy(produced: Sequence[bytes], encoding_name: str) -> tuple[int, int]:
        counted_on.append(threading.current_thread())
        return real(produced, encoding_name)

    monkeypatch.setattr(gateway.stages.accounting, "completion_counts_of", spy)
    writer = Writer()
    accounting = CountingAccounting(writer)
    ctx = make_ctx()
    ctx.stream = False
    body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "word " * 10_000}}]}).encode()
    accounting.on_end(ctx, End("completed", 200, produced=(body,)))
    assert ctx.settling is not None
    await ctx.settling
    [thread] = counted_on
    assert thread is not threading.main_thread()
    [record] = writer.records
    assert (record.completion_tokens, record.reasoning_tokens) == real((body,), ENCODING)
    assert record.completion_tokens > 0 and record.usage_source == "estimated"
    await accounting.drain()
