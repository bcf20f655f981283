"""The pipeline in-process: stage order, short-circuit by a Reply, on_response in reverse, errors that
propagate; the tap contract (every tap's on_end exactly once per request that reached the terminal, for
every outcome, shielded from cancellation); and one request through the real runtime (create_app,
simulated adapter, memory state)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from pathlib import Path

import pytest
from litestar.testing import TestClient

from gateway.app import create_app
from gateway.context import RequestContext
from gateway.contracts import End, Outcome
from gateway.errors import GatewayError, RateLimited, UpstreamTimeout, UpstreamUnavailable
from gateway.pipeline import Pipeline, RequestOnly
from gateway.policy.index import key_digest
from gateway.relay import EndTap
from gateway.reply import Reply, close_stream
from gateway.settings import Settings


def make_ctx() -> RequestContext:
    return RequestContext(request_id="r1", operation="chat", started=0.0, headers={})


class Recording:
    def __init__(self, name: str, log: list[str], answer: Reply | None = None, fail: bool = False) -> None:
        self.name = name
        self.log = log
        self.answer = answer
        self.fail = fail

    async def on_request(self, ctx: RequestContext) -> Reply | None:
        self.log.append(f"{self.name}.request")
        if self.fail:
            raise RateLimited("no")
        return self.answer

    async def on_response(self, ctx: RequestContext, reply: Reply) -> Reply:
        self.log.append(f"{self.name}.response")
        reply.headers[f"x-{self.name}"] = "seen"
        return reply


class Quiet(RequestOnly):
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    async def on_request(self, ctx: RequestContext) -> None:
        self.log.append(f"{self.name}.request")


class Terminal:
    name = "terminal"

    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def call(self, ctx: RequestContext) -> Reply:
        self.log.append("terminal")
        return Reply(status=200, headers={}, body=b"{}")


def test_stages_run_in_order_then_the_terminal_then_on_response_in_reverse() -> None:
    log: list[str] = []
    pipeline = Pipeline([Recording("a", log), Quiet("q", log), Recording("b", log)], Terminal(log))
    reply = asyncio.run(pipeline.run(make_ctx()))
    assert log == ["a.request", "q.request", "b.request", "terminal", "b.response", "a.response"]
    assert reply.status == 200 and reply.headers == {"x-b": "seen", "x-a": "seen"}


def test_a_reply_short_circuits_later_stages_and_the_terminal() -> None:
    log: list[str] = []
    cached = Reply(status=200, headers={}, body=b'{"cached":true}')
    stages = [Recording("a", log), Recording("cache", log, answer=cached), Recording("c", log)]
    reply = asyncio.run(Pipeline(stages, Terminal(log)).run(make_ctx()))
    # The answering stage built the reply: only the stages before it see it on the way back.
    assert log == ["a.request", "cache.request", "a.response"]
    assert reply is cached and reply.headers == {"x-a": "seen"}


def test_an_error_raised_by_a_stage_propagates_without_on_response() -> None:
    log: list[str] = []
    stages = [Recording("a", log), Recording("limits", log, fail=True), Recording("c", log)]
    with pytest.raises(RateLimited):
        asyncio.run(Pipeline(stages, Terminal(log)).run(make_ctx()))
    assert log == ["a.request", "limits.request"]


KEY = "sk-pipeline-tenant-0001"
POLICY = f"""
version: 1
backends:
  - {{name: sim, adapter: simulated, simulated: {{ttft_ms: 0, tokens_per_second: 1000000, output_tokens: 5}}}}
models:
  - {{name: m, deployments: [{{backend: sim, upstream_model: sim-1}}]}}
routes:
  - {{name: chat, models: [m]}}
tenants:
  - name: acme
    explain: true
    keys: [{{id: k1, digest: "{key_digest(KEY)}"}}]
