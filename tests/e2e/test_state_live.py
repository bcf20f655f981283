"""Limits, budgets and accounting through running gateways: one on in-process state, three replicas
sharing one real redis-server, Redis frozen under load, and the ledger checked against what the fake
upstream says it generated."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from gateway.policy.index import key_digest
from tests.e2e.conftest import Ledger
from tests.harness.gateway import gateway_process, replica_processes
from tests.harness.procs import ServerProcess
from tests.harness.redis_proc import RedisProc

ADMIN = "sk-admin-7788"
KEYS = {name: f"sk-{name}-key-0042" for name in ("limited", "metered", "broke", "thrifty", "other")}

POLICY = """
version: 1
server: {{admin_keys: ["{admin}"]}}
backends:
  - {{name: fake, adapter: openai, base_url: "{fake}/v1", tier: self-hosted, timeouts: {{read_s: 10}}}}
  - {{name: sim, adapter: simulated, tier: edge, simulated: {{ttft_ms: 0, tokens_per_second: 1000000, output_tokens: 3}}}}
models:
  - name: fake-model
    deployments: [{{backend: fake, upstream_model: fake-model, price: {{input_per_mtok: 2, output_per_mtok: 8}}}}]
  - name: sim-model
    deployments: [{{backend: sim, upstream_model: sim-1, price: {{input_per_mtok: 100, output_per_mtok: 1000}}}}]
  - name: cheap-model
    deployments: [{{backend: sim, upstream_model: sim-cheap}}]
routes:
  - {{name: limited, models: [sim-model]}}
  - {{name: metered, models: [fake-model]}}
  - {{name: pricey, models: [sim-model]}}
  - {{name: cheap, models: [cheap-model]}}
tenants:
  - name: limited
    keys: [{{id: l1, digest: "{limited}"}}]
    limits: {{tenant: {{requests_per_day: 100}}, per_key: {{requests_per_minute: 100000}}}}
  - name: metered
    keys: [{{id: m1, digest: "{metered}"}}]
  - name: broke
    keys: [{{id: b1, digest: "{broke}"}}]
    budgets: {{tenant: {{usd_per_day: 0.5}}}}
  - name: thrifty
    keys: [{{id: t1, digest: "{thrifty}"}}]
    budgets: {{tenant: {{usd_per_day: 0.5}}, on_exhausted: downgrade, downgrade_route: cheap}}
  - name: other
    keys: [{{id: o1, digest: "{other}"}}]
"""


def write_policy(path: Path, fake: str) -> Path:
    digests = {name: key_digest(k) for name, k in KEYS.items()}
    path.write_text(POLICY.format(fake=fake, admin=key_digest(ADMIN), **digests))
    return path


def auth(name: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[name]}"}


CHAT = {"model": "limited", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


async def burst(urls: list[str], n: int, tenant: str, body: dict[str, Any]) -> list[httpx.Response]:
    """`n` requests released together (round-robin over `urls`), one connection each."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        start = asyncio.Event()

        async def one(i: int) -> httpx.Response:
            await start.wait()
            return await client.post(urls[i % len(urls)] + "/v1/chat/completions", json=body, headers=auth(tenant))

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        await asyncio.sleep(0)  # let every task reach the gate
        start.set()
        return list(await asyncio.gather(*tasks))


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisProc]:
    with RedisProc() as server:
        yield server


