"""The Learning loop page and document (/ui/loop, /admin/api/loop) in process: capture off says so, capture on
shows the day's captures by tenant and route and the feedback per route and model from the SQLite store, the
writer's counters; admin keys only, the console's headers, no captured text on the page. Each route with a
shadow or canary shows live vs candidate: the numbers `strait datasets compare` computes (the same function,
checked against its own call), computed in a worker thread; a comparison that fails is said, not a 500."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from gateway.api.console import loop
from gateway.api.console.handlers import CSP
from gateway.app import create_app
from gateway.capture.compare import prices_of
from gateway.capture.store import open_capture_store
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


TRIALS_POLICY = f"""
version: 1
server: {{admin_keys: ["{key_digest(ADMIN)}"]}}
backends:
  - {{name: b1, adapter: echo, base_url: "http://127.0.0.1:9/v1"}}
models:
  - {{name: m, deployments: [{{backend: b1, upstream_model: m-up, price: {{input_per_mtok: 1, output_per_mtok: 2}}}}]}}
  - {{name: cand, deployments: [{{backend: b1, upstream_model: cand-up, price: {{input_per_mtok: 3, output_per_mtok: 4}}}}]}}
routes:
  - {{name: chat, models: [m], shadow: {{model: cand, sample_rate: 1}}}}
  - {{name: edge, models: [m], canary: {{model: cand, weight: 1}}}}
  - {{name: plain, models: [m]}}
tenants:
  - name: acme
    keys: [{{id: a1, digest: "{key_digest(ACME)}"}}]
    capture: {{enabled: true, sample_rate: 1.0}}
"""


def _shadow_completed(gateway: Any) -> float:
    total = 0.0
    for line in gateway.metrics.render().decode().splitlines():
        if line.startswith("strait_shadow_requests_total{") and 'outcome="completed"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_each_trial_route_shows_live_vs_candidate_as_datasets_compare_computes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'capture.db'}"
    policy = tmp_path / "policy.yaml"
    policy.write_text(TRIALS_POLICY)
    app = create_app(
        Settings(policy_path=str(policy), spool_dir=str(tmp_path / "spool"), access_log="off", capture=url),
        factories={"echo": EchoFactory()},
    )
    threads: list[int] = []
    real_compare = loop.compare

    async def recorded(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.get_ident())
        return await real_compare(*args, **kwargs)

    monkeypatch.setattr(loop, "compare", recorded)
    with TestClient(app, base_url="https://testserver.local") as client:
        gateway = client.app.state["gateway"]
        for i, route in enumerate(["chat", "chat", "chat", "edge", "edge"]):
            r = client.post(
                "/v1/chat/completions",
                json={"model": route, "messages": [{"role": "user", "content": f"question {i} {SECRET_PROMPT}"}]},
                headers={"authorization": f"Bearer {ACME}"},
            )
            assert r.status_code == 200, r.text
        deadline = time.monotonic() + 30
        while _shadow_completed(gateway) < 3 or gateway.services.shadow_traffic.pending:
            assert time.monotonic() < deadline, "the three shadow copies did not complete"
            client.blocking_portal.call(asyncio.sleep, 0.01)
        client.blocking_portal.call(gateway.services.capture.flush)
        doc = client.get("/admin/api/loop", headers=_admin()).json()
        loop_thread = client.blocking_portal.call(threading.get_ident)
        page = client.get("/ui/loop", headers=_admin()).text

    assert doc["trials_state"] == "ok"
    # The copies are stored beside their live records but are not requests of the route.
    assert doc["shadow_captured"] == 3
    assert {(v["route"], v["records"]) for v in doc["volume"]} == {("chat", 3), ("edge", 2)}
    assert {f["model"] for f in doc["feedback"] if f["route"] == "chat"} == {"m"}
    assert [(t["route"], t["candidate"], t["kind"]) for t in doc["trials"]] == [
        ("chat", "cand", "shadow"),
        ("edge", "cand", "canary"),
    ]
    chat, edge = (t["comparison"] for t in doc["trials"])
    assert chat["shadow"]["pairs"] == 3
    assert chat["shadow"]["live"]["records"] == 3 and chat["shadow"]["candidate"]["completed"] == 3
    assert chat["shadow"]["candidate"]["cost_usd"] > 0 and chat["canary"]["candidate"]["records"] == 0
    assert edge["canary"]["candidate"]["records"] == 2 and edge["shadow"]["pairs"] == 0
    # The same numbers as `strait datasets compare --json` over the same window (the CLI's own call).
    policy_set = app.state["gateway"].runtime.index.policy

    async def cli(route: str) -> dict[str, Any]:
        store = await open_capture_store(url)
        try:
            got = await real_compare(
                store, route, "cand", prices_of(policy_set), since_ms=doc["since_ms"], until_ms=doc["until_ms"]
            )
            return got.as_dict()
        finally:
            await store.aclose()

    assert chat == asyncio.run(cli("chat")) and edge == asyncio.run(cli("edge"))
    # Computed off the event loop: in a worker thread, never the loop's.
    assert len(threads) == 4 and loop_thread not in threads  # two routes, two loads (JSON and page)
    assert "Route chat: live vs candidate cand (shadow)" in page
    assert "data-figure='pairs:chat:cand'>3<" in page
    assert "Canary: candidate" in page
    assert "data-figure='shadow-captured'>3<" in page
    assert SECRET_PROMPT not in page


def test_without_a_trial_route_the_page_says_so(tmp_path: Path) -> None:
    with _client(tmp_path, f"sqlite:///{tmp_path / 'capture.db'}") as client:
        _chat(client)
        doc = client.get("/admin/api/loop", headers=_admin()).json()
        assert doc["trials_state"] == "none" and doc["trials"] == []
        assert "No route of the running policy has a shadow or canary" in client.get("/ui/loop", headers=_admin()).text


def test_a_comparison_that_fails_is_said_and_the_page_stands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError("store gone")

    monkeypatch.setattr(loop, "compare_all", broken)
    policy = tmp_path / "policy.yaml"
    policy.write_text(TRIALS_POLICY)
    app = create_app(
        Settings(
            policy_path=str(policy),
            spool_dir=str(tmp_path / "spool"),
            access_log="off",
            capture=f"sqlite:///{tmp_path / 'capture.db'}",
        ),
        factories={"echo": EchoFactory()},
    )
    with TestClient(app, base_url="https://testserver.local") as client:
        _chat(client)
        client.blocking_portal.call(client.app.state["gateway"].services.capture.flush)
        doc = client.get("/admin/api/loop", headers=_admin()).json()
        assert doc["capture"] == "on" and doc["trials_state"] == "failed" and doc["trials"] == []
        page = client.get("/ui/loop", headers=_admin())
        assert page.status_code == 200 and "Comparing live and candidate answers failed" in page.text
