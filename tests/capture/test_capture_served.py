"""Capture in `strait serve` itself: STRAIT_CAPTURE read from the environment, a consenting tenant's
request redacted into the SQLite file, feedback on it, and what was queued written on SIGTERM."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx
import msgspec

from gateway.capture.records import CaptureRecord
from gateway.policy.index import key_digest
from tests.harness.gateway import gateway_process

KEY = "sk-capture-served-0001"
POLICY = f"""
version: 1
backends:
  - {{name: sim, adapter: simulated, simulated: {{ttft_ms: 1, tokens_per_second: 5000, output_tokens: 8}}}}
models:
  - {{name: m, licence: {{name: mit, outputs_train: true}}, deployments: [{{backend: sim, upstream_model: m}}]}}
routes: [{{name: chat, models: [m]}}]
tenants:
  - name: acme
    keys: [{{id: k1, digest: "{key_digest(KEY)}"}}]
    capture: {{enabled: true}}
"""


def test_strait_serve_captures_where_strait_capture_says(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    db = tmp_path / "elsewhere" / "capture.db"
    env = {"STRAIT_CAPTURE": f"sqlite:///{db}", "STRAIT_SPOOL_DIR": str(tmp_path / "spool")}
    server = gateway_process(policy, env=env, log_path=tmp_path / "gw.log").start()
    try:
        auth = {"authorization": f"Bearer {KEY}"}
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            answer = client.post(
                "/v1/chat/completions",
                json={"model": "chat", "messages": [{"role": "user", "content": "card 4111 1111 1111 1111"}]},
                headers=auth,
            )
            assert answer.status_code == 200, answer.text
            rid = answer.headers["x-request-id"]
            rated = client.post("/v1/feedback", json={"request_id": rid, "value": -2}, headers=auth)
            assert rated.status_code == 200, rated.text
            # The last answer is in the store once the server has stopped (whatever was still queued is
            # written on the way out).
            last = client.post(
                "/v1/chat/completions",
                json={"model": "chat", "messages": [{"role": "user", "content": "bye"}]},
                headers=auth,
            )
            assert last.status_code == 200
    finally:
        server.stop()
    assert not (tmp_path / "spool").with_name("capture.db").exists()  # not the default place
    with sqlite3.connect(db) as conn:
        records = [
            msgspec.json.decode(r, type=CaptureRecord)
            for (r,) in conn.execute("select record from strait_captures order by ts_ms")
        ]
        kinds = conn.execute("select kind, request_id from strait_feedback").fetchall()
    assert len(records) == 2 and records[0].request_id == rid
    first = records[0].request
    assert first is not None and first.messages[0].content == "card [CARD]"
    assert kinds == [("score", rid)]
