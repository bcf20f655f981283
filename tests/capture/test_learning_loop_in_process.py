"""The learning loop's gateway side in process (create_app, the echo adapter, a SQLite capture store):
a route's shadow copy is stored beside the live record only for a tenant whose live request was captured
(another tenant's copy, or an opted-out request's, is counted, never stored), and a cache bad-hit report
is the `cache_bad_hit` feedback the dataset commands read."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from litestar.testing import TestClient

from gateway.app import create_app
from gateway.capture.records import Captured
from gateway.capture.shadow_sink import shadow_request_id
from gateway.capture.writer import CaptureWriter
from gateway.policy.index import key_digest
from gateway.settings import Settings
from tests.cache.echo_adapter import EchoFactory

KEYS = {"acme": "sk-loop-acme-000001", "globex": "sk-loop-globex-00001"}
POLICY = f"""
version: 1
backends:
  - {{name: b1, adapter: echo, base_url: "http://127.0.0.1:9/v1"}}
  - {{name: b2, adapter: echo, base_url: "http://127.0.0.1:9/v1"}}
models:
  - name: m
    capabilities: [chat]
    licence: {{name: apache-2.0, outputs_train: true}}
    deployments: [{{backend: b1, upstream_model: m-up}}]
  - name: m-lora
    base_model: m
    licence: apache-2.0
    capabilities: [chat]
    deployments: [{{backend: b2, upstream_model: m-lora-up}}]
routes:
  - {{name: chat, models: [m], shadow: {{model: m-lora, sample_rate: 1.0, timeout_s: 10}}}}
tenants:
  - name: acme
    keys: [{{id: a1, digest: "{key_digest(KEYS["acme"])}"}}]
    capture: {{enabled: true, training: true}}
    cache: {{exact: true}}
  - name: globex
    keys: [{{id: g1, digest: "{key_digest(KEYS["globex"])}"}}]
    cache: {{exact: true}}
