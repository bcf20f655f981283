"""CORS through `strait serve`: a browser page at a listed origin may call the API (preflight answered,
`Access-Control-*` on JSON answers, streams and errors alike); another origin may not."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.policy.index import key_digest
from tests.e2e.conftest import ALPHA_KEY
from tests.harness.gateway import gateway_process
from tests.harness.procs import ServerProcess

PAGE = "http://localhost:5173"
KEY = "sk-cors-page-1"
POLICY = f"""
version: 1
server:
  cors: {{allowed_origins: ["{PAGE}", "https://app.example.com"], max_age_s: 120}}
backends:
  - {{name: sim, adapter: simulated, tier: edge, simulated: {{ttft_ms: 1, tokens_per_second: 5000, output_tokens: 6}}}}
models:
  - {{name: sim-model, deployments: [{{backend: sim, upstream_model: sim-1}}]}}
routes:
  - {{name: chat, models: [sim-model]}}
tenants:
  - name: page
    keys: [{{id: page-1, digest: "{key_digest(KEY)}"}}]
"""
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def cors_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder: Path = tmp_path_factory.mktemp("cors")
    (folder / "policy.yaml").write_text(POLICY)
    with gateway_process(folder / "policy.yaml", log_path=folder / "gateway.log") as proc:
        yield proc


def _preflight(base_url: str, origin: str) -> httpx.Response:
    return httpx.options(
        base_url + "/v1/chat/completions",
        headers={
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization,content-type,x-stainless-os",
        },
        timeout=10,
    )


def test_a_listed_origins_preflight_is_answered(cors_gateway: ServerProcess) -> None:
    r = _preflight(cors_gateway.base_url, PAGE)
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == PAGE
    assert "POST" in r.headers["access-control-allow-methods"]
    assert r.headers["access-control-allow-headers"] == "authorization,content-type,x-stainless-os"
    assert r.headers["access-control-max-age"] == "120"
    assert "Origin" in r.headers["vary"]
    assert "access-control-allow-credentials" not in r.headers


def test_another_origins_preflight_is_refused_naming_the_setting(cors_gateway: ServerProcess) -> None:
    r = _preflight(cors_gateway.base_url, "https://evil.example")
    assert r.status_code == 403
    assert "access-control-allow-origin" not in r.headers
    assert r.json()["error"]["code"] == "cors_origin_not_allowed"
    assert "server.cors.allowed_origins" in r.json()["error"]["message"]


def test_answers_to_a_listed_origin_carry_the_headers(cors_gateway: ServerProcess) -> None:
    auth = {"authorization": f"Bearer {KEY}", "origin": PAGE}
    answer = httpx.post(cors_gateway.base_url + "/v1/chat/completions", json=CHAT, headers=auth, timeout=10)
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == PAGE and "Origin" in answer.headers["vary"]
    assert "x-strait-request-id" in answer.headers["access-control-expose-headers"]
    with httpx.stream(
        "POST", cors_gateway.base_url + "/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth, timeout=10
    ) as stream:
        assert stream.headers["access-control-allow-origin"] == PAGE
        assert "data: [DONE]" in stream.read().decode()
    refused = httpx.post(
        cors_gateway.base_url + "/v1/chat/completions", json=CHAT, headers={"origin": PAGE}, timeout=10
    )
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == PAGE
    models = httpx.get(cors_gateway.base_url + "/v1/models", headers=auth, timeout=10)
    assert models.status_code == 200 and models.headers["access-control-allow-origin"] == PAGE


def test_answers_to_other_origins_and_to_non_browsers_carry_none(cors_gateway: ServerProcess) -> None:
    auth = {"authorization": f"Bearer {KEY}"}
    other = httpx.post(
        cors_gateway.base_url + "/v1/chat/completions",
        json=CHAT,
        headers={**auth, "origin": "https://evil.example"},
        timeout=10,
    )
    assert other.status_code == 200  # served (a browser will not let the page read it)
    assert "access-control-allow-origin" not in other.headers and other.headers["vary"] == "Origin"
    plain = httpx.post(cors_gateway.base_url + "/v1/chat/completions", json=CHAT, headers=auth, timeout=10)
    assert "access-control-allow-origin" not in plain.headers and "vary" not in plain.headers


def test_without_cors_in_the_policy_a_preflight_is_refused_not_405(gateway: ServerProcess) -> None:
    r = _preflight(gateway.base_url, PAGE)
    assert r.status_code == 403 and r.json()["error"]["code"] == "cors_origin_not_allowed"
    answer = httpx.get(
        gateway.base_url + "/v1/models", headers={"authorization": f"Bearer {ALPHA_KEY}", "origin": PAGE}, timeout=10
    )
    assert "access-control-allow-origin" not in answer.headers
