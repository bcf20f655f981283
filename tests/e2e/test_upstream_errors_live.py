"""Upstream errors through a real `strait serve`, with the official openai SDK, in front of the fake upstream:
an upstream refusing the gateway's key (and echoing it) is the gateway's problem, internal hosts and paths
are redacted, and the provider account's x-ratelimit-* never reach a tenant."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.policy.index import key_digest
from tests.e2e.conftest import Ledger
from tests.harness.gateway import gateway_process
from tests.harness.procs import ServerProcess

TENANT_KEY = "sk-tenant-upstream-errors-5d2c"
# Both provider keys are canaries: neither may reach a client or the gateway log.
REVOKED_KEY = "sk-bad-revoked-provider-7c1d93"
GOOD_KEY = "sk-good-provider-3e9a55b1"
DENY = {"deny_key_prefix": "sk-bad"}  # the fake answers 401, echoing the key, to keys starting with this
USER = [{"role": "user", "content": "Say hello"}]
INTERNAL = "CUDA OOM on gpu-node-7.corp.internal:8000 (/opt/vllm/engine.py:812)"
TENANT_RPM, TENANT_TPM = 100000, 9000000


def _policy(fake_url: str) -> str:
    return f"""
version: 1
backends:
  - {{name: revoked, adapter: openai, base_url: "{fake_url}/v1", api_key: "env:REVOKED_PROVIDER_KEY"}}
  - {{name: good, adapter: openai, base_url: "{fake_url}/v1", api_key: "env:GOOD_PROVIDER_KEY"}}
models:
  - {{name: m-revoked, deployments: [{{backend: revoked, upstream_model: fake-model}}]}}
  - {{name: m-good, deployments: [{{backend: good, upstream_model: fake-model}}]}}
routes:
  - {{name: only-revoked, models: [m-revoked]}}
  - {{name: revoked-then-good, objective: ordered, models: [m-revoked, m-good]}}
  - {{name: good, models: [m-good]}}
tenants:
  - name: t
    keys: [{{id: t-1, digest: "{key_digest(TENANT_KEY)}"}}]
    limits: {{tenant: {{requests_per_minute: {TENANT_RPM}, tokens_per_minute: {TENANT_TPM}}}}}
"""


@pytest.fixture(scope="module")
def gw(fake_upstream: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    folder = tmp_path_factory.mktemp("gw-errors")
    policy = folder / "policy.yaml"
    policy.write_text(_policy(fake_upstream.base_url))
    log = folder / "gateway.log"
    env = {"REVOKED_PROVIDER_KEY": REVOKED_KEY, "GOOD_PROVIDER_KEY": GOOD_KEY}
    with gateway_process(policy, log_path=log, env=env) as proc:
        yield proc, log
    text = log.read_text(errors="replace")
    assert REVOKED_KEY not in text and GOOD_KEY not in text and TENANT_KEY not in text, "a secret reached the log"


@pytest.fixture()
def sdk(gw: tuple[ServerProcess, Path]) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=gw[0].base_url + "/v1", api_key=TENANT_KEY, max_retries=0, timeout=30)
    yield client
    client.close()


def _leaks(response: httpx.Response) -> bool:
    seen = response.text + json.dumps(dict(response.headers))
    return REVOKED_KEY in seen or GOOD_KEY in seen


def _poll(check: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    return check()


def test_upstream_401_echoing_the_provider_key_is_a_502_without_the_key(
    sdk: openai.OpenAI, gw: tuple[ServerProcess, Path], ledger: Ledger
) -> None:
    start = ledger.count()
    with pytest.raises(openai.InternalServerError) as caught:
        sdk.chat.completions.create(model="only-revoked", messages=USER, extra_body={"fake": DENY})
    response = caught.value.response
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "upstream_auth_failed" and error["type"] == "server_error"
    assert not _leaks(response)
    # The fake did refuse (and echo) the gateway's key: the test is not vacuous.
    seen = [r for r in ledger.records() if r["n"] > start]
    assert [r["status"] for r in seen] == [401]
    assert seen[0]["headers"]["authorization"] == f"Bearer {REVOKED_KEY}"
    # Operators hear of it: a metric and a WARNING naming the backend (never the key).
    metrics = httpx.get(gw[0].base_url + "/metrics", timeout=5).text
    assert 'strait_upstream_auth_failures_total{backend="revoked"}' in metrics
    log = gw[1]
    assert _poll(lambda: "upstream revoked refused the gateway's credentials" in log.read_text(errors="replace"))


def test_with_two_deployments_the_second_answers(sdk: openai.OpenAI, ledger: Ledger) -> None:
    start = ledger.count()
    raw = sdk.chat.completions.with_raw_response.create(
        model="revoked-then-good", messages=USER, max_tokens=5, extra_body={"fake": DENY}
    )
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert raw.headers["x-strait-deployment"] == "m-good@good"
    seen = [r for r in ledger.records() if r["n"] > start]
    assert [(r["headers"]["authorization"], r["status"]) for r in seen] == [
        (f"Bearer {REVOKED_KEY}", 401),
        (f"Bearer {GOOD_KEY}", 200),
    ]
    assert REVOKED_KEY not in raw.http_response.text


def test_a_500_naming_internal_hosts_and_paths_is_redacted(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        sdk.chat.completions.create(
            model="good", messages=USER, extra_body={"fake": {"status": 500, "error_message": INTERNAL}}
        )
    response = caught.value.response
    assert response.status_code == 500
    assert response.json()["error"]["message"] == "CUDA OOM on [host] ([path])"
    assert response.json()["error"]["type"] == "server_error"


def test_a_mid_stream_error_naming_internal_hosts_is_redacted(sdk: openai.OpenAI) -> None:
    fake = {"midstream_error": 1, "error_message": f"{INTERNAL} key={GOOD_KEY}"}
    stream = sdk.chat.completions.create(model="good", messages=USER, stream=True, extra_body={"fake": fake})
    with pytest.raises(openai.APIError) as caught:
        for _ in stream:
            pass
    assert str(caught.value.message) == "CUDA OOM on [host] ([path]) key=[redacted]"


def test_upstream_rate_limit_headers_never_reach_the_client(sdk: openai.OpenAI) -> None:
    """The fake sends its account's x-ratelimit-* (limit 60 requests, 150000 tokens); the client sees only
    its tenant's own, from Strait's limits stage."""
    fake = {"ratelimit_headers": True}
    ok = sdk.chat.completions.with_raw_response.create(model="good", messages=USER, extra_body={"fake": fake})
    with sdk.chat.completions.with_streaming_response.create(
        model="good", messages=USER, stream=True, extra_body={"fake": fake}
    ) as streamed:
        streamed.read()
    with pytest.raises(openai.RateLimitError) as caught:
        sdk.chat.completions.create(model="good", messages=USER, extra_body={"fake": {"status": 429}})
    for headers in (ok.headers, streamed.headers, caught.value.response.headers):
        assert headers["x-ratelimit-limit-requests"] == str(TENANT_RPM)
        assert headers["x-ratelimit-limit-tokens"] == str(TENANT_TPM)
    assert caught.value.response.headers["retry-after"] == "1"
