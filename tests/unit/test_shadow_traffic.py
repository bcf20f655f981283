"""Shadow traffic through the real app in process (create_app, scripted adapters, plain ASGI calls): a copy
of the request goes to the route's shadow model only after the client's answer is complete (JSON and
streams: event order, not timing), its answer is never the client's, and nothing the candidate does (an
error status, an exception, a hang past its timeout, a full queue) reaches the client or fails it; every
case is counted. A tenant whose compliance excludes the candidate gets no copy (counted by reason); the
copy's usage is never the tenant's."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar

from gateway.app import create_app
from gateway.context import RequestContext
from gateway.contracts import ShadowFailure, UpstreamCall, UpstreamConnectError, UpstreamResponse
from gateway.policy.index import Target, key_digest
from gateway.policy.model import Backend
from gateway.runtime import Gateway
from gateway.settings import Settings
from gateway.stages.shadow import PAUSE_AFTER, PAUSE_BASE_S
from gateway.upstream.wire import Usage

KEY = "sk-shadow-test-1"
EU_KEY = "sk-shadow-test-eu"
LIVE_TEXT = "live answer"
CANDIDATE_TEXT = "CANDIDATE-ONLY-TEXT"


def answer(text: str, usage: tuple[int, int]) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": "x",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)},
        }
    ).encode()


def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict[str, int] | None = None) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "x",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            "usage": usage,
        }
    ).encode()


class World:
    """What the scripted backends do and the order things happened in."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.candidate = "ok"  # ok | status | raise | connect | hang
        self.candidate_calls: list[UpstreamCall] = []

    def factory(self, backend: Backend) -> Any:
        world = self

        class Scripted:
            async def send(self, call: UpstreamCall) -> UpstreamResponse:
                if backend.name == "live":
                    if call.stream:
                        return UpstreamResponse(status=200, events=_live_stream())
                    return UpstreamResponse(status=200, body=answer(LIVE_TEXT, (3, 2)))
                world.events.append("shadow_started")
                world.candidate_calls.append(call)
                how = world.candidate
                if how == "status":
                    return UpstreamResponse(status=500, body=b'{"error": {"message": "boom"}}')
                if how == "raise":
                    raise RuntimeError("adapter bug")
                if how == "connect":
                    raise UpstreamConnectError("refused")
                if how == "hang":
                    await asyncio.Event().wait()
                return UpstreamResponse(status=200, body=answer(CANDIDATE_TEXT, (3, 7)))

            async def aclose(self) -> None:
                return None

        return Scripted()


async def _live_stream() -> AsyncIterator[bytes]:
    yield chunk({"role": "assistant", "content": ""})
    yield chunk({"content": LIVE_TEXT}, "stop")
    yield chunk({}, None, {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})


class Sink:
    def __init__(self, world: World) -> None:
        self.world = world
        self.records: list[tuple[str, str, bytes | ShadowFailure, Usage | None]] = []

    def record(
        self, live: RequestContext, target: Target, answer: bytes | ShadowFailure, latency_s: float, usage: Usage | None
    ) -> None:
        assert latency_s >= 0
        self.records.append((live.request_id, target.label, answer, usage))


def policy(shadow: str = "{model: cand, sample_rate: 1, timeout_s: 0.3}", server: str = "") -> str:
    return f"""
version: 1
{server}
backends:
  - {{name: live, adapter: scripted, base_url: "http://upstream.invalid/v1", hosting: {{jurisdiction: DE}}}}
  - {{name: cand, adapter: scripted, base_url: "http://upstream.invalid/v1", hosting: {{jurisdiction: US}}}}
models:
  - {{name: m, deployments: [{{backend: live, upstream_model: m}}]}}
  - name: cand
    deployments: [{{backend: cand, upstream_model: lora-1, price: {{input_per_mtok: 1, output_per_mtok: 2}}}}]
routes:
  - {{name: chat, models: [m], shadow: {shadow}}}
  - {{name: plain, models: [m]}}
tenants:
  - name: t
    keys: [{{id: k, digest: "{key_digest(KEY)}"}}]
  - name: eu
    compliance: {{allowed_jurisdictions: [EU]}}
    keys: [{{id: k, digest: "{key_digest(EU_KEY)}"}}]
"""