@pytest.fixture(scope="module")
def memory_gateway(fake_upstream: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("mem-gw")
    policy = write_policy(folder / "policy.yaml", fake_upstream.base_url)
    env = {"STRAIT_SPOOL_DIR": str(folder / "spool")}
    with gateway_process(policy, log_path=folder / "gw.log", env=env) as gw:
        yield gw


@pytest.fixture(scope="module")
def replicas(
    fake_upstream: ServerProcess, redis_server: RedisProc, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[ServerProcess]]:
    folder = tmp_path_factory.mktemp("replicas")
    policy = write_policy(folder / "policy.yaml", fake_upstream.base_url)
    with replica_processes(policy, redis_server.url, 3, folder) as procs:
        yield procs


def _statuses(responses: list[httpx.Response]) -> dict[int, int]:
    out: dict[int, int] = {}
    for r in responses:
        out[r.status_code] = out.get(r.status_code, 0) + 1
    return out


def test_exact_admission_single_replica(memory_gateway: ServerProcess) -> None:
    responses = asyncio.run(burst([memory_gateway.base_url], 500, "limited", CHAT))
    assert _statuses(responses) == {200: 100, 429: 400}
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    ok = next(r for r in responses if r.status_code == 200)
    assert "x-ratelimit-limit-requests" in ok.headers and "x-ratelimit-reset-requests" in ok.headers


def test_exact_admission_across_three_replicas_sharing_redis(replicas: list[ServerProcess]) -> None:
    responses = asyncio.run(burst([p.base_url for p in replicas], 500, "limited", CHAT))
    assert _statuses(responses) == {200: 100, 429: 400}


def test_spent_budget_is_429_insufficient_quota_and_downgrade_moves_to_the_cheap_route(
    memory_gateway: ServerProcess,
) -> None:
    import openai

    body = {"model": "pricey", "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(memory_gateway.base_url + "/v1/chat/completions", json=body, headers=auth("broke"))
    assert r.status_code == 429
    error = r.json()["error"]
    assert error["code"] == "insufficient_quota" and error["type"] == "insufficient_quota"
    assert r.headers["x-should-retry"] == "false" and "retry-after" not in r.headers
    assert "tenant budget of 0.50 USD per day" in error["message"]
    # The official SDK raises RateLimitError at once: it does not retry a spent quota.
    sent: list[httpx.Request] = []
    http = httpx.Client(event_hooks={"request": [sent.append]})
    client = openai.OpenAI(
        base_url=memory_gateway.base_url + "/v1", api_key=KEYS["broke"], max_retries=3, http_client=http
    )
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(model="pricey", messages=[{"role": "user", "content": "hi"}])
    assert raised.value.code == "insufficient_quota"
    assert len(sent) == 1
    r = httpx.post(memory_gateway.base_url + "/v1/chat/completions", json=body, headers=auth("thrifty"))
    assert r.status_code == 200
    assert r.headers["x-strait-budget"] == "downgraded" and r.headers["x-strait-route"] == "cheap"


def _poll(predicate: Any, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)  # polling an observable condition, with a deadline
    return value


def _usage(gw: ServerProcess, tenant: str, by: str = "route") -> list[dict[str, Any]]:
    r = httpx.get(
        gw.base_url + "/admin/usage", params={"tenant": tenant, "by": by}, headers={"authorization": f"Bearer {ADMIN}"}
    )
    assert r.status_code == 200, r.text
    return r.json()["data"]  # type: ignore[no-any-return]


def _received_tokens(lines: list[str]) -> int:
    """Completion tokens in the content deltas a client received (cl100k vocabulary: one per word)."""
    from gateway.tokens import count_text

    text = ""
    for line in lines:
        if line.startswith("data: {"):
            for choice in json.loads(line[6:]).get("choices") or ():
                text += (choice.get("delta") or {}).get("content") or ""
    return count_text(text, "cl100k_base")


def _ledger_records(server: RedisProc, tenant: str) -> dict[str, dict[str, Any]]:
    """The gateway's final usage record of each request, read from the tenant's stream in Redis."""
    with redis.Redis(port=server.port) as c:
        entries = c.xrange(f"strait:{{t:{tenant}}}:ledger")
    records = (json.loads(fields[b"r"]) for _, fields in entries)
    return {r["request_id"]: r for r in records if r["final"]}


def test_ledger_matches_the_upstreams_own_record_after_chaos(
    replicas: list[ServerProcess], ledger: Ledger, redis_server: RedisProc
) -> None:
    """Per request: what the client received <= what the ledger charged <= what the upstream generated,
    equal for every complete answer. Holds whatever the timing: on a loaded machine an abandoned or
    reset stream may be cut anywhere, but never charged for less than was delivered, nor for more than
    the upstream sent."""
    gw = replicas[0].base_url
    url = gw + "/v1/chat/completions"
    start = ledger.records()[-1]["n"] if ledger.records() else 0
    msgs = [{"role": "user", "content": "count"}]
    fake = {"vocab": "cl100k"}
    # request id -> (kind, completion tokens the client received)
    sent: dict[str, tuple[str, int]] = {}
    for i in range(6):
        body = {"model": "metered", "messages": msgs, "fake": {**fake, "tokens": 7 + i}}
        r = httpx.post(url, json=body, headers=auth("metered"))
        assert r.status_code == 200
        sent[r.headers["x-strait-request-id"]] = ("complete", r.json()["usage"]["completion_tokens"])
    for i in range(4):  # complete streams; the client did not ask for usage, Strait did
        body = {"model": "metered", "messages": msgs, "stream": True, "fake": {**fake, "tokens": 11 + i}}
        r = httpx.post(url, json=body, headers=auth("metered"))
        assert "[DONE]" in r.text
        sent[r.headers["x-strait-request-id"]] = ("complete", _received_tokens(r.text.splitlines()))
    for _ in range(3):  # clients that leave mid-stream
        body = {
            "model": "metered",
            "messages": msgs,
            "stream": True,
            "fake": {**fake, "tokens": 300, "chunk_delay_ms": 15},
        }
        with httpx.stream("POST", url, json=body, headers=auth("metered")) as r:
            lines = r.iter_lines()
            read = [next(lines) for _ in range(6)]
            sent[r.headers["x-strait-request-id"]] = ("left", _received_tokens(read))
    for _ in range(2):  # upstream resets mid-stream
        body = {
            "model": "metered",
            "messages": msgs,
            "stream": True,
            "fake": {**fake, "tokens": 50, "fail_after_chunks": 3},
        }
        r = httpx.post(url, json=body, headers=auth("metered"))
        assert "[DONE]" not in r.text
        sent[r.headers["x-strait-request-id"]] = ("reset", _received_tokens(r.text.splitlines()))
    for _ in range(2):  # upstream errors: no tokens
        body = {"model": "metered", "messages": msgs, "fake": {"status": 500}}
        r = httpx.post(url, json=body, headers=auth("metered"))
        assert r.status_code == 500
        sent[r.headers["x-strait-request-id"]] = ("error", 0)
    made = len(sent)
    assert made == 17

    def settled() -> list[dict[str, Any]] | None:
        records = [r for r in ledger.records() if r["n"] > start]
        # Each 500 was retried once on the same deployment (the route's default retry policy).
        if len(records) != made + 2 or any(r["ended_at"] is None for r in records):
            return None
        rows = _usage(replicas[1], "metered")  # another replica reads the same shared ledger
        return rows if rows and rows[0]["requests"] == made else None

    rows = _poll(settled)
    assert rows, "the ledger never showed every request exactly once"
    upstream = {r["headers"]["x-request-id"]: r for r in ledger.records() if r["n"] > start}
    charged = _ledger_records(redis_server, "metered")
    assert set(upstream) == set(sent) and set(sent) <= set(charged)
    for rid, (kind, received) in sent.items():
        generated = upstream[rid]["completion_tokens_generated"]
        record = charged[rid]
        got = record["completion_tokens"]
        where = f"{kind} request {rid}: received {received}, charged {got}, generated {generated}"
        assert received <= got <= generated, where
        if kind == "complete":
            assert received == got == generated and not record["partial"], where
        elif kind in ("left", "reset"):
            assert record["partial"] and received > 0, where
        else:
            assert got == 0 and record["status"] == 500, where
    assert rows[0]["completion_tokens"] == sum(charged[rid]["completion_tokens"] for rid in sent)
    assert rows[0]["cost_usd"] > 0
    # Tenants never see each other's usage.
    other = httpx.get(gw + "/v1/usage", headers=auth("other")).json()["data"]
    assert other == []
    own = httpx.get(gw + "/v1/usage", headers=auth("metered")).json()["data"]
    assert own == rows
    assert httpx.get(gw + "/admin/usage", headers=auth("metered")).status_code == 401


@pytest.fixture(scope="module")
def tight_replica(
    fake_upstream: ServerProcess, redis_server: RedisProc, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A replica on the same Redis with a 100 ms bound on every state call."""
    folder = tmp_path_factory.mktemp("tight")
    policy = write_policy(folder / "policy.yaml", fake_upstream.base_url)
    env = {
        "STRAIT_STATE": redis_server.url,
        "STRAIT_REPLICAS": "3",
        "STRAIT_SPOOL_DIR": str(folder / "spool"),
        "STRAIT_STATE_TIMEOUT_MS": "100",
    }
    with gateway_process(policy, log_path=folder / "gw.log", env=env) as gw:
        yield gw


def test_frozen_redis_fails_open_within_the_timeout_and_recovers(
    replicas: list[ServerProcess], tight_replica: ServerProcess, redis_server: RedisProc
) -> None:
    gw = tight_replica
    url = gw.base_url + "/v1/chat/completions"
    body = {"model": "cheap", "messages": [{"role": "user", "content": "x"}]}
    limited = {**CHAT, "model": "limited"}
    redis_server.freeze()
    try:
        timings = []
        for _ in range(12):
            t0 = time.perf_counter()
            r = httpx.post(url, json=limited, headers=auth("limited"))
            timings.append(time.perf_counter() - t0)
            # Fail open: the daily limit (spent by the earlier test) is not enforced without Redis.
            assert r.status_code == 200, r.text
            assert "x-ratelimit-limit-requests" not in r.headers
        assert max(timings) < 1.0, timings
        metrics = httpx.get(gw.base_url + "/metrics").text
        assert "strait_limits_degraded_total" in metrics
        # Everything that needs no Redis still holds: auth and routing.
        assert httpx.post(url, json={**body, "model": "nope"}, headers=auth("metered")).status_code == 404
        assert httpx.post(url, json=body, headers={"authorization": "Bearer sk-wrong"}).status_code == 401
    finally:
        redis_server.thaw()
    recovered = _poll(lambda: httpx.post(url, json=limited, headers=auth("limited")).status_code == 429, timeout=20)
    assert recovered, "limits did not come back after Redis thawed"


def test_every_strait_key_in_redis_expires(replicas: list[ServerProcess], redis_server: RedisProc) -> None:
    with redis.Redis(port=redis_server.port) as c:
        keys = list(c.scan_iter("strait:*"))
        assert keys
        assert [k for k in keys if c.ttl(k) == -1] == []


def test_memory_state_refuses_several_workers(tmp_path: Path, fake_upstream: ServerProcess) -> None:
    import subprocess
    import sys

    policy = write_policy(tmp_path / "p.yaml", fake_upstream.base_url)
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--policy", str(policy), "--workers", "2", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "limits x workers" in out.stderr


def test_spooled_usage_survives_a_killed_replica_and_is_replayed_once(
    fake_upstream: ServerProcess, tmp_path: Path
) -> None:
    """Redis frozen -> records spool to disk -> the replica is SIGKILLed -> Redis back -> a replica
    restarted on the same spool directory replays them, each exactly once."""
    import signal

    server = RedisProc().start()
    policy = write_policy(tmp_path / "policy.yaml", fake_upstream.base_url)
    spool = tmp_path / "spool"
    env = {"STRAIT_STATE": server.url, "STRAIT_SPOOL_DIR": str(spool), "STRAIT_STATE_TIMEOUT_MS": "100"}
    try:
        first = gateway_process(policy, log_path=tmp_path / "first.log", env=env).start()
        server.freeze()
        body = {"model": "metered", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3}
        for _ in range(5):
            r = httpx.post(first.base_url + "/v1/chat/completions", json=body, headers=auth("metered"), timeout=30)
            assert r.status_code == 200

        def spooled_records() -> int:
            return sum(len(p.read_bytes().splitlines()) for p in spool.glob("spool-*.jsonl"))

        # Every record reaches the disk promptly once the ledger has failed once (none waits in memory).
        assert _poll(lambda: spooled_records() == 5, timeout=30), spooled_records()
        first.signal(signal.SIGKILL)
        first.stop()
        server.thaw()
        with gateway_process(policy, log_path=tmp_path / "second.log", env=env) as second:
            replayed = _poll(lambda: not list(spool.glob("spool-*.jsonl")), timeout=30)
            assert replayed, "the restarted replica did not replay the spool"
            rows = _usage(second, "metered")
            assert [r["requests"] for r in rows] == [5]
    finally:
        server.cleanup()


def test_strait_usage_cli_reads_the_ledger(memory_gateway: ServerProcess) -> None:
    import json
    import subprocess
    import sys

    body = {"model": "cheap", "messages": [{"role": "user", "content": "x"}]}
    assert (
        httpx.post(memory_gateway.base_url + "/v1/chat/completions", json=body, headers=auth("other")).status_code
        == 200
    )

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "gateway", "usage", "--url", memory_gateway.base_url, *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)

    def counted() -> bool:
        out = cli("--key", ADMIN, "--tenant", "other", "--format", "json")
        return out.returncode == 0 and any(r["value"] == "cheap" for r in json.loads(out.stdout)["data"])

    assert _poll(counted), "the request never showed up in `strait usage`"
    table = cli("--key", ADMIN, "--admin", "--by", "model")
    assert table.returncode == 0 and "cheap-model" in table.stdout
    csv_out = cli("--key", KEYS["other"], "--format", "csv")
    assert csv_out.stdout.splitlines()[0] == (
        "tenant,route,requests,prompt_tokens,cached_tokens,cache_write_tokens,completion_tokens,reasoning_tokens,cost_usd"
    )
    assert all(line.startswith("other,") for line in csv_out.stdout.splitlines()[1:])
    refused = cli("--key", KEYS["other"], "--admin")
    assert refused.returncode == 1 and "401" in refused.stderr
