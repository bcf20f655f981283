"""Provider evidence through a running gateway: the fake Anthropic upstream reports where inference ran
(`usage.inference_geo`, as Anthropic does); a report outside the backend's declared jurisdiction is counted
in strait_compliance_evidence_mismatch_total{deployment}, one inside it is not."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import anthropic
import httpx
import pytest

from gateway.policy.index import key_digest
from tests.harness.gateway import gateway_process
from tests.harness.procs import ServerProcess, free_port

CLIENT_KEY = "sk-evidence-client-0001"
BACKEND_KEY = "anthropic-backend-secret-5e1d"
METRIC = 'strait_compliance_evidence_mismatch_total{deployment="claude@claude-us"}'


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("evidence")
    port = free_port()
    argv = [sys.executable, "-m", "tests.harness.fake_anthropic", "--port", str(port), "--key", BACKEND_KEY]
    with ServerProcess(argv, port, ready_path="/healthz", log_path=folder / "fake.log") as fake:
        (folder / "policy.yaml").write_text(
            f"""
version: 1
operators: [{{name: Anthropic, headquarters: US}}]
backends:
  - {{name: claude-us, adapter: anthropic, base_url: "{fake.base_url}/v1", api_key: "env:ANTHROPIC_BACKEND_KEY",
     hosting: {{operator: Anthropic, jurisdiction: US}}}}
models:
  - {{name: claude, deployments: [{{backend: claude-us, upstream_model: claude-fake, price: {{free: true}}}}]}}
routes:
  - {{name: claude, models: [claude]}}
tenants:
  - {{name: acme, keys: [{{id: acme-1, digest: "{key_digest(CLIENT_KEY)}"}}]}}
"""
        )
        env = {"ANTHROPIC_BACKEND_KEY": BACKEND_KEY, "STRAIT_SPOOL_DIR": str(folder / "spool")}
        with gateway_process(folder / "policy.yaml", log_path=folder / "gateway.log", env=env) as proc:
            yield proc


def _mismatches(gw: ServerProcess) -> float:
    text = httpx.get(gw.base_url + "/metrics", timeout=10).text
    line = next((x for x in text.splitlines() if x.startswith(METRIC)), None)
    return float(line.split()[-1]) if line else 0.0


def test_a_provider_report_outside_the_declared_jurisdiction_is_counted(gw: ServerProcess) -> None:
    client = anthropic.Anthropic(base_url=gw.base_url, api_key=CLIENT_KEY, max_retries=0, timeout=30)
    ask: dict[str, object] = {"model": "claude", "max_tokens": 32, "messages": [{"role": "user", "content": "hi"}]}
    inside = client.messages.create(**ask, extra_body={"inference_geo": "us"})  # type: ignore[arg-type]
    assert inside.usage.model_dump().get("inference_geo") == "us"
    assert _mismatches(gw) == 0
    outside = client.messages.create(**ask, extra_body={"inference_geo": "global"})  # type: ignore[arg-type]
    assert outside.usage.model_dump().get("inference_geo") == "global"
    assert _mismatches(gw) == 1
