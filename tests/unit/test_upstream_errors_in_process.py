"""The request path in process (create_app with scripted adapters): an upstream refusing the gateway's
credentials falls back to the next deployment or ends as 502 `upstream_auth_failed`, counted and logged
by backend; upstream error text, mid-stream errors included, is redacted; the upstream's x-ratelimit-*
never reach the client."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from litestar.testing import TestClient

from gateway.app import create_app
from gateway.contracts import UpstreamCall, UpstreamResponse
from gateway.policy.index import key_digest
from gateway.policy.model import Backend
from gateway.settings import Settings

CLIENT_KEY = "sk-tenant-in-process-1"
BAD_SECRET = "sk-provider-revoked-9f8e7d6c5b4a"
GOOD_SECRET = "sk-provider-good-1a2b3c4d5e6f"
INTERNAL = "CUDA OOM on gpu-node-7.corp.internal:8000 (/opt/vllm/engine.py:812)"
OK_BODY = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}
PROVIDER_LIMITS = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-limit-tokens": "150000"}


def _error(message: str, type_: str = "server_error", code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


class Scripted:
    """One behaviour per backend name, chosen by the test's policy."""

    def __init__(self, backend: Backend) -> None:
        self.name = backend.name
        self.calls = 0

    async def send(self, call: UpstreamCall) -> UpstreamResponse:
        self.calls += 1
        if self.name == "revoked":
            # What OpenAI-compatible providers do: echo (part of) the key they were sent.
            body = _error(f"Incorrect API key provided: {BAD_SECRET}.", "invalid_request_error", "invalid_api_key")
            return UpstreamResponse(status=401, body=body, headers=dict(PROVIDER_LIMITS))
        if self.name == "forbidden":
            return UpstreamResponse(status=403, body=_error(f"key {BAD_SECRET} may not use this model"))
        if self.name == "oom":
            return UpstreamResponse(status=500, body=_error(f"{INTERNAL} with {GOOD_SECRET}", code="engine_oom"))
        if self.name == "limited":
            body = _error("Rate limit reached for requests", "requests", "rate_limit_exceeded")
            return UpstreamResponse(status=429, body=body, headers={"retry-after": "2", **PROVIDER_LIMITS})
        if self.name == "redirect":
            body = f"Redirecting to http://gpu-node-7.corp.internal:8000/v1 key={GOOD_SECRET}".encode()
            return UpstreamResponse(
                status=302, body=body, headers={"location": "http://gpu-node-7.corp.internal:8000/v1"}
            )
        if self.name == "midstream":
            return UpstreamResponse(status=200, events=self._midstream(), headers=dict(PROVIDER_LIMITS))
        if self.name == "precontent":
            return UpstreamResponse(status=200, events=self._precontent(), headers=dict(PROVIDER_LIMITS))
        return UpstreamResponse(status=200, body=json.dumps(OK_BODY).encode(), headers=dict(PROVIDER_LIMITS))

    async def _midstream(self) -> AsyncIterator[bytes]:
        # Content first: an error before any content is a failed attempt (gateway.upstream.commit), not
        # an event of the client's stream.
        delta = {"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}
        yield json.dumps({**OK_BODY, "object": "chat.completion.chunk", "choices": [delta], "usage": None}).encode()
        yield _error(f"engine died on 10.0.3.7:9000 at /srv/engine.py:12 using {GOOD_SECRET}")

    async def _precontent(self) -> AsyncIterator[bytes]:
        role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        yield json.dumps({**OK_BODY, "object": "chat.completion.chunk", "choices": [role], "usage": None}).encode()
        yield _error(f"engine died on 10.0.3.7:9000 at /srv/engine.py:12 using {GOOD_SECRET}")

    async def aclose(self) -> None:
        return None


POLICY = f"""
version: 1
backends:
  - {{name: revoked, adapter: scripted, base_url: "http://upstream.invalid/v1", api_key: "env:REVOKED_KEY"}}
  - {{name: forbidden, adapter: scripted, base_url: "http://upstream.invalid/v1", api_key: "env:REVOKED_KEY"}}
  - {{name: good, adapter: scripted, base_url: "http://upstream.invalid/v1", api_key: "env:GOOD_KEY"}}
  - {{name: oom, adapter: scripted, base_url: "http://upstream.invalid/v1", api_key: "env:GOOD_KEY"}}
  - {{name: limited, adapter: scripted, base_url: "http://upstream.invalid/v1", api_key: "env:GOOD_KEY"}}
  - {{name: midstream, adapter: scripted, base_url: "http://upstream.invalid/v1", api_key: "env:GOOD_KEY"}}
  - {{name: redirect, adapter: scripted, base_url: "http://upstream.invalid/v1", api_key: "env:GOOD_KEY"}}
  - {{name: precontent, adapter: scripted, base_url: "http://upstream.invalid/v1", api_key: "env:GOOD_KEY"}}
models:
  - {{name: m-revoked, deployments: [{{backend: revoked, upstream_model: x}}]}}
  - {{name: m-forbidden, deployments: [{{backend: forbidden, upstream_model: x}}]}}
  - {{name: m-good, deployments: [{{backend: good, upstream_model: x}}]}}
  - {{name: m-oom, deployments: [{{backend: oom, upstream_model: x}}]}}
  - {{name: m-limited, deployments: [{{backend: limited, upstream_model: x}}]}}
  - {{name: m-midstream, deployments: [{{backend: midstream, upstream_model: x}}]}}
  - {{name: m-redirect, deployments: [{{backend: redirect, upstream_model: x}}]}}
  - {{name: m-precontent, deployments: [{{backend: precontent, upstream_model: x}}]}}
routes:
  - {{name: revoked-then-good, objective: ordered, models: [m-revoked, m-forbidden, m-good]}}
  - {{name: only-revoked, models: [m-revoked, m-forbidden]}}
  - {{name: oom, models: [m-oom]}}
  - {{name: good, models: [m-good]}}
  - {{name: midstream, models: [m-midstream]}}
  - {{name: limited, models: [m-limited]}}
  - {{name: redirect, models: [m-redirect]}}
  - {{name: redirect-then-good, objective: ordered, models: [m-redirect, m-good]}}
  - {{name: precontent, models: [m-precontent]}}
tenants:
  - name: t
    keys: [{{id: k, digest: "{key_digest(CLIENT_KEY)}"}}]
"""


@pytest.fixture()
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient[object]]:
    monkeypatch.setenv("REVOKED_KEY", BAD_SECRET)
    monkeypatch.setenv("GOOD_KEY", GOOD_SECRET)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    settings = Settings(policy_path=str(policy), spool_dir=str(tmp_path / "spool"))
    factories: dict[str, object] = {"scripted": Scripted}
    app = create_app(settings, factories=factories)  # type: ignore[arg-type]
    with TestClient(app) as c:
        c.headers["authorization"] = f"Bearer {CLIENT_KEY}"
        yield c


