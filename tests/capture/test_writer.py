"""The capture writer on its own: a full queue drops (and counts) instead of waiting, retention deletes
per tenant, a stream's tool calls are assembled, and a consenting gateway writes to PostgreSQL when
STRAIT_CAPTURE names one."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from litestar.testing import TestClient

from gateway.app import create_app
from gateway.canonical import Message, Request, Text
from gateway.capture.assemble import answer_of_stream
from gateway.capture.records import CaptureRecord
from gateway.capture.redact import Chain, PatternRedactor
from gateway.capture.store import CaptureQuery, open_capture_store
from gateway.capture.writer import CaptureWriter, PendingCapture
from gateway.settings import Settings
from gateway.telemetry import Metrics
from plugins.redact_long_numbers import LongNumbers
from tests.cache.echo_adapter import EchoFactory
from tests.capture.test_capture_in_process import KEYS, POLICY
from tests.harness.procs import free_port

DAY_MS = 86_400_000


def pending(rid: str, tenant: str = "acme", ts_ms: int = 0) -> PendingCapture:
    record = CaptureRecord(
        request_id=rid,
        ts_ms=ts_ms,
        tenant=tenant,
        key_id="k",
        route="r",
        operation="chat",
        protocol="openai",
        status=200,
        outcome="completed",
        include=("prompts", "completions", "tool_calls"),
    )
    return PendingCapture(build=lambda: record, request=None, redactor=PatternRedactor(), body=b'{"choices": []}')


def counter(metrics: Metrics, result: str) -> float:
    metrics.render()
    value = metrics.registry.get_sample_value("strait_capture_records_total", {"result": result})
    return value or 0.0


async def test_a_full_queue_drops_and_counts_and_never_waits(tmp_path: Path) -> None:
    metrics = Metrics()
    writer = CaptureWriter(f"sqlite:///{tmp_path}/c.db", metrics, max_queued=3)
    # Not started: nothing drains the queue, so the fourth and fifth find it full.
    results = [writer.submit(pending(f"r{i}")) for i in range(5)]
    assert results == [True, True, True, False, False]
    assert counter(metrics, "dropped") == 2 and counter(metrics, "queued") == 3
    await writer.flush()
    assert counter(metrics, "written") == 3
    store = await writer.store()
    assert await store.counts() == (3, 0)
    await writer.aclose()


async def test_retention_deletes_each_tenant_after_its_own_days(tmp_path: Path) -> None:
    now = 100 * DAY_MS
    days = {"short": 1, "long": 30}
    writer = CaptureWriter(f"sqlite:///{tmp_path}/c.db", Metrics(), retention_days=days.get)
    for tenant in ("short", "long", "gone"):
        writer.submit(pending(f"{tenant}-recent", tenant, now - DAY_MS // 2))
        writer.submit(pending(f"{tenant}-week", tenant, now - 7 * DAY_MS))
        writer.submit(pending(f"{tenant}-old", tenant, now - 60 * DAY_MS))
    await writer.flush()
    # `gone` no longer captures: the default 30 days apply.
    # short: its week-old and 60-day-old records; long and gone: their 60-day-old ones.
    assert await writer.enforce_retention(now) == 2 + 1 + 1
    store = await writer.store()
    left = sorted(c.record.request_id for c in await store.query(CaptureQuery()))
    assert left == ["gone-recent", "gone-week", "long-recent", "long-week", "short-recent"]
    await writer.aclose()


async def test_retention_creates_no_store(tmp_path: Path) -> None:
    writer = CaptureWriter(f"sqlite:///{tmp_path}/never.db", Metrics())
    assert await writer.enforce_retention() == 0
    assert not (tmp_path / "never.db").exists()


def test_a_streamed_answer_with_tool_calls_is_assembled_and_redacted() -> None:
    def chunk(delta: dict[str, object], finish: str | None = None) -> bytes:
        return json.dumps(
            {"id": "chatcmpl-s1", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        ).encode()

    events = [
        chunk({"role": "assistant", "content": ""}),
        chunk(
            {
                "tool_calls": [
                    {"index": 0, "id": "call_a", "type": "function", "function": {"name": "mail", "arguments": ""}}
                ]
            }
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"to": "bob@'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'x.org"}'}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_b", "function": {"name": "log", "arguments": "{}"}}]}),
        b"not json",
        chunk({}, "tool_calls"),
        b"[DONE]",
    ]
    answer, response_id = answer_of_stream(events, PatternRedactor(), ("completions", "tool_calls"), truncated=False)
    assert answer is not None and response_id == "chatcmpl-s1"
    assert [(c.id, c.name, c.arguments) for c in answer.tool_calls] == [
        ("call_a", "mail", '{"to": "[EMAIL]"}'),
        ("call_b", "log", "{}"),
    ]
    assert answer.content is None and answer.finish_reason == "tool_calls"
    # Without `tool_calls` in the consent, the calls are left out.
    only_text, _ = answer_of_stream(events, PatternRedactor(), ("completions",), truncated=False)
    assert only_text is not None and only_text.tool_calls == ()


def test_a_consenting_gateway_writes_to_postgresql(tmp_path: Path, postgres_url: str) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    app = create_app(
        Settings(policy_path=str(policy), spool_dir=str(tmp_path / "spool"), access_log="off", capture=postgres_url),
        factories={"echo": EchoFactory()},
    )
    with TestClient(app) as client:
        auth = {"authorization": f"Bearer {KEYS['acme']}"}
        sent = client.post(
            "/v1/chat/completions",
            json={"model": "chat", "messages": [{"role": "user", "content": "mail a@b.io"}]},
            headers=auth,
        )
        rid = sent.headers["x-strait-request-id"]
        writer = app.state["gateway"].services.capture
        client.blocking_portal.call(writer.flush)
        rated = client.post("/v1/feedback", json={"request_id": rid, "value": 3}, headers=auth)
        assert rated.status_code == 200, rated.text

    async def read() -> tuple[int, int, str | None]:
        store = await open_capture_store(postgres_url)
        try:
            got = await store.get("acme", rid)
            assert got is not None and got.record.request is not None
            return len(got.feedback), len(await store.query(CaptureQuery())), got.record.request.messages[0].content
        finally:
            await store.aclose()

    assert asyncio.run(read()) == (1, 1, "mail [EMAIL]")


def test_a_store_that_cannot_be_reached_is_503_for_feedback_and_never_fails_a_request(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    # Nothing listens there (a port just freed): every connection is refused.
    down = f"postgresql://strait@127.0.0.1:{free_port()}/strait"
    app = create_app(
        Settings(policy_path=str(policy), spool_dir=str(tmp_path / "spool"), access_log="off", capture=down),
        factories={"echo": EchoFactory()},
    )
    with TestClient(app) as client:
        auth = {"authorization": f"Bearer {KEYS['acme']}"}
        answer = client.post(
            "/v1/chat/completions",
            json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]},
            headers=auth,
        )
        assert answer.status_code == 200
        writer = app.state["gateway"].services.capture
        client.blocking_portal.call(writer.flush)
        rated = client.post(
            "/v1/feedback", json={"request_id": answer.headers["x-request-id"], "value": 1}, headers=auth
        )
        assert rated.status_code == 503, rated.text
        assert rated.json()["error"]["code"] == "capture_unavailable"
        assert counter(app.state["gateway"].metrics, "failed") == 1


async def test_a_plugin_redactors_batch_is_prepared_like_the_builtins(tmp_path: Path) -> None:
    # A plugin redactor's batch goes to a worker thread; the built-in one's stays on the loop: same records.
    request = Request(
        operation="chat", model="r", messages=(Message(role="user", content=(Text(text="order 12345678 a@b.io"),)),)
    )
    writer = CaptureWriter(f"sqlite:///{tmp_path}/c.db", Metrics())
    for i, redactor in enumerate([Chain([PatternRedactor(), LongNumbers()]), PatternRedactor()]):
        p = pending(f"r{i}")
        writer.submit(PendingCapture(build=p.build, request=request, redactor=redactor, body=p.body))
        await writer.flush()
    store = await writer.store()
    got = {c.record.request_id: c.record.request for c in await store.query(CaptureQuery())}
    assert got["r0"] is not None and got["r0"].messages[0].content == "order [NUMBER] [EMAIL]"
    assert got["r1"] is not None and got["r1"].messages[0].content == "order 12345678 [EMAIL]"
    await writer.aclose()
