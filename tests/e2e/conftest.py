"""End-to-end fixtures: a fake OpenAI upstream and Strait, each a real server process on loopback."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.policy.index import key_digest
from tests.harness.gateway import gateway_process
from tests.harness.procs import ServerProcess, free_port

ALPHA_KEY = "sk-alpha-canary-7f3c1e9d2b"  # a canary: it must never reach an upstream or a log
BETA_KEY = "sk-beta-canary-51aa0c"
BACKEND_SECRET = "upstream-secret-4242"
MAX_BODY = 64 * 1024


@pytest.fixture(scope="session")
def fake_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    port = free_port()
    log = tmp_path_factory.mktemp("fake") / "fake.log"
    argv = [sys.executable, "-m", "tests.harness.fake_upstream", "--port", str(port)]
    with ServerProcess(argv, port, ready_path="/healthz", log_path=log) as proc:
        yield proc


def e2e_policy(fake_url: str, dead_port: int) -> str:
    return f"""
version: 1
server: {{max_body_bytes: {MAX_BODY}}}
backends:
  - {{name: fake, adapter: openai, base_url: "{fake_url}/v1", api_key: "env:FAKE_BACKEND_KEY", tier: self-hosted}}
  - name: dead
    adapter: openai
    base_url: "http://127.0.0.1:{dead_port}/v1"
    tier: edge
    timeouts: {{connect_s: 1, read_s: 5}}
  - {{name: sim, adapter: simulated, tier: edge, simulated: {{ttft_ms: 1, tokens_per_second: 5000, output_tokens: 12}}}}
models:
  - name: fake-model
    capabilities: [chat, completions, tools, json, vision]
    deployments: [{{backend: fake, upstream_model: fake-model}}]
  - name: dead-model
    deployments: [{{backend: dead, upstream_model: whatever}}]
  - name: fake-embed
    capabilities: [embeddings]
    deployments: [{{backend: fake, upstream_model: text-embedding-3-small}}]
  - name: fake-embed-cl100k
    capabilities: [embeddings]
    tokenizer: cl100k_base
    deployments: [{{backend: fake, upstream_model: text-embedding-3-large}}]
  - name: sim-model
    capabilities: [chat, completions, tools, json, embeddings]
    deployments: [{{backend: sim, upstream_model: sim-1}}]
routes:
  - {{name: gpt-fake, models: [fake-model]}}
  - {{name: fallback-chat, models: [dead-model, fake-model]}}
  - {{name: embed, models: [fake-embed]}}
  - {{name: embed-cl100k, models: [fake-embed-cl100k]}}
  - {{name: sim-chat, models: [sim-model]}}
tenants:
  - name: alpha
    keys: [{{id: alpha-1, digest: "{key_digest(ALPHA_KEY)}"}}]
  - name: beta
    keys: [{{id: beta-1, digest: "{key_digest(BETA_KEY)}"}}]
    allowed_routes: [sim-chat]
"""


@pytest.fixture(scope="session")
def gateway(fake_upstream: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("gw")
    policy = folder / "policy.yaml"
    policy.write_text(e2e_policy(fake_upstream.base_url, free_port()))
    proc = gateway_process(policy, log_path=folder / "gateway.log", env={"FAKE_BACKEND_KEY": BACKEND_SECRET})
    with proc:
        yield proc
    log = Path(folder / "gateway.log").read_text(errors="replace")
    assert ALPHA_KEY not in log and BACKEND_SECRET not in log, "a secret reached the gateway log"


@pytest.fixture()
def client(gateway: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url + "/v1", api_key=ALPHA_KEY, max_retries=0, timeout=30)


@pytest.fixture()
def direct(fake_upstream: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake_upstream.base_url + "/v1", api_key="direct", max_retries=0, timeout=30)


class Ledger:
    """The fake upstream's record of every request it received."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    def records(self) -> list[dict[str, Any]]:
        return httpx.get(self.base_url + "/_ledger", timeout=5).json()  # type: ignore[no-any-return]

    def count(self) -> int:
        return len(self.records())


@pytest.fixture()
def ledger(fake_upstream: ServerProcess) -> Ledger:
    return Ledger(fake_upstream.base_url)
