"""Capture through the whole request path, in process (create_app, the echo adapter, a SQLite capture
store in the test's directory): consent, sampling-free opt-out, redaction before storage, streamed
answers assembled, feedback and its authorisation, regenerates."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from gateway.app import create_app
from gateway.capture.records import Captured
from gateway.capture.store import CaptureQuery
from gateway.capture.writer import CaptureWriter
from gateway.policy.index import key_digest
from gateway.settings import Settings
from tests.cache.echo_adapter import EchoFactory

KEYS = {"acme": "sk-capture-acme-0001", "acme2": "sk-capture-acme-0002", "globex": "sk-capture-globex-01"}
POLICY = f"""
version: 1
backends:
  - {{name: b1, adapter: echo, base_url: "http://127.0.0.1:9/v1"}}
models:
  - name: m
    capabilities: [chat, tools, completions]
    licence: {{name: apache-2.0, outputs_train: true}}
    origin: {{developer: Mistral AI, country: FR}}
    deployments: [{{backend: b1, upstream_model: m-up}}]
routes:
  - {{name: chat, models: [m]}}
  - {{name: chat-b, models: [m]}}
tenants:
  - name: acme
    keys:
      - {{id: a1, digest: "{key_digest(KEYS["acme"])}"}}
      - {{id: a2, digest: "{key_digest(KEYS["acme2"])}"}}
    capture: {{enabled: true, sample_rate: 1.0, training: true, regenerate_window_s: 600}}
  - name: globex
    keys: [{{id: g1, digest: "{key_digest(KEYS["globex"])}"}}]