class Harness:
    def __init__(self, app: Litestar, world: World, sink: Sink) -> None:
        self.app = app
        self.world = world
        self.sink = sink
        self.gateway: Gateway = app.state.gateway

    async def post(self, body: dict[str, Any], key: str = KEY) -> tuple[int, bytes]:
        """One request as plain ASGI; the client's answer complete is an event in the world's order."""
        data = json.dumps(body).encode()
        sent: list[dict[str, Any]] = []
        complete = asyncio.Event()
        chunks = [data]

        async def receive() -> dict[str, Any]:
            if chunks:
                return {"type": "http.request", "body": chunks.pop(), "more_body": False}
            await complete.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            # A real server's send gives the loop a turn (transport writes, flow control): anything
            # scheduled too early, a copy started before the answer is out included, runs here first.
            for _ in range(5):
                await asyncio.sleep(0)
            sent.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.world.events.append("client_complete")
                complete.set()

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions",
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"content-type", b"application/json"),
                (b"authorization", f"Bearer {key}".encode()),
                (b"content-length", str(len(data)).encode()),
            ],
            "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 8000),
            "state": {},
        }
        await self.app(scope, receive, send)
        status = next(m["status"] for m in sent if m["type"] == "http.response.start")
        return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")

    def count(self, metric: str, **labels: str) -> float:
        text = self.gateway.metrics.render().decode()
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(metric + "{"):
                continue
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
            if all(found.get(k) == v for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    async def until(self, condition: Callable[[], bool], what: str, deadline_s: float = 20.0) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        while not condition():
            if loop.time() > end:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.005)


async def harness(tmp_path: Path, text: str) -> tuple[Harness, Callable[[], Any]]:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    world = World()
    sink = Sink(world)
    app = create_app(
        Settings(policy_path=str(path), spool_dir=str(tmp_path / "spool")),
        factories={"scripted": world.factory},  # type: ignore[dict-item]
        shadow_sink=sink,
    )
    lifespan = app.lifespan()
    await lifespan.__aenter__()

    async def close() -> None:
        await lifespan.__aexit__(None, None, None)

    return Harness(app, world, sink), close


MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("stream", [False, True])
async def test_the_copy_starts_after_the_clients_answer_is_complete_and_is_never_returned(
    tmp_path: Path, stream: bool
) -> None:
    h, close = await harness(tmp_path, policy())
    try:
        for i in range(3):
            status, body = await h.post({"model": "chat", "messages": MESSAGES, "stream": stream})
            assert status == 200
            assert LIVE_TEXT.encode() in body and CANDIDATE_TEXT.encode() not in body
            if stream:
                assert body.rstrip().endswith(b"data: [DONE]")
            await h.until(lambda n=i: len(h.sink.records) == n + 1, "the copy's record")
        # Each request: its answer complete, then (and only then) its copy started.
        assert h.world.events == ["client_complete", "shadow_started"] * 3
        for _, label, got, usage in h.sink.records:
            assert label == "cand@cand"
            assert isinstance(got, bytes) and CANDIDATE_TEXT.encode() in got
            assert usage is not None and usage.completion_tokens == 7
        # Always a whole (non-streaming) call, for the candidate's own model name.
        assert all(not c.stream and c.model == "lora-1" for c in h.world.candidate_calls)
        assert h.count("strait_shadow_requests_total", route="chat", outcome="completed") == 3
        assert h.count("strait_shadow_tokens_total", route="chat", kind="completion") == 21
        # Priced at the candidate's price, on the shadow's own series; the tenant is charged only the live answer.
        assert h.count("strait_shadow_cost_usd_total", route="chat") == pytest.approx(3 * (3 * 1 + 7 * 2) / 1e6)
        assert h.count("strait_usage_tokens_total", tenant="t", deployment="cand@cand") == 0
        assert h.count("strait_usage_tokens_total", tenant="t", deployment="m@live", kind="completion") == 6
    finally:
        await close()


