"""A remote embedder that is one of Strait's own routes: the semantic tier embeds through the gateway's own
`/v1/embeddings` (a real server process calling itself with a tenant key from the environment), so the
embedding traffic is routed, limited and accounted like any client's."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from gateway.policy.index import key_digest
from tests.harness.gateway import gateway_process
from tests.harness.procs import free_port

KEY = "sk-own-route-embedder-01"


def test_the_semantic_tier_can_embed_through_one_of_strait_s_own_routes(tmp_path: Path) -> None:
    folder = tmp_path
    port = free_port()
    policy = folder / "policy.yaml"
    policy.write_text(
        f"""
version: 1
cache:
  embedders:
    - {{name: self, kind: remote, base_url: "http://127.0.0.1:{port}/v1", model: embed, api_key: "env:SELF_KEY", threshold: 0.99}}
backends:
  - {{name: sim, adapter: simulated, simulated: {{ttft_ms: 0, tokens_per_second: 100000, output_tokens: 5, embedding_dims: 32}}}}
models:
  - {{name: m, deployments: [{{backend: sim, upstream_model: sim-chat}}]}}
  - {{name: e, capabilities: [embeddings], deployments: [{{backend: sim, upstream_model: sim-embed}}]}}
routes:
  - {{name: chat, models: [m]}}
  - {{name: embed, models: [e]}}
tenants:
  - name: t
    keys: [{{id: k, digest: "{key_digest(KEY)}"}}]
    cache: {{semantic: true, embedder: self}}
"""
    )
    env = {"SELF_KEY": KEY, "STRAIT_SPOOL_DIR": str(folder / "spool")}
    with gateway_process(policy, port=port, log_path=folder / "gw.log", env=env) as gw:
        headers = {"authorization": f"Bearer {KEY}"}
        body = {"model": "chat", "temperature": 0, "messages": [{"role": "user", "content": "Is it raining?"}]}
        first = httpx.post(gw.base_url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert first.status_code == 200 and first.headers["x-strait-cache"] == "miss"
        again = httpx.post(gw.base_url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
        # The exact tier is off for this tenant: only the embedding (the same text, the same vector) matched.
        assert again.headers["x-strait-cache"] == "semantic-hit"
        assert float(again.headers["x-strait-cache-similarity"]) >= 0.999
        assert again.json()["choices"] == first.json()["choices"]
        # Both lookups embedded through the tenant's own `embed` route, accounted to it (usage records are
        # written in the background: polled, with a deadline).
        deadline = time.monotonic() + 15
        embedded = 0
        while embedded < 2 and time.monotonic() < deadline:
            usage = httpx.get(gw.base_url + "/v1/usage?by=route", headers=headers, timeout=10)
            embedded = {row["value"]: row["requests"] for row in usage.json()["data"]}.get("embed", 0)
            if embedded < 2:
                time.sleep(0.05)  # polling an observable condition, with a deadline
        assert embedded >= 2
