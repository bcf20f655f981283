"""The /v1/messages edge in process (create_app): a failure that is nobody's fault but the gateway's is
Anthropic's 500 `api_error` envelope with `request-id`, never a traceback, and never OpenAI's envelope."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from litestar.testing import TestClient

from gateway.app import create_app
from gateway.contracts import UpstreamCall, UpstreamResponse
from gateway.policy.model import Backend
from gateway.settings import Settings

POLICY = """
version: 1
backends:
  - {name: b, adapter: boom, base_url: "http://127.0.0.1:9/v1"}
models:
  - {name: m, deployments: [{backend: b, upstream_model: m-up}]}
routes:
  - {name: chat, models: [m]}
"""


class BoomAdapter:
    """An adapter with a bug: every call raises what no stage expects."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    async def send(self, call: UpstreamCall) -> UpstreamResponse:
        raise RuntimeError("a bug in an adapter")

    async def aclose(self) -> None:
        return None


def test_an_unexpected_failure_is_an_api_error_in_anthropics_envelope(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    app = create_app(
        Settings(policy_path=str(policy), spool_dir=str(tmp_path / "spool"), access_log="off"),
        factories={"boom": BoomAdapter},
    )
    body: dict[str, Any] = {"model": "chat", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post("/v1/messages", json=body)
        chat = client.post("/v1/chat/completions", json={**body, "messages": body["messages"]})
    assert response.status_code == 500
    payload = response.json()
    assert payload["type"] == "error" and payload["error"]["type"] == "api_error"
    assert payload["request_id"] == response.headers["request-id"]
    assert "a bug in an adapter" not in response.text
    # The OpenAI route keeps its own envelope for the same failure.
    assert chat.status_code == 500 and chat.json()["error"]["type"] == "server_error"
