"""Identity: the gateway mints the ids that key its records, so a client-chosen `x-request-id` defeats
nothing. Each attack measured before the fix, on in-process state and on two replicas sharing Redis:

- 8 parallel streams sharing one `x-request-id` against `max_concurrency: 2` -> 8 were admitted;
- 10 requests with one id -> the ledger counted 1;
- a 2,000-token budget let 12,280 tokens through in bursts sharing an id;
- in the in-process ledger, tenant A's id X made tenant B's request with id X count 0.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.policy.index import key_digest
from tests.harness.gateway import gateway_process, replica_processes
from tests.harness.procs import ServerProcess
from tests.harness.redis_proc import RedisProc

ADMIN = "sk-admin-identity-31"
KEYS = {name: f"sk-{name}-identity-0042" for name in ("conc", "ledger", "budget", "ta", "tb", "roomy")}
SHARED_ID = "the-same-id-every-time"

POLICY = """
version: 1
server: {{admin_keys: ["{admin}"]}}
backends:
  - {{name: fake, adapter: openai, base_url: "{fake}/v1", tier: self-hosted, timeouts: {{read_s: 30}}}}
models:
  - name: fake-model
    deployments: [{{backend: fake, upstream_model: fake-model, price: {{input_per_mtok: 1, output_per_mtok: 1}}}}]
routes:
  - {{name: chat, models: [fake-model]}}
tenants:
  - name: conc
    keys: [{{id: c1, digest: "{conc}"}}]
    limits: {{tenant: {{max_concurrency: 2}}}}
  - name: ledger
    keys: [{{id: l1, digest: "{ledger}"}}]
  - name: budget
    keys: [{{id: b1, digest: "{budget}"}}]
    budgets: {{tenant: {{tokens_per_month: 2000}}}}
  - name: ta
    keys: [{{id: a1, digest: "{ta}"}}]
  - name: tb
    keys: [{{id: b1, digest: "{tb}"}}]
  - name: roomy
    keys: [{{id: r1, digest: "{roomy}"}}]
    budgets: {{tenant: {{tokens_per_month: 2000}}}}