def _chat(client: TestClient[object], route: str, **extra: object) -> object:
    return client.post(
        "/v1/chat/completions", json={"model": route, "messages": [{"role": "user", "content": "hi"}], **extra}
    )


def _no_secret(response: object) -> None:
    text = response.text + json.dumps(dict(response.headers))  # type: ignore[attr-defined]
    assert BAD_SECRET not in text and GOOD_SECRET not in text


def _metric(client: TestClient[object], line_start: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_credential_failures_fall_back_to_the_next_deployment(
    client: TestClient[object], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="strait.upstream"):
        r = _chat(client, "revoked-then-good")
    assert r.status_code == 200, r.text  # type: ignore[attr-defined]
    assert r.headers["x-strait-deployment"] == "m-good@good"  # type: ignore[attr-defined]
    _no_secret(r)
    assert _metric(client, 'strait_upstream_auth_failures_total{backend="revoked"}') == 1
    assert _metric(client, 'strait_upstream_auth_failures_total{backend="forbidden"}') == 1
    warned = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert any("revoked" in m and "401" in m for m in warned), warned
    assert any("forbidden" in m and "403" in m for m in warned), warned
    assert not any(BAD_SECRET in m for m in caplog.messages)


def test_when_no_deployment_accepts_the_gateways_credentials_the_client_gets_502(
    client: TestClient[object],
) -> None:
    r = _chat(client, "only-revoked")
    assert r.status_code == 502  # type: ignore[attr-defined]
    error = r.json()["error"]  # type: ignore[attr-defined]
    assert error["code"] == "upstream_auth_failed" and error["type"] == "server_error"
    assert error["code"] != "invalid_api_key"
    _no_secret(r)
    assert not any(h.startswith("x-ratelimit-") for h in r.headers)  # type: ignore[attr-defined]


def test_internal_hosts_paths_and_secrets_in_an_upstream_500_are_redacted(client: TestClient[object]) -> None:
    r = _chat(client, "oom")
    assert r.status_code == 500  # type: ignore[attr-defined]
    error = r.json()["error"]  # type: ignore[attr-defined]
    assert error == {
        "message": "CUDA OOM on [host] ([path]) with [redacted]",
        "type": "server_error",
        "param": None,
        "code": "engine_oom",
    }


def test_upstream_rate_limit_headers_never_reach_the_client(client: TestClient[object]) -> None:
    """They describe the gateway's provider account; the tenant's own come from the limits stage."""
    for route, status in (("good", 200), ("limited", 429)):
        r = _chat(client, route)
        assert r.status_code == status  # type: ignore[attr-defined]
        assert not any(h.startswith("x-ratelimit-") for h in r.headers), r.headers  # type: ignore[attr-defined]
    assert r.headers["retry-after"] == "2"  # type: ignore[attr-defined]


def test_a_mid_stream_error_event_is_redacted(client: TestClient[object]) -> None:
    r = _chat(client, "midstream", stream=True)
    assert r.status_code == 200  # type: ignore[attr-defined]
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]  # type: ignore[attr-defined]
    assert events and events[-1] != "[DONE]"
    error = json.loads(events[-1])["error"]
    assert error["message"] == "engine died on [address] at [path] using [redacted]"
    _no_secret(r)


def test_an_error_event_before_any_content_is_a_failed_attempt_told_redacted(client: TestClient[object]) -> None:
    # Nothing was committed to the client (gateway.upstream.commit): a plain 502 that says why, redacted.
    r = _chat(client, "precontent", stream=True)
    assert r.status_code == 502  # type: ignore[attr-defined]
    assert r.json()["error"]["message"] == "engine died on [address] at [path] using [redacted]"  # type: ignore[attr-defined]
    _no_secret(r)


def test_an_upstream_redirect_is_never_passed_on_nor_followed(client: TestClient[object]) -> None:
    """Measured before: a 302 whose body named an internal host and carried the provider key reached
    the client as a 302, verbatim (and was billed a tiktoken estimate of that body)."""
    r = _chat(client, "redirect")
    assert r.status_code == 502  # type: ignore[attr-defined]
    assert r.json()["error"]["code"] == "upstream_bad_response"  # type: ignore[attr-defined]
    assert "location" not in r.headers  # type: ignore[attr-defined]
    assert "gpu-node-7" not in r.text  # type: ignore[attr-defined]
    _no_secret(r)
    r = _chat(client, "redirect-then-good")
    assert r.status_code == 200  # type: ignore[attr-defined]
    assert r.headers["x-strait-deployment"] == "m-good@good"  # type: ignore[attr-defined]