"""


def test_through_the_real_runtime(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    app = create_app(Settings(policy_path=str(policy), spool_dir=str(tmp_path / "spool")))
    body = {"model": "chat", "messages": [{"role": "user", "content": "hello"}]}
    with TestClient(app) as client:
        # auth runs before decode: a body that is not even JSON is never parsed for an unknown client.
        refused = client.post("/v1/chat/completions", content=b"{not json")
        assert refused.status_code == 401
        client.headers["authorization"] = f"Bearer {KEY}"
        assert client.post("/v1/chat/completions", content=b"{not json").status_code == 400
        r = client.post("/v1/chat/completions", json=body, headers={"x-strait-explain": "1"})
        assert r.status_code == 200 and r.headers["x-strait-route"] == "chat"
        decision = r.headers["x-strait-decision"]
        assert decision in r.headers["x-strait-explain"]
        assert client.get(f"/admin/decisions/{decision}").status_code == 200
        s = client.post("/v1/chat/completions", json={**body, "stream": True})
        assert s.status_code == 200 and s.text.rstrip().endswith("data: [DONE]")


# ---- the tap contract: on_end exactly once per request that reached the terminal, whatever the outcome ----


class RecordingTap(EndTap):
    """Only an end: the relay never calls its on_start or on_event."""

    def __init__(self, name: str, log: list[str], fail: bool = False) -> None:
        self.name = name
        self.log = log
        self.fail = fail
        self.ends: list[End] = []

    def on_end(self, ctx: RequestContext, end: End) -> None:
        self.ends.append(end)
        self.log.append(f"{self.name}.end:{end.outcome}")
        if self.fail:
            raise RuntimeError("a tap bug")


class WatchingTap(RecordingTap):
    """Sees the start and every event too."""

    def on_start(self, ctx: RequestContext) -> None:
        self.log.append(f"{self.name}.start")

    def on_event(self, ctx: RequestContext, event: bytes) -> None:
        self.log.append(f"{self.name}.event:{event.decode()}")


class ScriptedSource:
    """A terminal's event stream: its batches, then how it ended by itself; release waits if asked."""

    def __init__(self, batches: list[list[bytes]], outcome: Outcome = "completed", slow_release: bool = False) -> None:
        self.batches = batches
        self.outcome = outcome
        self.stopped: list[Outcome | None] = []
        self.released = 0
        self.release_gate: asyncio.Event | None = asyncio.Event() if slow_release else None
        self.releasing = asyncio.Event()

    async def next(self) -> list[bytes]:
        return self.batches.pop(0) if self.batches else []

    @property
    def finished(self) -> bool:
        return not self.batches

    def stop(self, outcome: Outcome | None = None) -> End:
        self.stopped.append(outcome)
        ended = self.outcome if not self.batches else (outcome or "client_gone")
        return End(
            ended, {"completed": 200, "client_gone": 200, "upstream_failed": 502, "timed_out": 504}[ended], stream=True
        )

    def release(self) -> Awaitable[None] | None:
        if self.release_gate is None:
            self.released += 1
            return None
        return self._slow_release(self.release_gate)

    async def _slow_release(self, gate: asyncio.Event) -> None:
        self.releasing.set()
        await gate.wait()
        self.released += 1


class Answering:
    name = "terminal"

    def __init__(self, answer: Reply | BaseException | None = None, wait: asyncio.Event | None = None) -> None:
        self.answer = answer
        self.wait = wait
        self.asked = asyncio.Event()

    async def call(self, ctx: RequestContext) -> Reply:
        self.asked.set()
        if self.wait is not None:
            await self.wait.wait()
        if isinstance(self.answer, BaseException):
            raise self.answer
        assert self.answer is not None
        return self.answer


def tapped(terminal: Answering) -> tuple[Pipeline, RecordingTap, WatchingTap, list[str]]:
    log: list[str] = []
    first, second = RecordingTap("a", log), WatchingTap("b", log)
    return Pipeline([Quiet("q", log)], terminal, taps=(first, second)), first, second, log


def stream_reply(source: ScriptedSource) -> Reply:
    return Reply(status=200, headers={}, stream=source, media_type="text/event-stream")


async def test_a_whole_answer_ends_through_every_tap_once_before_the_reply_is_returned() -> None:
    end = End("completed", 200)
    pipeline, a, b, log = tapped(Answering(Reply(status=200, headers={}, body=b"{}", end=end)))
    await pipeline.run(make_ctx())
    assert a.ends == [end] and b.ends == [end]
    assert log == ["q.request", "a.end:completed", "b.end:completed"]  # no start, no events: not a stream


