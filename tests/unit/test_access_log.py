"""One JSON line per request (in-process: create_app with the simulated adapter): answered requests
carry tenant, route, deployment, tokens, cost and latency; refusals before any upstream get a line too;
sampling drops only successful ones; no key or prompt text is ever written."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from gateway.app import create_app
from gateway.policy.index import key_digest
from gateway.settings import Settings

KEY = "sk-access-log-tenant-0001"
POLICY = f"""
version: 1
backends:
  - {{name: sim, adapter: simulated, simulated: {{ttft_ms: 0, tokens_per_second: 1000000, output_tokens: 5}}}}
models:
  - name: m
    deployments: [{{backend: sim, upstream_model: sim-1, price: {{input_per_mtok: 1000, output_per_mtok: 2000}}}}]
routes:
  - {{name: chat, models: [m]}}
tenants:
  - name: acme
    keys: [{{id: k1, digest: "{key_digest(KEY)}"}}]
"""


def _app(tmp_path: Path, out: io.BytesIO, **settings: Any) -> Iterator[TestClient[object]]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    app = create_app(
        Settings(policy_path=str(policy), spool_dir=str(tmp_path / "spool"), **settings), access_log_out=out
    )
    with TestClient(app) as c:
        yield c


@pytest.fixture()
def out() -> io.BytesIO:
    return io.BytesIO()


def _lines(out: io.BytesIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_one_line_per_request_answered_or_refused(tmp_path: Path, out: io.BytesIO) -> None:
    secret_prompt = "prompt-text-never-logged"
    for client in _app(tmp_path, out):
        ok = client.post(
            "/v1/chat/completions",
            json={"model": "chat", "messages": [{"role": "user", "content": secret_prompt}]},
            headers={"authorization": f"Bearer {KEY}", "x-request-id": "mine-1"},
        )
        assert ok.status_code == 200
        stream = client.post(
            "/v1/chat/completions",
            json={"model": "chat", "messages": [{"role": "user", "content": "x"}], "stream": True},
            headers={"authorization": f"Bearer {KEY}"},
        )
        assert "[DONE]" in stream.text
        assert client.post("/v1/chat/completions", json={"model": "chat"}).status_code == 401
        missing = client.post(
            "/v1/chat/completions",
            json={"model": "nope", "messages": [{"role": "user", "content": "x"}]},
            headers={"authorization": f"Bearer {KEY}"},
        )
        assert missing.status_code == 404
    lines = _lines(out)
    assert [line["status"] for line in lines] == [200, 200, 401, 404]
    first = lines[0]
    assert first["request_id"] == ok.headers["x-strait-request-id"] and first["client_request_id"] == "mine-1"
    assert (first["tenant"], first["key_id"], first["route"], first["deployment"]) == ("acme", "k1", "chat", "m@sim")
    assert first["completion_tokens"] == 5 and first["prompt_tokens"] > 0
    assert first["cost_usd"] == pytest.approx((first["prompt_tokens"] * 1000 + 5 * 2000) / 1e6)
    assert first["latency_ms"] > 0 and first["attempts"] == 1
    assert "ttft_ms" in lines[1]
    assert lines[2]["error"] == "missing_api_key" and "tenant" not in lines[2]
    assert lines[3]["error"] == "model_not_found" and lines[3]["tenant"] == "acme"
    # The client's unknown `model` is its own (unbounded) string, not a policy name: not logged.
    assert "route" not in lines[3] and "nope" not in json.dumps(lines[3])
    raw = out.getvalue().decode()
    assert KEY not in raw and secret_prompt not in raw


def test_sampling_keeps_refusals_and_off_writes_nothing(tmp_path: Path, out: io.BytesIO) -> None:
    body = {"model": "chat", "messages": [{"role": "user", "content": "x"}]}
    for client in _app(tmp_path, out, access_log_sample=0.0):
        assert (
            client.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"}).status_code
            == 200
        )
        assert client.post("/v1/chat/completions", json=body).status_code == 401
    assert [line["status"] for line in _lines(out)] == [401]
    silent = io.BytesIO()
    for client in _app(tmp_path, silent, access_log="off"):
        assert client.post("/v1/chat/completions", json=body).status_code == 401
    assert silent.getvalue() == b""