"""


def _policy(path: Path, fake: str) -> Path:
    digests = {name: key_digest(k) for name, k in KEYS.items()}
    path.write_text(POLICY.format(fake=fake, admin=key_digest(ADMIN), **digests))
    return path


def _headers(tenant: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[tenant]}", "x-request-id": SHARED_ID}


@pytest.fixture(scope="module", params=["memory", "redis-2-replicas"])
def gateways(
    request: pytest.FixtureRequest, fake_upstream: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[ServerProcess]]:
    folder = tmp_path_factory.mktemp(f"identity-{request.param}")
    policy = _policy(folder / "policy.yaml", fake_upstream.base_url)
    if request.param == "memory":
        with gateway_process(policy, log_path=folder / "gw.log", env={"STRAIT_SPOOL_DIR": str(folder / "s")}) as gw:
            yield [gw]
        return
    with RedisProc() as server, replica_processes(policy, server.url, 2, folder) as procs:
        yield procs


def _usage(gw: ServerProcess, tenant: str) -> list[dict[str, Any]]:
    r = httpx.get(gw.base_url + "/admin/usage", params={"tenant": tenant}, headers={"authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200, r.text
    return r.json()["data"]  # type: ignore[no-any-return]


def _poll_usage(gw: ServerProcess, tenant: str, requests: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    rows = _usage(gw, tenant)
    while not (rows and rows[0]["requests"] >= requests) and time.monotonic() < deadline:
        time.sleep(0.05)  # polling an observable condition (the ledger writer is asynchronous), with a deadline
        rows = _usage(gw, tenant)
    return rows


def _chat(tokens: int, **extra: Any) -> dict[str, Any]:
    return {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "fake": {"tokens": tokens}, **extra}


def test_streams_sharing_a_client_id_do_not_share_a_concurrency_slot(gateways: list[ServerProcess]) -> None:
    # Long streams (~10 s) that this test holds open until every status is known, so the two admitted
    # ones are provably still in flight when the other six ask, however loaded the machine.
    body = {**_chat(400), "stream": True, "fake": {"tokens": 400, "chunk_delay_ms": 25}}

    async def attack() -> list[int]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_keepalive_connections=0)) as client:
            requests = [
                client.build_request(
                    "POST",
                    gateways[i % 2 % len(gateways)].base_url + "/v1/chat/completions",
                    json=body,
                    headers=_headers("conc"),
                )
                for i in range(8)
            ]
            responses = await asyncio.gather(*(client.send(r, stream=True) for r in requests))
            try:
                assert all(r.headers["x-request-id"] == SHARED_ID for r in responses)  # echoed, for correlation
                return [r.status_code for r in responses]
            finally:
                for r in responses:
                    await r.aclose()

    statuses = asyncio.run(attack())
    assert sorted(statuses) == [200, 200] + [429] * 6


def test_requests_sharing_a_client_id_are_each_recorded(gateways: list[ServerProcess]) -> None:
    minted = set()
    for i in range(10):
        r = httpx.post(
            gateways[i % len(gateways)].base_url + "/v1/chat/completions", json=_chat(5), headers=_headers("ledger")
        )
        assert r.status_code == 200, r.text
        assert r.headers["x-request-id"] == SHARED_ID
        minted.add(r.headers["x-strait-request-id"])
    assert len(minted) == 10 and SHARED_ID not in minted
    rows = _poll_usage(gateways[-1], "ledger", 10)
    assert [row["requests"] for row in rows] == [10]


def test_a_token_budget_holds_against_bursts_sharing_a_client_id(gateways: list[ServerProcess]) -> None:
    async def burst(n: int) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            return list(
                await asyncio.gather(
                    *(
                        client.post(
                            gateways[i % len(gateways)].base_url + "/v1/chat/completions",
                            json=_chat(90, max_tokens=100),
                            headers=_headers("budget"),
                        )
                        for i in range(n)
                    )
                )
            )

    admitted = 0
    for _ in range(4):  # 4 bursts of 20, each request reserving ~110 tokens of a 2,000-token budget
        responses = asyncio.run(burst(20))
        admitted += sum(1 for r in responses if r.status_code == 200)
        refused = [r for r in responses if r.status_code != 200]
        assert all(r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota" for r in refused)
    assert 1 <= admitted < 80
    rows = _poll_usage(gateways[0], "budget", admitted)
    assert rows[0]["requests"] == admitted
    assert rows[0]["prompt_tokens"] + rows[0]["completion_tokens"] <= 2000


def test_one_tenants_client_id_does_not_hide_another_tenants_request(gateways: list[ServerProcess]) -> None:
    for tenant in ("ta", "tb"):
        r = httpx.post(gateways[0].base_url + "/v1/chat/completions", json=_chat(5), headers=_headers(tenant))
        assert r.status_code == 200, r.text
    assert [row["requests"] for row in _poll_usage(gateways[0], "ta", 1)] == [1]
    assert [row["requests"] for row in _poll_usage(gateways[0], "tb", 1)] == [1]


def test_a_sequential_client_is_never_refused_for_concurrency(gateways: list[ServerProcess]) -> None:
    """Measured before: strictly one request at a time against `max_concurrency: 2` got 34 x 429 out
    of 40, because slots were released ~10 ms after the response (batched reconciles)."""
    statuses = []
    with httpx.Client(timeout=60) as client:  # keep-alive: the next request follows at once
        for i in range(40):
            url = gateways[i % len(gateways)].base_url + "/v1/chat/completions"
            body = {**_chat(3), "stream": i % 2 == 1}
            r = client.post(url, json=body, headers={"authorization": f"Bearer {KEYS['conc']}"})
            statuses.append(r.status_code)
    assert statuses == [200] * 40


def test_a_request_larger_than_what_is_left_of_a_budget_says_so_and_best_of_counts(
    gateways: list[ServerProcess],
) -> None:
    url = gateways[0].base_url + "/v1/chat/completions"
    auth = {"authorization": f"Bearer {KEYS['roomy']}"}
    # best_of generates 20 choices of up to 100 tokens: more than the whole 2,000-token budget.
    r = httpx.post(url, json=_chat(5, max_tokens=100, best_of=20), headers=auth)
    assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"
    message = r.json()["error"]["message"]
    assert "could cost more than your budget has left" in message and "2000 tokens left" in message
    assert "exhausted" not in message
    r = httpx.post(url, json=_chat(5, max_tokens=100), headers=auth)
    assert r.status_code == 200, r.text