@pytest.mark.parametrize(
    ("error", "outcome", "status"),
    [(UpstreamUnavailable("no upstream"), "upstream_failed", 502), (UpstreamTimeout("late"), "timed_out", 504)],
)
async def test_a_dispatch_failure_ends_through_every_tap_once_then_propagates(
    error: GatewayError, outcome: str, status: int
) -> None:
    refused: list[int] = []
    pipeline, a, b, _ = tapped(Answering(error))
    pipeline.on_refused = lambda ctx, status, code: refused.append(status)
    with pytest.raises(type(error)):
        await pipeline.run(make_ctx())
    assert [(e.outcome, e.status, e.partial) for e in a.ends] == [(outcome, status, False)]
    assert len(b.ends) == 1 and refused == [status]


async def test_a_client_leaving_while_the_upstream_is_asked_ends_through_every_tap_once() -> None:
    terminal = Answering(Reply(status=200, headers={}), wait=asyncio.Event())
    pipeline, a, b, _ = tapped(terminal)
    running = asyncio.ensure_future(pipeline.run(make_ctx()))
    await terminal.asked.wait()  # the upstream is being asked
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert [(e.outcome, e.status, e.partial) for e in a.ends] == [("client_gone", 499, True)]
    assert len(b.ends) == 1


@pytest.mark.parametrize("outcome", ["completed", "upstream_failed", "timed_out"])
async def test_a_stream_that_ends_by_itself_ends_through_every_tap_once(outcome: Outcome) -> None:
    source = ScriptedSource([[b"1", b"2"], [b"3"]], outcome)
    pipeline, a, b, log = tapped(Answering(stream_reply(source)))
    reply = await pipeline.run(make_ctx())
    assert reply.stream is not None and a.ends == [] and log == ["q.request", "b.start"]
    assert await reply.stream.next() == [b"1", b"2"]
    assert await reply.stream.next() == [b"3"]
    assert await reply.stream.next() == []
    assert await close_stream(reply.stream, "client_gone") is a.ends[0]  # the edge's finally: no second end
    assert [e.outcome for e in a.ends] == [outcome] and len(b.ends) == 1
    assert source.stopped == [None] and source.released == 1
    assert log == [
        "q.request",
        "b.start",
        "b.event:1",
        "b.event:2",
        "b.event:3",
        "a.end:" + outcome,
        "b.end:" + outcome,
    ]


async def test_a_stream_the_client_leaves_ends_through_every_tap_once_even_if_never_read() -> None:
    for reads in (0, 1):
        source = ScriptedSource([[b"1"], [b"2"]])
        pipeline, a, b, _ = tapped(Answering(stream_reply(source)))
        reply = await pipeline.run(make_ctx())
        assert reply.stream is not None
        for _ in range(reads):
            await reply.stream.next()
        await close_stream(reply.stream, "client_gone")
        await close_stream(reply.stream, "client_gone")
        assert [e.outcome for e in a.ends] == ["client_gone"] and len(b.ends) == 1
        assert source.stopped == ["client_gone"] and source.released == 1


async def test_the_end_is_shielded_from_the_consumers_cancellation() -> None:
    source = ScriptedSource([[b"1"], [b"2"]], slow_release=True)
    pipeline, a, b, _ = tapped(Answering(stream_reply(source)))
    reply = await pipeline.run(make_ctx())
    assert reply.stream is not None
    closing = asyncio.ensure_future(close_stream(reply.stream, "client_gone"))
    await source.releasing.wait()  # the taps ran; the release now waits
    assert [e.outcome for e in a.ends] == ["client_gone"] and source.released == 0
    closing.cancel()  # the client's task is cancelled again (shutdown)
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert source.release_gate is not None
    source.release_gate.set()
    await close_stream(reply.stream, "client_gone")  # the edge's finally waits for the same release
    assert source.released == 1 and len(a.ends) == 1 and len(b.ends) == 1


async def test_a_failing_tap_does_not_stop_the_others() -> None:
    log: list[str] = []
    broken, after = RecordingTap("broken", log, fail=True), RecordingTap("after", log)
    end = End("completed", 200)
    pipeline = Pipeline([], Answering(Reply(status=200, headers={}, end=end)), taps=(broken, after))
    await pipeline.run(make_ctx())
    assert after.ends == [end]


def test_the_relay_calls_start_and_events_only_for_taps_that_have_them() -> None:
    pipeline, a, b, _ = tapped(Answering())
    assert pipeline._start_taps == (b,) and pipeline._event_taps == (b,)  # a costs nothing per event
    assert pipeline.taps == (a, b)