"""


@contextlib.contextmanager
def gateway(tmp_path: Path) -> Iterator[tuple[TestClient[Any], CaptureWriter]]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    app = create_app(
        Settings(
            policy_path=str(policy),
            spool_dir=str(tmp_path / "spool"),
            access_log="off",
            capture=f"sqlite:///{tmp_path / 'capture.db'}",
        ),
        factories={"echo": EchoFactory()},
    )
    with TestClient(app) as client:
        writer = app.state["gateway"].services.capture
        assert writer is not None
        yield client, writer


def ask(client: TestClient[Any], tenant: str, text: str) -> Any:
    response = client.post(
        "/v1/chat/completions",
        json={"model": "chat", "temperature": 0, "messages": [{"role": "user", "content": text}]},
        headers={"authorization": f"Bearer {KEYS[tenant]}"},
    )
    assert response.status_code == 200, response.text
    return response


def metric(client: TestClient[Any], name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.rsplit(" ", 1)[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_for(condition: Callable[[], bool], what: str, deadline_s: float = 20.0) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def get(client: TestClient[Any], writer: CaptureWriter, tenant: str, request_id: str) -> Captured | None:
    client.blocking_portal.call(writer.flush)

    async def read() -> Captured | None:
        store = await writer.existing_store()
        return None if store is None else await store.get(tenant, request_id)

    return client.blocking_portal.call(read)


def test_a_shadow_answer_is_stored_beside_the_live_one_only_with_consent(tmp_path: Path) -> None:
    with gateway(tmp_path) as (client, writer):
        live = ask(client, "acme", "What is the capital of Austria?")
        rid = live.headers["x-strait-request-id"]
        wait_for(lambda: get(client, writer, "acme", shadow_request_id(rid)) is not None, "acme's shadow record")
        copy = get(client, writer, "acme", shadow_request_id(rid))
        original = get(client, writer, "acme", rid)
        assert copy is not None and original is not None
        assert copy.record.shadow_of == rid and original.record.shadow_of is None
        assert copy.record.model == "m-lora" and copy.record.deployment == "m-lora@b2"
        assert copy.record.route == "chat" and copy.record.tenant == "acme"
        assert copy.record.consent_training is True and copy.record.request is None
        assert copy.record.answer is not None and copy.record.answer.content is not None
        # The candidate's answer, never the client's: the echo adapter numbers every answer.
        assert copy.record.answer.content != live.json()["choices"][0]["message"]["content"]
        assert "What is the capital of Austria?" in copy.record.answer.content

        other = ask(client, "globex", "What is the capital of Hungary?")
        wait_for(
            lambda: metric(client, 'strait_shadow_captures_total{result="no_consent",route="chat"}') == 1,
            "globex's copy counted",
        )
        orid = other.headers["x-strait-request-id"]
        assert get(client, writer, "globex", shadow_request_id(orid)) is None
        assert get(client, writer, "globex", orid) is None
        assert metric(client, 'strait_shadow_captures_total{result="queued",route="chat"}') == 1
        assert client.blocking_portal.call(writer.store).__class__.__name__ == "SqliteCaptureStore"
        records, _ = client.blocking_portal.call(_counts, writer)
        assert records == 2  # acme's live record and its copy; nothing of globex


async def _counts(writer: CaptureWriter) -> tuple[int, int]:
    return await (await writer.store()).counts()


def test_a_cache_bad_hit_report_is_what_export_leaves_out(tmp_path: Path) -> None:
    """The report (gateway.api.feedback.record_bad_hit) is a `cache_bad_hit` on the hit's capture: the
    kind `strait datasets export` and `compare` read."""
    with gateway(tmp_path) as (client, writer):
        ask(client, "acme", "Name the longest river in Europe.")
        hit = ask(client, "acme", "Name the longest river in Europe.")
        assert hit.headers["x-strait-cache"] == "hit"
        rid = hit.headers["x-strait-request-id"]
        ok = client.post(
            "/v1/cache/feedback", json={"id": hit.json()["id"]}, headers={"authorization": f"Bearer {KEYS['acme']}"}
        )
        assert ok.status_code == 200
        found = get(client, writer, "acme", rid)
        assert found is not None and found.record.cache == "hit"
        assert [(f.kind, f.key_id) for f in found.feedback] == [("cache_bad_hit", "a1")]


def test_a_streamed_answer_copy_is_stored_and_an_opted_out_request_copy_is_not(tmp_path: Path) -> None:
    with gateway(tmp_path) as (client, writer):
        streamed = client.post(
            "/v1/chat/completions",
            json={"model": "chat", "stream": True, "messages": [{"role": "user", "content": "Stream me the Danube"}]},
            headers={"authorization": f"Bearer {KEYS['acme']}"},
        )
        assert streamed.status_code == 200 and "data: [DONE]" in streamed.text
        rid = streamed.headers["x-strait-request-id"]
        wait_for(lambda: get(client, writer, "acme", shadow_request_id(rid)) is not None, "the stream's copy")
        copy = get(client, writer, "acme", shadow_request_id(rid))
        assert copy is not None and copy.record.shadow_of == rid and copy.record.answer is not None
        assert "Stream me the Danube" in (copy.record.answer.content or "")

        opted = client.post(
            "/v1/chat/completions",
            json={"model": "chat", "messages": [{"role": "user", "content": "Do not keep this"}]},
            headers={"authorization": f"Bearer {KEYS['acme']}", "x-strait-capture": "off"},
        )
        assert opted.status_code == 200
        wait_for(
            lambda: metric(client, 'strait_shadow_captures_total{result="no_consent",route="chat"}') == 1,
            "the opted-out request's copy counted",
        )
        orid = opted.headers["x-strait-request-id"]
        assert get(client, writer, "acme", orid) is None
        assert get(client, writer, "acme", shadow_request_id(orid)) is None
