"""Brown-out: half of the primary's attempts fail (the fake's `fault:503-ratio-0.5`, exactly every other
attempt), a healthy fallback stands by. Through a real `strait serve`, 50 requests, 5 at a time: the retry
budget bounds what the brown-out costs the upstreams (attempts <= 1.2 x requests + 3, counted in the fake's
ledger) while the client still gets most answers. Prints the figures (run with `-s` to see them):

    .venv/bin/python -m pytest -q -s -p no:cacheprovider tests/e2e/test_retry_brownout.py
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from gateway.policy.index import key_digest
from tests.harness.fake_control import FakeControl
from tests.harness.gateway import gateway_process
from tests.harness.procs import ServerProcess, free_port

KEY = "sk-brownout-tenant-5e0f"
REQUESTS = 50
CONCURRENCY = 5
PRIMARY = "fault:503-ratio-0.5"


def _policy(fake: str) -> str:
    # The window is longer than the run, so the bound holds over the whole run however slow the machine.
    return f"""
version: 1
backends:
  - {{name: primary, adapter: openai, base_url: "{fake}/v1"}}
  - {{name: fallback, adapter: openai, base_url: "{fake}/v1"}}
models:
  - {{name: m-primary, deployments: [{{backend: primary, upstream_model: "{PRIMARY}"}}]}}
  - {{name: m-fallback, deployments: [{{backend: fallback, upstream_model: fake-model}}]}}
routes:
  - name: chat
    models: [m-primary, m-fallback]
    retry: {{budget_ratio: 0.2, budget_min: 3}}
tenants:
  - name: t
    keys: [{{id: t-1, digest: "{key_digest(KEY)}"}}]
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, FakeControl]]:
    folder = tmp_path_factory.mktemp("brownout")
    port = free_port()
    argv = [sys.executable, "-m", "tests.harness.fake_upstream", "--port", str(port)]
    with ServerProcess(argv, port, ready_path="/healthz", log_path=folder / "fake.log") as fake_proc:
        policy = folder / "policy.yaml"
        policy.write_text(_policy(fake_proc.base_url))
        env = {"STRAIT_SPOOL_DIR": str(folder / "spool"), "STRAIT_ACCESS_LOG": "off"}
        with gateway_process(policy, log_path=folder / "gw.log", env=env) as gw, FakeControl(fake_proc.base_url) as fc:
            yield gw, fc


async def _run(base_url: str, marker: str) -> list[tuple[int, float]]:
    """(status, seconds) of each request, CONCURRENCY at a time."""
    results: list[tuple[int, float]] = []
    queue = list(range(REQUESTS))
    headers = {"authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60) as client:

        async def worker() -> None:
            while queue:
                i = queue.pop()
                body = {
                    "model": "chat",
                    "messages": [{"role": "user", "content": f"brown-out {i}"}],
                    "max_tokens": 5,
                    "user": marker,
                }
                t0 = time.perf_counter()
                r = await client.post("/v1/chat/completions", json=body)
                results.append((r.status_code, time.perf_counter() - t0))

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return results


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_the_retry_budget_bounds_a_brown_out(stack: tuple[ServerProcess, FakeControl]) -> None:
    gw, fake = stack
    fake.reset(counter=True)
    marker = uuid.uuid4().hex
    results = asyncio.run(_run(gw.base_url, marker))
    ledger = [r for r in fake.ledger() if isinstance(r["body"], dict) and r["body"].get("user") == marker]
    attempts = len(ledger)
    primary = [r for r in ledger if r["model"] == PRIMARY]
    ok = sum(1 for status, _ in results if status == 200)
    latencies = sorted(seconds for _, seconds in results)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    print(
        f"\nbrown-out: {REQUESTS} requests x{CONCURRENCY}, primary {PRIMARY}: success {ok / REQUESTS:.0%}, "
        f"attempts {attempts} ({attempts / REQUESTS:.2f}/request; primary {len(primary)}), "
        f"p50 {latencies[len(latencies) // 2] * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms"
    )
    assert len(results) == REQUESTS
    # The bound: every attempt after a request's first one came out of the budget.
    assert attempts <= 1.2 * REQUESTS + 3
    # The primary failed every other attempt, so about half the requests needed the fallback; the budget
    # let 20 % of the requests (+3) have it: about 76 % answered (more if the primary is ejected).
    assert ok >= 0.7 * REQUESTS
    # A request the client saw fail is one the budget refused a fallback to: the primary's 503, passed on.
    failed = [status for status, _ in results if status != 200]
    assert set(failed) <= {503}
    metrics = httpx.get(gw.base_url + "/metrics", timeout=5).text
    assert _metric(metrics, 'strait_retry_budget_exhausted_total{route="chat"}') == len(failed)
    # Every fallback the budget allowed answered.
    fallback_ok = [r for r in ledger if r["model"] == "fake-model" and r["status"] == 200]
    assert len(fallback_ok) == attempts - len(primary)
