"""The Learning loop page and document (/ui/loop, /admin/api/loop) in process: capture off says so, capture on
shows the day's captures by tenant and route and the feedback per route and model from the SQLite store, the
writer's counters; admin keys only, the console's headers, no captured text on the page."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from gateway.api.console import loop
from gateway.api.console.handlers import CSP
from gateway.app import create_app
from gateway.policy.index import key_digest
from gateway.settings import Settings
from tests.cache.echo_adapter import EchoFactory

ADMIN = "sk-loop-admin-000001"
ACME = "sk-loop-acme-0000001"
POLICY = f"""
version: 1
server: {{admin_keys: ["{key_digest(ADMIN)}"]}}
backends:
  - {{name: b1, adapter: echo, base_url: "http://127.0.0.1:9/v1"}}
models:
  - {{name: m, deployments: [{{backend: b1, upstream_model: m-up}}]}}
routes:
  - {{name: chat, models: [m]}}
tenants:
  - name: acme
    keys: [{{id: a1, digest: "{key_digest(ACME)}"}}]
    capture: {{enabled: true, sample_rate: 1.0}}
"""
SECRET_PROMPT = "the loop page never shows 99120"


@contextlib.contextmanager
def _client(tmp_path: Path, capture: str) -> Iterator[TestClient[Any]]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    app = create_app(
        Settings(policy_path=str(policy), spool_dir=str(tmp_path / "spool"), access_log="off", capture=capture),
        factories={"echo": EchoFactory()},
    )
    with TestClient(app, base_url="https://testserver.local") as client:
        yield client


def _admin() -> dict[str, str]:
    return {"authorization": f"Bearer {ADMIN}"}


def _chat(client: TestClient[Any]) -> str:
    r = client.post(
        "/v1/chat/completions",
        json={"model": "chat", "messages": [{"role": "user", "content": SECRET_PROMPT}]},
        headers={"authorization": f"Bearer {ACME}"},
    )
    assert r.status_code == 200, r.text
    return str(r.headers["x-strait-request-id"])


def test_capture_off_is_said_and_only_admins_get_in(tmp_path: Path) -> None:
    with _client(tmp_path, "off") as client:
        _chat(client)
        doc = client.get("/admin/api/loop", headers=_admin()).json()
        assert doc["capture"] == "off" and doc["volume"] == [] and doc["feedback"] == []
        page = client.get("/ui/loop", headers=_admin())
        assert page.status_code == 200 and "Capture is off on this replica" in page.text
        assert page.headers["content-security-policy"] == CSP and page.headers["x-frame-options"] == "DENY"
        assert client.get("/admin/api/loop", headers={"authorization": f"Bearer {ACME}"}).status_code == 403
        assert client.get("/ui/loop", headers={"authorization": f"Bearer {ACME}"}).status_code == 403
        assert client.get("/admin/api/loop").status_code == 401
        anonymous = client.get("/ui/loop", follow_redirects=False)
        assert anonymous.status_code == 303 and anonymous.headers["location"] == "/ui/login"


def test_capture_on_shows_the_days_volume_feedback_and_writer_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _client(tmp_path, f"sqlite:///{tmp_path / 'capture.db'}") as client:
        writer = client.app.state["gateway"].services.capture
        rated = _chat(client)
        _chat(client)
        _chat(client)
        client.blocking_portal.call(writer.flush)
        for body in (
            {"request_id": rated, "value": 7},
            {"request_id": rated, "value": 2},
            {"request_id": rated, "value": False},
        ):
            r = client.post("/v1/feedback", content=json.dumps(body), headers={"authorization": f"Bearer {ACME}"})
            assert r.status_code == 200, r.text
        doc = client.get("/admin/api/loop", headers=_admin()).json()
        assert doc["capture"] == "on" and doc["store"] == "sqlite" and not doc["truncated"]
        assert doc["volume"] == [{"tenant": "acme", "route": "chat", "records": 3, "failed": 0}]
        [fb] = doc["feedback"]
        # The same conversation sent again is a regenerate of the one before (implicit feedback): 2 of them.
        assert (fb["route"], fb["model"], fb["records"], fb["with_feedback"], fb["regenerated"]) == (
            "chat",
            "m",
            3,
            2,
            2,
        )
        assert (fb["scores"], fb["mean_score"], fb["thumbs_up"], fb["thumbs_down"]) == (2, 4.5, 0, 1)
        assert doc["writer"]["queued"] == 3 and doc["writer"]["written"] == 3
        assert doc["window"]["kind"] == "since_start"
        page = client.get("/ui/loop", headers=_admin()).text
        assert 'data-figure="captured:acme:chat">3<' in page
        assert 'data-figure="feedback:chat:m">2<' in page
        assert SECRET_PROMPT not in page and "Capture is off" not in page
        assert "&lt;" not in page  # no markup escaped into a caption
        # A day holding more than the page reads: it stops there and says so.
        monkeypatch.setattr(loop, "MAX_SCANNED", 2)
        doc = client.get("/admin/api/loop", headers=_admin()).json()
        assert doc["truncated"] and doc["scanned"] == 2 and doc["volume"][0]["records"] == 2
        assert "the first 2 only" in client.get("/ui/loop", headers=_admin()).text


def test_a_store_that_does_not_answer_is_said_not_a_server_error(tmp_path: Path) -> None:
    db = tmp_path / "capture.db"
    db.write_bytes(b"this is not a SQLite database" * 100)
    with _client(tmp_path, f"sqlite:///{db}") as client:
        doc = client.get("/admin/api/loop", headers=_admin())
        assert doc.status_code == 200 and doc.json()["capture"] == "unreadable"
        page = client.get("/ui/loop", headers=_admin())
        assert page.status_code == 200 and "The capture store did not answer" in page.text
