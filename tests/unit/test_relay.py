"""The SSE relay in-process, driven event by event: no sockets, no sleeps.

The upstream is a stream the test feeds: each event, a reset, an error event or the end arrives exactly
when the test says, and the client reads (or leaves) at an exact point. Each test states which tokens
are charged and that every cleanup (upstream close, accounting.complete, signals.finished) ran once.
"""

from __future__ import annotations

import asyncio
import json
import random
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import pytest

from gateway.accounting.records import UsageRecord
from gateway.context import RequestContext
from gateway.contracts import UpstreamResponse, UpstreamStreamBroken
from gateway.policy.index import Principal, Target
from gateway.policy.model import Backend, Deployment, Model, Price
from gateway.stages.accounting import AccountingStage
from gateway.stages.respond import respond
from gateway.state import MemoryStore
from gateway.telemetry import Metrics
from gateway.tokens import PromptTokens, count_text
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


ERROR_EVENT = b'{"error":{"message":"engine died","type":"server_error","code":"engine_error"}}'


class DrivenUpstream:
    """An upstream stream the test drives. `buffered` is what the adapter had received but not handed
    over when the stream stopped (what `drain` returns)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.buffered: list[bytes] = []
        self.closed = 0
        self.drained = 0
        self.handed = 0
        self.waiting = asyncio.Event()  # set while the relay waits for the next event

    def push(self, *items: Any) -> None:
        for item in items:
            self.queue.put_nowait(item)

    def __aiter__(self) -> DrivenUpstream:
        return self

    async def __anext__(self) -> bytes:
        self.waiting.set()
        try:
            item = await self.queue.get()
        finally:
            self.waiting.clear()
        if item is END:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        self.handed += 1
        assert isinstance(item, bytes)
        return item

    def drain(self) -> list[bytes]:
        self.drained += 1
        out, self.buffered = self.buffered, []
        return out

    async def close(self) -> None:
        self.closed += 1

    def response(self) -> UpstreamResponse:
        return UpstreamResponse(status=200, events=self, close=self.close, drain=self.drain)


class Writer:
    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    def submit(self, record: UsageRecord) -> None:
        self.records.append(record)


class CountingAccounting(AccountingStage):
    def __init__(self, writer: Writer) -> None:
        super().__init__(writer, MemoryStore(), Metrics())  # type: ignore[arg-type]
        self.completed: list[dict[str, Any]] = []

    def complete(self, ctx: RequestContext, **kw: Any) -> tuple[int, int]:
        self.completed.append(kw)
        return super().complete(ctx, **kw)


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
    return ctx


class Harness:
    def __init__(self, *, include_usage: bool = False) -> None:
        self.upstream = DrivenUpstream()
        self.writer = Writer()
        self.accounting = CountingAccounting(self.writer)
        self.signals = CountingSignals()
        self.ctx = make_ctx(include_usage=include_usage)
        reply = respond(self.ctx, self.upstream.response(), Metrics(), self.signals, self.accounting)
        assert reply.stream is not None
        self.relay: AsyncIterator[bytes] = reply.stream  # type: ignore[assignment]

    async def read(self) -> bytes:
        return await self.relay.__anext__()

    async def read_all(self) -> list[bytes]:
        return [e async for e in self.relay]

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
    assert out[:2] == [b"data: " + chunk(t[0]) + b"\n\n", b"data: " + chunk(t[1]) + b"\n\n"]
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
    assert await h.read() == b"data: " + chunk(t[0]) + b"\n\n"
    assert await h.read() == b"data: " + chunk(t[1]) + b"\n\n"
    await h.relay.aclose()  # type: ignore[attr-defined]  # the client went away at its second event
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


async def test_client_cancelled_while_waiting_for_the_upstream_still_closes_it_once() -> None:
    h = Harness()
    t = texts(2)
    h.upstream.push(chunk(t[0]))
    assert await h.read() == b"data: " + chunk(t[0]) + b"\n\n"
    waiting = asyncio.ensure_future(h.read())
    await h.upstream.waiting.wait()  # the relay now waits for the upstream's next event
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    r = h.record()
    assert (r.completion_tokens, r.partial) == (3, True)


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
    await h.relay.aclose()  # type: ignore[attr-defined]
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
    reply = respond(h.ctx, h.upstream.response(), Metrics(), h.signals, h.accounting)
    assert reply.stream is not None
    count_text("load the encoding before measuring", ENCODING)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        async for _ in reply.stream:  # type: ignore[attr-defined]
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