"""

# One of every kind the built-in redactor knows, and what each must become.
PII = {
    "jane.doe@example.com": "[EMAIL]",
    "+44 20 7946 0958": "[PHONE]",
    "4111 1111 1111 1111": "[CARD]",
    "DE89 3704 0044 0532 0130 00": "[IBAN]",
    "sk-proj-AbCdEfGhIjKlMnOpQrSt1234": "[API_KEY]",
    "192.168.10.20": "[IP]",
    "2001:db8::8a2e:370:7334": "[IP]",
}
QUESTION = "Contact " + " , ".join(PII) + " today"


@contextlib.contextmanager
def gateway(tmp_path: Path) -> Iterator[tuple[TestClient[Any], CaptureWriter, Path]]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    db = tmp_path / "capture.db"
    app = create_app(
        Settings(
            policy_path=str(policy),
            spool_dir=str(tmp_path / "spool"),
            access_log="off",
            capture=f"sqlite:///{db}",
        ),
        factories={"echo": EchoFactory()},
    )
    with TestClient(app) as client:
        writer = app.state["gateway"].services.capture
        assert writer is not None
        yield client, writer, db


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[TestClient[Any], CaptureWriter, Path]]:
    with gateway(tmp_path) as found:
        yield found


def chat(
    client: TestClient[Any],
    tenant: str,
    content: str,
    *,
    stream: bool = False,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Any:
    payload = {"model": "chat", "messages": [{"role": "user", "content": content}], "stream": stream, **extra}
    response = client.post(
        "/v1/chat/completions", json=payload, headers={"authorization": f"Bearer {KEYS[tenant]}", **(headers or {})}
    )
    assert response.status_code == 200, response.text
    # The gateway's id is on every answer; x-request-id carries it unless the client sent its own.
    assert response.headers["x-strait-request-id"].startswith("req_")
    if "x-request-id" not in (headers or {}):
        assert response.headers["x-request-id"] == response.headers["x-strait-request-id"]
    return response


def stored(client: TestClient[Any], writer: CaptureWriter, **query: Any) -> list[Captured]:
    client.blocking_portal.call(writer.flush)

    async def read() -> list[Captured]:
        store = await writer.existing_store()
        return [] if store is None else await store.query(CaptureQuery(**query))

    return client.blocking_portal.call(read)


def feedback(client: TestClient[Any], tenant: str, body: Any) -> Any:
    return client.post("/v1/feedback", content=json.dumps(body), headers={"authorization": f"Bearer {KEYS[tenant]}"})


def test_nothing_is_written_without_consent(env: tuple[TestClient[Any], CaptureWriter, Path]) -> None:
    client, writer, db = env
    for i in range(5):
        chat(client, "globex", f"globex secret {i} jane@example.com", stream=bool(i % 2))
    client.blocking_portal.call(writer.flush)
    # Not a byte: the store was never even opened.
    assert not db.exists()
    assert writer.queued() == 0
    chat(client, "acme", "hello")
    records = stored(client, writer)
    assert [c.record.tenant for c in records] == ["acme"]
    assert stored(client, writer, tenant="globex") == []
    # The globex traffic left no trace in the file either.
    assert b"globex" not in db.read_bytes() + (
        db.with_name("capture.db-wal").read_bytes() if db.with_name("capture.db-wal").exists() else b""
    )


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_every_pattern_is_redacted_before_storage(
    env: tuple[TestClient[Any], CaptureWriter, Path], stream: bool
) -> None:
    client, writer, db = env
    response = chat(client, "acme", QUESTION, stream=stream, metadata={"user_email": "jane.doe@example.com"})
    rid = response.headers["x-strait-request-id"]
    [captured] = stored(client, writer)
    record = captured.record
    assert record.request_id == rid
    assert record.request is not None and record.answer is not None
    prompt = record.request.messages[0].content
    answer = record.answer.content
    assert prompt is not None and answer is not None
    # The answer (the echo of the question, streamed in pieces or whole) was assembled and redacted too.
    assert answer.startswith("answer ") and answer.endswith(" today")
    for value, placeholder in PII.items():
        assert value not in prompt and value not in answer
        assert placeholder in prompt and placeholder in answer
    assert record.metadata == {"user_email": "[EMAIL]"}
    client.blocking_portal.call(writer.aclose)
    raw = db.read_bytes()
    for value in PII:
        assert value.encode() not in raw
    # What the record says about the request, its model and its consent.
    assert record.tenant == "acme" and record.key_id == "a1" and record.route == "chat"
    assert record.model == "m" and record.deployment == "m@b1"
    assert record.licence == "apache-2.0" and record.licence_outputs_train is True
    assert record.origin_developer == "Mistral AI" and record.origin_country == "FR"
    assert record.consent_training is True and record.status == 200 and record.outcome == "completed"
    assert record.decision_id == response.headers.get("x-strait-decision", record.decision_id) and record.decision_id
    assert record.policy_version == client.app.state["gateway"].runtime.index.version
    assert record.prompt_tokens == 11 and record.completion_tokens is not None and record.completion_tokens > 0
    assert record.answer.finish_reason == "stop"


def test_a_request_may_opt_out_but_never_in(env: tuple[TestClient[Any], CaptureWriter, Path]) -> None:
    client, writer, _db = env
    chat(client, "acme", "not this one", headers={"x-strait-capture": "off"})
    chat(client, "acme", "nor this", stream=True, headers={"x-strait-capture": "off"})
    chat(client, "globex", "asking in", headers={"x-strait-capture": "on"})
    chat(client, "acme", "this one", headers={"x-strait-tags": "beta, ui"})
    records = stored(client, writer)
    assert len(records) == 1
    assert records[0].record.request is not None
    assert records[0].record.request.messages[0].content == "this one"
    assert records[0].record.tags == ("beta", "ui")


def test_tool_calls_are_captured_and_redacted(env: tuple[TestClient[Any], CaptureWriter, Path]) -> None:
    client, writer, _db = env
    messages = [
        {"role": "user", "content": "email jane"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "send", "arguments": '{"to": "jane@corp.io"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sent to jane@corp.io"},
        {"role": "user", "content": "thanks"},
    ]
    tools = [{"type": "function", "function": {"name": "send", "parameters": {"type": "object"}}}]
    response = client.post(
        "/v1/chat/completions",
        json={"model": "chat", "messages": messages, "tools": tools},
        headers={"authorization": f"Bearer {KEYS['acme']}"},
    )
    assert response.status_code == 200, response.text
    [captured] = stored(client, writer)
    request = captured.record.request
    assert request is not None
    assert [m.role for m in request.messages] == ["user", "assistant", "tool", "user"]
    call = request.messages[1].tool_calls[0]
    assert (call.id, call.name, call.arguments) == ("call_1", "send", '{"to": "[EMAIL]"}')
    assert request.messages[2].tool_call_id == "call_1" and request.messages[2].content == "sent to [EMAIL]"
    assert [t.name for t in request.tools] == ["send"]


def test_feedback_on_own_requests_and_404_on_anyone_elses(env: tuple[TestClient[Any], CaptureWriter, Path]) -> None:
    client, writer, _db = env
    rid = chat(client, "acme", "rate me").headers["x-strait-request-id"]
    mine = chat(client, "acme", "by my id", headers={"x-request-id": "client-77"})
    assert mine.headers["x-request-id"] == "client-77"
    client.blocking_portal.call(writer.flush)

    ok = feedback(client, "acme", {"request_id": rid, "value": 7, "weight": 2, "metadata": {"src": "thumbs"}})
    assert ok.status_code == 200, ok.text
    assert ok.json()["request_id"] == rid and ok.json()["kind"] == "score"
    # Another key of the same tenant may rate it; a boolean and a label too; a correction is redacted.
    assert feedback(client, "acme2", {"request_id": rid, "value": False}).status_code == 200
    assert feedback(client, "acme", {"request_id": rid, "value": "helpful"}).status_code == 200
    assert feedback(client, "acme", {"request_id": rid, "correction": "write to jane@corp.io"}).status_code == 200
    # By the client's own x-request-id (trace_id, or request_id falling back to it).
    by_trace = feedback(client, "acme", {"trace_id": "client-77", "value": True})
    assert by_trace.status_code == 200 and by_trace.json()["request_id"] == mine.headers["x-strait-request-id"]

    # Another tenant's request, or an unknown id: 404 in OpenAI's envelope, nothing stored.
    denied = [
        feedback(client, "globex", {"request_id": rid, "value": -10}),
        feedback(client, "globex", {"trace_id": "client-77", "value": -10}),
        feedback(client, "acme", {"request_id": "req_unknown", "value": 1}),
    ]
    for response in denied:
        assert response.status_code == 404, response.text
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert response.json()["error"]["code"] == "not_found"
    assert client.post("/v1/feedback", json={"request_id": rid, "value": 1}).status_code == 401

    [captured] = [c for c in stored(client, writer) if c.record.request_id == rid]
    kinds = [(f.kind, f.score, f.label, f.correction, f.key_id) for f in captured.feedback]
    assert kinds == [
        ("score", 7.0, None, None, "a1"),
        ("boolean", -1.0, None, None, "a2"),
        ("label", None, "helpful", None, "a1"),
        ("correction", None, None, "write to [EMAIL]", "a1"),
    ]
    assert captured.feedback[0].weight == 2 and captured.feedback[0].metadata == {"src": "thumbs"}


def test_feedback_right_after_the_answer_finds_it(env: tuple[TestClient[Any], CaptureWriter, Path]) -> None:
    client, writer, _db = env
    # The writer's batching delay is longer than the test: only the feedback's own flush can land it.
    writer.flush_every_s = 3600
    rid = chat(client, "acme", "quick").headers["x-strait-request-id"]
    assert writer.queued() == 1
    rated = feedback(client, "acme", {"request_id": rid, "value": True})
    assert rated.status_code == 200, rated.text
    assert writer.queued() == 0


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"value": 1}',
        b'{"request_id": "r", "trace_id": "t", "value": 1}',
        b'{"request_id": "r"}',
        b'{"request_id": "r", "value": 11}',
        b'{"request_id": "r", "value": -10.5}',
        b'{"request_id": "r", "value": ""}',
        b'{"request_id": "r", "value": 1, "weight": -1}',
        b'{"request_id": "r", "value": 1, "extra": true}',
        b'{"request_id": "' + b"x" * 129 + b'", "value": 1}',
        b'{"request_id": "r", "value": 1, "metadata": {"k": 5}}',
    ],
)
def test_bad_feedback_shapes_are_400(env: tuple[TestClient[Any], CaptureWriter, Path], body: bytes) -> None:
    client, _writer, _db = env
    response = client.post("/v1/feedback", content=body, headers={"authorization": f"Bearer {KEYS['acme']}"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_an_oversized_feedback_body_is_413(env: tuple[TestClient[Any], CaptureWriter, Path]) -> None:
    client, _writer, _db = env
    body = json.dumps({"request_id": "r", "correction": "x" * 200_000})
    response = client.post("/v1/feedback", content=body, headers={"authorization": f"Bearer {KEYS['acme']}"})
    assert response.status_code == 413


def test_a_regenerate_is_recorded_on_the_earlier_request(env: tuple[TestClient[Any], CaptureWriter, Path]) -> None:
    client, writer, _db = env
    first = chat(client, "acme", "tell me a joke").headers["x-strait-request-id"]
    chat(client, "acme", "something else")
    second = chat(client, "acme", "tell me a joke", stream=True).headers["x-strait-request-id"]
    # Another tenant sending the same conversation is not a regenerate of acme's; nor is the same tenant
    # sending it to another route (a comparison of routes, not a retry of the answer).
    chat(client, "globex", "tell me a joke")
    other_route = chat(client, "acme", "tell me a joke", model="chat-b").headers["x-strait-request-id"]
    by_id = {c.record.request_id: c for c in stored(client, writer)}
    assert [(f.kind, f.by_request_id) for f in by_id[first].feedback] == [("regenerate", second)]
    assert by_id[second].feedback == ()
    assert by_id[other_route].feedback == ()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_an_anthropic_messages_client_is_captured_like_any_other(
    env: tuple[TestClient[Any], CaptureWriter, Path], stream: bool
) -> None:
    client, writer, _db = env
    response = client.post(
        "/v1/messages",
        json={
            "model": "chat",
            "max_tokens": 50,
            "stream": stream,
            "messages": [{"role": "user", "content": "hi bob@x.io"}],
        },
        headers={"x-api-key": KEYS["acme"], "anthropic-version": "2023-06-01"},
    )
    assert response.status_code == 200, response.text
    [captured] = stored(client, writer)
    record = captured.record
    assert record.request_id == response.headers["x-strait-request-id"]
    assert record.protocol == "anthropic"
    assert record.request is not None and record.request.messages[0].content == "hi [EMAIL]"
    assert (
        record.answer is not None
        and record.answer.content == f"answer {record.answer.content.split()[1]} to hi [EMAIL]"
    )


def test_a_cache_bad_hit_report_is_feedback_on_the_hit_it_names(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.replace("regenerate_window_s: 600}", "regenerate_window_s: 0}\n    cache: {exact: true}"))
    app = create_app(
        Settings(
            policy_path=str(policy),
            spool_dir=str(tmp_path / "spool"),
            access_log="off",
            capture=f"sqlite:///{tmp_path}/c.db",
        ),
        factories={"echo": EchoFactory()},
    )
    with TestClient(app) as client:
        gw = app.state["gateway"]
        writer = gw.services.capture
        chat(client, "acme", "cached question my ip is 10.1.2.3", temperature=0)
        client.blocking_portal.call(gw.runtime.cache.drain)
        hit = chat(client, "acme", "cached question my ip is 10.1.2.3", temperature=0)
        assert hit.headers["x-strait-cache"] == "hit"
        reported = client.post(
            "/v1/cache/feedback",
            json={"id": hit.json()["id"], "reason": "stale, ask 10.9.9.9"},
            headers={"authorization": f"Bearer {KEYS['acme']}"},
        )
        assert reported.status_code == 200, reported.text
        by_id = {c.record.request_id: c for c in stored(client, writer)}
    served = by_id[hit.headers["x-strait-request-id"]]
    assert served.record.cache == "hit" and served.record.response_id == hit.json()["id"]
    assert [(f.kind, f.metadata) for f in served.feedback] == [("cache_bad_hit", {"reason": "stale, ask [IP]"})]
    # The request that made the answer is not the one reported.
    assert all(c.feedback == () for rid, c in by_id.items() if rid != served.record.request_id)


def test_feedback_sent_to_another_replica_finds_the_capture_once_its_writer_lands(tmp_path: Path) -> None:
    """Behind a load balancer the answer comes from replica A and its feedback reaches replica B, both on
    one capture store, before A's writer has landed the record (its batching delay). B looks again for
    about a second before a 404 (gateway.api.feedback.SHARED_STORE_WAITS_S); here A's batch lands right
    after B's first two lookups missed (its own queue written in between), so only a later look finds it."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with gateway(tmp_path / "a") as (client_a, writer_a, db):
        writer_a.flush_every_s = 3600  # A's batch lands only when the test says so
        rid = chat(client_a, "acme", "rated on the other replica").headers["x-strait-request-id"]
        assert writer_a.queued() == 1
        policy = tmp_path / "b" / "policy.yaml"
        policy.write_text(POLICY)
        app_b = create_app(
            Settings(
                policy_path=str(policy),
                spool_dir=str(tmp_path / "b" / "spool"),
                access_log="off",
                capture=f"sqlite:///{db}",
            ),
            factories={"echo": EchoFactory()},
        )
        with TestClient(app_b) as client_b:
            writer_b = app_b.state["gateway"].services.capture
            store_b = client_b.blocking_portal.call(writer_b.store)
            lookups: list[str | None] = []
            real = store_b.resolve

            async def resolve(tenant: str, **named: Any) -> str | None:
                found = await real(tenant, **named)
                lookups.append(found)
                if len(lookups) == 2 and found is None:
                    client_a.blocking_portal.call(writer_a.flush)  # A's writer lands its batch now
                return found

            store_b.resolve = resolve  # type: ignore[method-assign]
            rated = feedback(client_b, "acme", {"request_id": rid, "value": True})
            assert rated.status_code == 200, rated.text
            assert rated.json()["request_id"] == rid
            assert lookups[:2] == [None, None] and lookups[-1] == rid
        [captured] = [c for c in stored(client_a, writer_a) if c.record.request_id == rid]
        assert [(f.kind, f.score) for f in captured.feedback] == [("boolean", 1.0)]