@pytest.mark.parametrize(
    ("how", "outcome"), [("status", "failed"), ("raise", "failed"), ("connect", "failed"), ("hang", "timed_out")]
)
async def test_a_failing_or_hanging_candidate_never_reaches_the_client(tmp_path: Path, how: str, outcome: str) -> None:
    h, close = await harness(tmp_path, policy())
    h.world.candidate = how
    try:
        for i in range(4):
            stream = i % 2 == 1
            status, body = await h.post({"model": "chat", "messages": MESSAGES, "stream": stream})
            assert status == 200, body
            assert LIVE_TEXT.encode() in body and b"error" not in body
        await h.until(
            lambda: h.count("strait_shadow_requests_total", route="chat", outcome=outcome) == 4, f"4 copies {outcome}"
        )
        assert all(isinstance(r[2], ShadowFailure) and r[2].outcome == outcome for r in h.sink.records)
        assert h.count("strait_shadow_requests_total", route="chat", outcome="completed") == 0
        # The live requests were all answered and recorded as such.
        assert h.count("strait_requests_total", route="chat", status="200") == 4
    finally:
        await close()


async def test_a_full_shadow_queue_drops_copies_and_counts_them(tmp_path: Path) -> None:
    text = policy("{model: cand, timeout_s: 600}", server="server: {shadow: {max_concurrency: 1, max_queue: 1}}")
    h, close = await harness(tmp_path, text)
    h.world.candidate = "hang"
    try:
        for _ in range(5):
            status, _body = await h.post({"model": "chat", "messages": MESSAGES})
            assert status == 200
        # One copy running (hanging), one waiting, three dropped; the clients never waited for any.
        await h.until(lambda: h.world.events.count("shadow_started") == 1, "the first copy to start")
        assert h.count("strait_shadow_requests_total", route="chat", outcome="dropped") == 3
        assert h.gateway.services.shadow_traffic is not None
        assert h.gateway.services.shadow_traffic.pending == 2
    finally:
        await close()  # shutdown cancels the running copy and forgets the waiting one
    assert h.gateway.services.shadow_traffic is not None and h.gateway.services.shadow_traffic.pending == 0


async def test_compliance_excludes_the_candidate_no_copy_is_made_and_it_is_counted(tmp_path: Path) -> None:
    h, close = await harness(tmp_path, policy())
    try:
        for _ in range(3):
            status, _body = await h.post({"model": "chat", "messages": MESSAGES}, key=EU_KEY)
            assert status == 200
        assert h.count("strait_shadow_excluded_total", route="chat", reason="compliance") == 3
        assert h.count("strait_shadow_requests_total", route="chat", outcome="excluded") == 3
        # A route without shadow makes no copy either; only then does the allowed tenant's copy run.
        assert (await h.post({"model": "plain", "messages": MESSAGES}))[0] == 200
        assert (await h.post({"model": "chat", "messages": MESSAGES}))[0] == 200
        await h.until(lambda: len(h.sink.records) == 1, "the allowed tenant's copy")
        assert h.world.events.count("shadow_started") == 1
    finally:
        await close()


async def test_the_sample_rate_copies_about_that_share(tmp_path: Path) -> None:
    h, close = await harness(tmp_path, policy("{model: cand, sample_rate: 0.5}"))
    try:
        n = 200
        for _ in range(n):
            assert (await h.post({"model": "chat", "messages": MESSAGES}))[0] == 200
        runner = h.gateway.services.shadow_traffic
        assert runner is not None
        await h.until(lambda: runner.pending == 0, "every sampled copy to end")
        copies = h.count("strait_shadow_requests_total", route="chat", outcome="completed")
        assert len(h.sink.records) == copies == h.world.events.count("shadow_started")
        # Binomial(200, 0.5): sd 7.1; the bounds are 5.6 sd away.
        assert 60 <= copies <= 140, copies
    finally:
        await close()


async def test_a_sink_that_raises_is_counted_and_the_client_never_knows(tmp_path: Path) -> None:
    h, close = await harness(tmp_path, policy())

    def broken(*args: object) -> None:
        raise RuntimeError("store down")

    h.sink.record = broken  # type: ignore[method-assign,assignment]
    try:
        for _ in range(2):
            assert (await h.post({"model": "chat", "messages": MESSAGES}))[0] == 200
        await h.until(lambda: h.count("strait_shadow_sink_errors_total", route="chat") == 2, "sink failures")
        assert h.count("strait_shadow_requests_total", route="chat", outcome="completed") == 2
    finally:
        await close()


