"""Mid-stream rescue through the real relay and dispatcher (gateway.stages.respond.UpstreamEvents with
gateway.upstream.dispatch.Dispatcher.resume), in process over fake adapters: what a continuation is
asked for when a stream breaks more than once, and what the relay keeps of what the client has."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from gateway.canonical import Request
from gateway.context import RequestContext
from gateway.contracts import UpstreamCall, UpstreamResponse, UpstreamResponseTooLarge, UpstreamStreamBroken
from gateway.policy.index import Principal, Target
from gateway.policy.model import Backend, Deployment, Model, Route
from gateway.stages.respond import MAX_MALFORMED_EVENTS, UpstreamEvents
from gateway.telemetry import Metrics
from gateway.upstream.dispatch import Dispatcher
from gateway.upstream.signals import LiveSignals

WORDS = "one two three four five six seven eight"


def _chunk(delta: dict[str, object], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return json.dumps({"id": "chatcmpl-1", "created": 1, "model": "m", "choices": [choice]}).encode()


class Breaking:
    """Answers a stream: a role chunk, then its text, then the connection breaks (`complete`: it
    finishes instead). Records every call it got."""

    def __init__(self, text: str, complete: bool = False) -> None:
        self.text = text
        self.complete = complete
        self.calls: list[UpstreamCall] = []

    async def send(self, call: UpstreamCall) -> UpstreamResponse:
        self.calls.append(call)

        async def batches() -> AsyncIterator[list[bytes]]:
            yield [_chunk({"role": "assistant", "content": ""}), _chunk({"content": self.text})]
            if self.complete:
                yield [_chunk({}, "stop"), b"[DONE]"]
                return
            raise UpstreamStreamBroken("cut", clean_end=False)

        return UpstreamResponse(status=200, batches=batches())

    async def aclose(self) -> None:
        return None


def _target(name: str, prefill: bool) -> Target:
    backend = Backend(
        name=name,
        adapter="openai",
        base_url="http://upstream.invalid/v1",
        capabilities=("prefill",) if prefill else (),
    )
    deployment = Deployment(backend=name, upstream_model="m")
    return Target(model=Model(name=f"model-{name}", deployments=(deployment,)), deployment=deployment, backend=backend)


async def _relay(
    adapters: dict[str, Breaking], plan: tuple[Target, ...], kept: list[int] | None = None
) -> tuple[list[bytes], UpstreamEvents]:
    """The client's events of one streamed request; `kept`: after each batch, the bytes the relay keeps
    of what it relayed (for a rescue)."""
    ctx = RequestContext(request_id="r1", operation="chat", started=0.0, headers={}, route_name="r", stream=True)
    ctx.principal = Principal(tenant="t", key_id="k", allowed_routes=None)
    ctx.request = Request(operation="chat", model="r", stream=True)
    ctx.route = Route(name="r", models=("m",), resume="continue", max_attempts=len(plan))
    ctx.plan = plan
    dispatcher = Dispatcher(adapters, Metrics(), LiveSignals())
    events = UpstreamEvents(ctx, await dispatcher.call(ctx), None, dispatcher.resume)
    out: list[bytes] = []
    while batch := await events.next():
        out += batch
        if kept is not None:
            kept.append(sum(map(len, events._relayed or ())))
    return out, events


async def test_a_second_rescue_is_asked_for_what_is_left_after_every_earlier_attempt() -> None:
    # a breaks, b continues and breaks after as many tokens, c continues both: the client's max_tokens
    # must be lowered by everything the client already has, not by b's share alone.
    a, b, c = Breaking(WORDS), Breaking(WORDS), Breaking(" nine.", complete=True)
    out, events = await _relay({"a": a, "b": b, "c": c}, (_target("a", False), _target("b", True), _target("c", True)))
    assert events.stop().outcome == "completed"
    (first,), (second,) = b.calls, c.calls
    assert first.prefill == WORDS and second.prefill == WORDS + WORDS
    assert first.prefill_tokens > 0
    assert second.prefill_tokens == 2 * first.prefill_tokens
    text = "".join(c["delta"].get("content") or "" for e in out for c in json.loads(e)["choices"])
    assert text == WORDS + WORDS + " nine."


class Long(Breaking):
    """A long answer, one word a read, then the connection breaks."""

    def __init__(self, words: int) -> None:
        super().__init__("")
        self.words = words

    async def send(self, call: UpstreamCall) -> UpstreamResponse:
        self.calls.append(call)

        async def batches() -> AsyncIterator[list[bytes]]:
            yield [_chunk({"role": "assistant", "content": ""})]
            for i in range(self.words):
                yield [_chunk({"content": f"w{i} "})]
            raise UpstreamStreamBroken("cut", clean_end=False)

        return UpstreamResponse(status=200, batches=batches())


async def test_what_the_relay_keeps_for_a_rescue_is_bounded_by_the_text_not_the_events() -> None:
    # 20 000 events (~1.6 MB of SSE payloads) carrying ~130 kB of text: the relay keeps what a rescue
    # needs (the text and the ids), not every event, and the continuation still gets the whole prefix.
    words = 20_000
    a, b = Long(words), Breaking(" end.", complete=True)
    kept: list[int] = []
    _, events = await _relay({"a": a, "b": b}, (_target("a", False), _target("b", True)), kept)
    assert events.stop().outcome == "completed"
    text = "".join(f"w{i} " for i in range(words))
    (call,) = b.calls
    assert call.prefill == text
    relayed_payloads = words * len(_chunk({"content": "w19999 "}))
    assert max(kept) < relayed_payloads / 4


class TooLarge(Breaking):
    """Answers with an error whose body is past the gateway's limit (the adapter raises)."""

    async def send(self, call: UpstreamCall) -> UpstreamResponse:
        self.calls.append(call)
        raise UpstreamResponseTooLarge("too large")


