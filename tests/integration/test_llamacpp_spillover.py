"""Spillover proven once on a real engine: a llama.cpp server with one slot (nobody here wrote it), its
`/metrics` scraped by Strait. Two clients at once keep `llamacpp:requests_deferred` above 0, so the overflow
goes to the second backend (the fake upstream), each such answer saying why in `x-strait-spill`; when the load
stops and the queue drains, traffic returns to llama.cpp."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.harness.fake_control import parse_prometheus
from tests.harness.gateway import gateway_process
from tests.harness.llamacpp import llamacpp_server
from tests.harness.procs import ServerProcess, free_port

pytestmark = pytest.mark.llamacpp

POLICY = """
version: 1
backends:
  - name: llama
    adapter: openai
    base_url: "{llama}/v1"
    tier: edge
    timeouts: {{read_s: 60}}
    capacity: {{metrics_url: "{llama}/metrics", metrics_format: llamacpp, scrape_interval_s: 0.1}}
  - {{name: overflow, adapter: openai, base_url: "{fake}/v1", tier: provider}}
models:
  - {{name: small, deployments: [{{backend: llama, upstream_model: smollm2}}, {{backend: overflow, upstream_model: fake-model}}]}}
routes:
  - name: chat
    models: [small]
    # No max_concurrency: utilisation is 1 while a request waits for the slot, 0 once none does.
    spillover: {{tiers: [edge, provider], threshold: 1.0, resume_below: 0.0}}
"""
LLAMA = "small@llama"
OVERFLOW = "small@overflow"
BODY = {"model": "chat", "messages": [{"role": "user", "content": "Count from one to forty."}], "max_tokens": 48}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    folder = tmp_path_factory.mktemp("llama-spill")
    port = free_port()
    fake = ServerProcess(
        [sys.executable, "-m", "tests.harness.fake_upstream", "--port", str(port)],
        port,
        ready_path="/healthz",
        log_path=folder / "fake.log",
    )
    llama = llamacpp_server("smollm2", n_parallel=1, log_path=folder / "llama.log")
    with llama, fake:
        policy = folder / "policy.yaml"
        policy.write_text(POLICY.format(llama=llama.base_url, fake=fake.base_url))
        with gateway_process(policy, log_path=folder / "gateway.log") as gw:
            yield gw, llama


def test_a_one_slot_llamacpp_spills_while_requests_wait_and_takes_traffic_back(
    stack: tuple[ServerProcess, ServerProcess],
) -> None:
    gw, llama = stack
    served: list[tuple[str, str | None]] = []
    deferred_seen: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=gw.base_url, timeout=60) as c:
            while not stop.is_set():
                r = c.post("/v1/chat/completions", json=BODY)
                with lock:
                    if r.status_code != 200:
                        failures.append(r.text)
                    else:
                        served.append((r.headers["x-strait-deployment"], r.headers.get("x-strait-spill")))

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            deferred_seen.append(
                parse_prometheus(httpx.get(llama.base_url + "/metrics", timeout=5).text).get(
                    "llamacpp:requests_deferred", 0.0
                )
            )
            with lock:
                if sum(d == OVERFLOW for d, _ in served) >= 3 and sum(d == LLAMA for d, _ in served) >= 2:
                    break
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures[:3]
    spilled = [why for d, why in served if d == OVERFLOW]
    assert len(spilled) >= 3, served
    assert all(why is not None and why.startswith("llama: ") for why in spilled), spilled
    assert any(d == LLAMA for d, _ in served)
    # The engine really queued: its own gauge said so while we watched.
    assert max(deferred_seen) >= 1
    # Load gone: once the queue drained, llama.cpp answers again, no spill header.
    with httpx.Client(base_url=gw.base_url, timeout=60) as c:
        deadline = time.monotonic() + 30
        while True:
            r = c.post("/v1/chat/completions", json=BODY)
            if r.headers["x-strait-deployment"] == LLAMA:
                assert "x-strait-spill" not in r.headers
                break
            assert time.monotonic() < deadline, "traffic never returned to llama.cpp"
            time.sleep(0.05)