async def test_a_candidate_failing_in_a_row_is_paused_then_probed_and_cleared(tmp_path: Path) -> None:
    h, close = await harness(tmp_path, policy())
    runner = h.gateway.services.shadow_traffic
    assert runner is not None
    now = [1000.0]
    runner.clock = lambda: now[0]
    h.world.candidate = "connect"

    async def one() -> None:
        status, _body = await h.post({"model": "chat", "messages": MESSAGES})
        assert status == 200
        await h.until(lambda: runner.pending == 0, "the copy to end")

    def copies(outcome: str) -> float:
        return h.count("strait_shadow_requests_total", route="chat", outcome=outcome)

    try:
        for _ in range(PAUSE_AFTER + 3):
            await one()
        # PAUSE_AFTER failures in a row, then no attempt while paused (the clock has not moved).
        assert copies("failed") == PAUSE_AFTER and copies("paused") == 3
        assert h.world.events.count("shadow_started") == PAUSE_AFTER
        # The pause ends: one probe, failing again, pauses it for twice as long.
        now[0] += PAUSE_BASE_S + 0.01
        await one()
        await one()
        assert copies("failed") == PAUSE_AFTER + 1 and copies("paused") == 4
        now[0] += PAUSE_BASE_S + 0.01  # not yet: the second pause is twice as long
        await one()
        assert copies("paused") == 5
        # The candidate recovers: the next probe succeeds and clears the pause.
        h.world.candidate = "ok"
        now[0] += PAUSE_BASE_S
        for _ in range(3):
            await one()
        assert copies("completed") == 3 and copies("paused") == 5
    finally:
        await close()


async def test_the_shadow_budget_stops_copies_for_the_day_and_the_next_day_starts_again(tmp_path: Path) -> None:
    # Live answer (3, 2) tokens at the candidate's price (1 and 2 USD per Mtok): a copy is estimated at 7 µUSD
    # and costs 3 + 7 * 2 = 17 µUSD. With a cap of 40 µUSD: 0 + 7 fits (17 spent), 17 + 7 fits (34), 34 + 7 not.
    h, close = await harness(tmp_path, policy("{model: cand, sample_rate: 1, timeout_s: 5, usd_per_day: 0.00004}"))
    runner = h.gateway.services.shadow_traffic
    assert runner is not None
    now = [86_400.0 * 20_000 + 3_600]  # 01:00 UTC on some day
    runner.budget.clock = lambda: now[0]
    try:

        async def one() -> None:
            status, body = await h.post({"model": "chat", "messages": MESSAGES})
            assert status == 200 and LIVE_TEXT.encode() in body

        def copies(outcome: str) -> float:
            return h.count("strait_shadow_requests_total", route="chat", outcome=outcome)

        for n in (1, 2):
            await one()
            await h.until(lambda n=n: copies("completed") == n, f"copy {n}")
        assert runner.budget.spent("chat") == 34
        for _ in range(3):
            await one()
        await h.until(lambda: copies("over_budget") == 3, "three copies over budget")
        assert copies("completed") == 2 and len(h.world.candidate_calls) == 2
        assert h.count("strait_shadow_cost_usd_total", route="chat") == pytest.approx(34 / 1e6)
        # Still the same day one second before midnight; the next day starts from zero.
        now[0] = 86_400.0 * 20_001 - 1
        await one()
        await h.until(lambda: copies("over_budget") == 4, "still over budget before midnight")
        now[0] = 86_400.0 * 20_001
        await one()
        await h.until(lambda: copies("completed") == 3, "a copy on the next day")
        assert runner.budget.spent("chat") == 17 and runner.budget.reserved("chat") == 0
    finally:
        await close()


async def test_without_a_budget_copies_are_not_capped(tmp_path: Path) -> None:
    h, close = await harness(tmp_path, policy("{model: cand, sample_rate: 1, timeout_s: 5}"))
    try:
        for n in range(1, 6):
            await h.post({"model": "chat", "messages": MESSAGES})
            await h.until(
                lambda n=n: h.count("strait_shadow_requests_total", route="chat", outcome="completed") == n, "copy"
            )
        assert h.count("strait_shadow_requests_total", route="chat", outcome="over_budget") == 0
        runner = h.gateway.services.shadow_traffic
        assert runner is not None and runner.budget.spent("chat") == 5 * 17
    finally:
        await close()