async def test_a_continuation_that_fails_in_any_way_ends_the_stream_with_its_original_failure() -> None:
    a, b = Breaking(WORDS), TooLarge("")
    out, events = await _relay({"a": a, "b": b}, (_target("a", False), _target("b", True)))
    assert len(b.calls) == 1
    end = events.stop()
    assert (end.outcome, end.status) == ("upstream_failed", 502)
    assert end.error is not None and end.error.code == "upstream_stream_broken"
    assert out[-1] != b"[DONE]"


class Garbled(Breaking):
    """Sends `garbled` malformed events among its text, then breaks (or, `complete`, finishes)."""

    def __init__(self, text: str, garbled: int, complete: bool = False) -> None:
        super().__init__(text, complete)
        self.garbled = garbled

    async def send(self, call: UpstreamCall) -> UpstreamResponse:
        self.calls.append(call)

        async def batches() -> AsyncIterator[list[bytes]]:
            yield [_chunk({"role": "assistant", "content": ""}), _chunk({"content": self.text})]
            for _ in range(self.garbled):
                yield [b"not json"]
            if self.complete:
                yield [_chunk({"content": "."}), _chunk({}, "stop"), b"[DONE]"]
                return
            raise UpstreamStreamBroken("cut", clean_end=False)

        return UpstreamResponse(status=200, batches=batches())


async def test_a_continuation_may_skip_as_many_malformed_events_as_any_stream() -> None:
    # Each upstream skips fewer than MAX_MALFORMED_EVENTS; together they send more: the continuation is
    # not failed for the broken attempt's garbage.
    garbled = MAX_MALFORMED_EVENTS - 1
    a, b = Garbled(WORDS, garbled), Garbled(" nine", garbled, complete=True)
    out, events = await _relay({"a": a, "b": b}, (_target("a", False), _target("b", True)))
    assert events.stop().outcome == "completed"
    text = "".join(c["delta"].get("content") or "" for e in out for c in json.loads(e)["choices"])
    assert text == WORDS + " nine."
