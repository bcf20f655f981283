"""The upstream stage's signals tap, in process (create_app, the simulated adapter): a completed stream feeds its
deployment's EWMAs of time to first token and output tokens per second, which explain's table then shows."""

from __future__ import annotations

import time
from pathlib import Path

from litestar.testing import TestClient

from gateway.app import create_app
from gateway.policy.index import key_digest
from gateway.settings import Settings

KEY = "sk-signals-tap-0001"
POLICY = f"""
version: 1
backends:
  - {{name: sim, adapter: simulated, simulated: {{ttft_ms: 40, tokens_per_second: 2000, output_tokens: 40}}}}
models:
  - {{name: m, deployments: [{{backend: sim, upstream_model: sim-1}}]}}
routes:
  - {{name: chat, models: [m], objective: latency}}
tenants:
  - name: acme
    explain: true
    keys: [{{id: k1, digest: "{key_digest(KEY)}"}}]
"""


def test_a_completed_stream_feeds_ttft_and_throughput(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    app = create_app(Settings(policy_path=str(policy), spool_dir=str(tmp_path / "spool")))
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with TestClient(app) as c:
        c.headers["authorization"] = f"Bearer {KEY}"
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and "[DONE]" in r.text
        signals = app.state["gateway"].signals
        deadline = time.monotonic() + 5
        while "m@sim" not in signals.tokens_per_s:
            assert time.monotonic() < deadline, "the tap never recorded the stream"
            time.sleep(0.01)
        # The simulated engine waits 40 ms before its first token: never measured below that.
        assert signals.ttft_ms["m@sim"] >= 40.0
        assert signals.tokens_per_s["m@sim"] > 0
        # The next decision ranks with it, and explain's table shows it.
        r = c.post("/v1/chat/completions", json={**body, "stream": False}, headers={"x-strait-explain": "1"})
        decision = r.headers["x-strait-decision"]
        row = c.get(f"/admin/decisions/{decision}").json()["rows"][0]
        assert row["ttft_ms"] == round(signals.ttft_ms["m@sim"], 3)
        assert row["latency_ms"] == row["ttft_ms"]
        assert row["tokens_per_s"] > 0
