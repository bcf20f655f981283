"""Load shedding against a real gateway process: requests the fake upstream holds (`hang`: it reads them
and never answers) fill the replica's cap; then a batch request is refused at once with 503 and
`Retry-After` while interactive requests still get through, up to the cap. Synchronised on the fake
having received the held requests (its ledger), never on sleeps."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.policy.index import key_digest
from tests.harness.fake_control import FakeControl, parse_prometheus
from tests.harness.gateway import gateway_process
from tests.harness.procs import ServerProcess

KEY = "sk-tenant-shedding-5c1d"
CAP = 5  # interactive may have 5 in flight; batch 3 (0.6 x 5)
BATCH_CAP = 3
HELD = {"model": "chat", "messages": [{"role": "user", "content": "hold me"}], "fake": {"hang": True}}
QUICK = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "fake": {"tokens": 3}}


def _policy(fake_url: str) -> str:
    return f"""
version: 1
server:
  shedding: {{max_in_flight: {CAP}, batch_share: 0.6, retry_after_s: 2}}
backends:
  - {{name: fake, adapter: openai, base_url: "{fake_url}/v1", api_key: "env:SHED_BACKEND_KEY", tier: self-hosted}}
models:
  - {{name: m, deployments: [{{backend: fake, upstream_model: fake-model}}]}}
routes:
  - {{name: chat, models: [m]}}
tenants:
  - name: t
    keys: [{{id: t-1, digest: "{key_digest(KEY)}"}}]
"""


@pytest.fixture()
def gateway(fake_upstream: ServerProcess, tmp_path: Path) -> Iterator[ServerProcess]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(_policy(fake_upstream.base_url))
    # A short grace period: stopping the gateway cuts the held requests at once.
    env = {"SHED_BACKEND_KEY": "sk-x-0000", "STRAIT_SHUTDOWN_GRACE_S": "0.2"}
    with gateway_process(policy, log_path=tmp_path / "gateway.log", env=env) as proc:
        yield proc


def _headers(priority: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEY}", "x-strait-priority": priority}


def test_batch_is_shed_fast_while_interactive_gets_through_up_to_the_cap(
    gateway: ServerProcess, fake_upstream: ServerProcess
) -> None:
    url = gateway.base_url + "/v1/chat/completions"
    fake = FakeControl(fake_upstream.base_url)
    start = max((r["n"] for r in fake.ledger()), default=0)

    def held_upstream() -> list[dict[str, Any]]:
        return [r for r in fake.ledger(since=start) if "hang" in r["faults"] and r["ended_at"] is None]

    def wait_held(n: int) -> None:
        fake.wait_records(lambda _: len(held_upstream()) == n, timeout=20)

    pool = ThreadPoolExecutor(max_workers=CAP)
    held: list[Future[httpx.Response]] = []

    def hold(priority: str) -> None:
        held.append(pool.submit(httpx.post, url, json=HELD, headers=_headers(priority), timeout=60))

    # The client bound below is the test of "fast": a request that queued would wait on an upstream that
    # never answers until that 10 s ran out, not come back with a 503.
    client = httpx.Client(timeout=10)
    try:
        for _ in range(BATCH_CAP):
            hold("batch")
        wait_held(BATCH_CAP)

        # At batch's cap: batch is refused at once, and it never reaches the upstream.
        r = client.post(url, json=QUICK, headers=_headers("batch"))
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "2"
        assert r.json()["error"]["code"] == "overloaded"
        # Interactive still gets answers...
        r = client.post(url, json=QUICK, headers=_headers("interactive"))
        assert r.status_code == 200, r.text
        # ...and may fill the rest of the cap.
        hold("interactive")
        wait_held(BATCH_CAP + 1)
        hold("interactive")
        wait_held(CAP)
        r = client.post(url, json=QUICK, headers=_headers("interactive"))
        assert r.status_code == 503 and r.headers["retry-after"] == "2"
        assert client.post(url, json=QUICK, headers=_headers("batch")).status_code == 503
        # The refused requests never reached the upstream: only the held ones and the one answered.
        assert len([r for r in fake.ledger(since=start) if r["path"] == "/v1/chat/completions"]) == CAP + 1

        # Health and metrics are never shed.
        assert client.get(gateway.base_url + "/readyz").status_code == 200
        assert client.get(gateway.base_url + "/healthz").status_code == 200
        metrics = client.get(gateway.base_url + "/metrics").text
        values = parse_prometheus(metrics)
        assert values["strait_in_flight_requests"] == CAP
        assert 'strait_shed_total{priority="batch"} 2.0' in metrics
        assert 'strait_shed_total{priority="interactive"} 1.0' in metrics
        assert not any(f.done() for f in held)  # the held requests were still held throughout
    finally:
        client.close()
        gateway.stop()  # cuts the held requests (grace 0.2 s): each client gets its answer, a 503
        outcomes = [f.result(timeout=30) for f in held]
        pool.shutdown()
        fake.close()
    assert [(r.status_code, r.json()["error"]["code"]) for r in outcomes] == [(503, "shutting_down")] * CAP
