"""Ejection, probing and capacity through a real `strait serve`, in front of two fake upstreams (real processes):

- "primary down for a minute, then healthy" (periods shortened in the policy): served from the fallback
  meanwhile, the primary probed with free requests only (its ledger shows no completion while ejected, its
  /health counts the probes), traffic back on the primary once it recovers;
- spillover starting and stopping with hysteresis, driven by the fake's vLLM /metrics (POST /_metrics pins);
- stale engine metrics: routing falls back to in-flight counting, and explain says so.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from gateway.policy.index import key_digest
from tests.harness.fake_control import FakeControl
from tests.harness.gateway import gateway_process
from tests.harness.procs import ServerProcess, free_port

KEY = "sk-health-live-61c0"
PRIMARY = "m-primary@primary"
FALLBACK = "m-fallback@fallback"
T = TypeVar("T")


def _policy(primary_url: str, fallback_url: str) -> str:
    return f"""
version: 1
backends:
  - name: primary
    adapter: openai
    base_url: "{primary_url}/v1"
    tier: self-hosted
    capacity: {{max_concurrency: 4, metrics_url: "{primary_url}/metrics", scrape_interval_s: 0.1, stale_after_s: 0.5}}
    # Envoy-like thresholds with short periods, so that "down for a minute" takes seconds here.
    outlier: {{consecutive_failures: 2, base_ejection_s: 0.5, max_ejection_s: 2, probe: health, active_interval_s: 0.2}}
  - {{name: fallback, adapter: openai, base_url: "{fallback_url}/v1", tier: provider}}
models:
  - {{name: m-primary, deployments: [{{backend: primary, upstream_model: fake-model}}]}}
  - {{name: m-fallback, deployments: [{{backend: fallback, upstream_model: fake-model}}]}}
routes:
  - {{name: chat, models: [m-primary, m-fallback]}}
  - name: spill
    models: [m-primary, m-fallback]
    spillover: {{tiers: [self-hosted, provider], threshold: 0.8, resume_below: 0.4}}
tenants:
  - name: t
    keys: [{{id: t-1, digest: "{key_digest(KEY)}"}}]
    explain: true
"""


@pytest.fixture(scope="module")
def primary(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    port = free_port()
    log = tmp_path_factory.mktemp("primary") / "fake.log"
    argv = [sys.executable, "-m", "tests.harness.fake_upstream", "--port", str(port), "--slots", "4"]
    with ServerProcess(argv, port, ready_path="/healthz", log_path=log) as proc:
        yield proc


@pytest.fixture(scope="module")
def gw(
    primary: ServerProcess, fake_upstream: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("gw-health")
    policy = folder / "policy.yaml"
    policy.write_text(_policy(primary.base_url, fake_upstream.base_url))
    with gateway_process(policy, log_path=folder / "gateway.log") as proc:
        yield proc


@pytest.fixture()
def fake(primary: ServerProcess) -> Iterator[FakeControl]:
    control = FakeControl(primary.base_url)
    control.reset()
    control.set_metrics(reset=True)
    yield control
    control.set_health(ok=True)
    control.set_metrics(reset=True)
    control.close()


def _chat(gw: ServerProcess, route: str = "chat") -> httpx.Response:
    body = {"model": route, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    headers = {"authorization": f"Bearer {KEY}", "x-strait-explain": "1"}
    r = httpx.post(gw.base_url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return r


def _explain(r: httpx.Response) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(r.headers["x-strait-explain"])
    return doc


def _until(check: Callable[[], T | None], what: str, timeout: float = 15.0) -> T:
    """Poll `check` until it returns something truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() >= deadline:
            raise AssertionError(f"never happened within {timeout} s: {what}")
        time.sleep(0.05)


def _last_n(fake: FakeControl) -> int:
    return max((r["n"] for r in fake.ledger()), default=0)


def test_primary_down_then_healthy_served_by_fallback_probed_for_free_and_traffic_returns(
    gw: ServerProcess, fake: FakeControl
) -> None:
    assert _chat(gw).headers["x-strait-deployment"] == PRIMARY
    down_at = time.monotonic()
    fake.set_health(ok=False)

    def ejected() -> httpx.Response | None:
        r = _chat(gw)
        excluded = _explain(r).get("excluded", {})
        return r if excluded.get(PRIMARY) == "backend is ejected (unhealthy)" else None

    first = _until(ejected, "the primary ejected")
    ejected_after = time.monotonic() - down_at
    assert first.headers["x-strait-deployment"] == FALLBACK
    metrics = httpx.get(gw.base_url + "/metrics", timeout=5).text
    assert 'strait_upstream_ejected{backend="primary"} 1.0' in metrics
    mark = _last_n(fake)
    probes = fake.health_state()["probes"]
    # Meanwhile every request is answered, by the fallback.
    for _ in range(10):
        assert _chat(gw).headers["x-strait-deployment"] == FALLBACK
    # Half-open probing goes on while it is down (each failed probe ejects it again, for longer) ...
    _until(lambda: fake.health_state()["probes"] >= probes + 3, "three more health probes")
    # ... and it never cost a completion: nothing reached the primary's ledger (probes are GET /health,
    # which the ledger does not hold; a completion or a /v1/models call would be there).
    assert [(r["method"], r["path"]) for r in fake.ledger() if r["n"] > mark] == []
    up_at = time.monotonic()
    fake.set_health(ok=True)
    back = _until(lambda: _chat(gw).headers["x-strait-deployment"] == PRIMARY, "traffic back on the primary")
    returned_after = time.monotonic() - up_at
    assert back
    for _ in range(5):
        assert _chat(gw).headers["x-strait-deployment"] == PRIMARY
    # Every record the primary got after the ejection is a served completion from after its recovery.
    after = [r for r in fake.ledger() if r["n"] > mark]
    assert after and all(r["path"] == "/v1/chat/completions" and r["status"] == 200 for r in after)
    assert all("down" not in r["faults"] for r in after)
    # Recovery is bounded by the longest ejection (2 s) plus a probe: generous for a loaded machine.
    assert returned_after < 10.0
    # Operators read both transitions in the log.
    assert gw.log_path is not None
    log = gw.log_path.read_text(errors="replace")
    assert "upstream primary ejected" in log and "upstream primary back in routing" in log
    print(
        f"ejected {ejected_after:.2f} s after the primary went down; traffic back {returned_after:.2f} s after it recovered"
    )


def _fresh_scrapes(fake: FakeControl, n: int = 2) -> None:
    """Wait until the gateway scraped the fake at least `n` more times: it has seen the latest pins."""
    seen = int(fake.metrics_state()["scrapes"])
    _until(lambda: int(fake.metrics_state()["scrapes"]) >= seen + n, f"{n} more scrapes")


def _spilling_gauge(gw: ServerProcess) -> float:
    """What an operator's dashboard reads: strait_backend_spilling for the primary."""
    for line in httpx.get(gw.base_url + "/metrics", timeout=5).text.splitlines():
        if line.startswith('strait_backend_spilling{backend="primary"} '):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("strait_backend_spilling for the primary not in /metrics")


def _served(gw: ServerProcess, tier: str, spilled: str) -> float:
    """strait_served_requests_total on route spill: what the spillover-share panel and spend alert read."""
    series = f'strait_served_requests_total{{route="spill",spilled="{spilled}",tier="{tier}"}} '
    for line in httpx.get(gw.base_url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(series):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_spillover_starts_at_the_threshold_and_flows_back_below_the_lower_mark(
    gw: ServerProcess, fake: FakeControl
) -> None:
    spilled_before = _served(gw, "provider", "true")
    own_before = _served(gw, "self-hosted", "false")

    def at(kv: float) -> httpx.Response:
        fake.set_metrics(kv_cache_usage=kv, running=0, waiting=0)
        _fresh_scrapes(fake)
        return _chat(gw, "spill")

    calm = at(0.3)
    assert calm.headers["x-strait-deployment"] == PRIMARY and "x-strait-spill" not in calm.headers
    assert _spilling_gauge(gw) == 0
    full = at(0.9)
    assert full.headers["x-strait-deployment"] == FALLBACK
    assert full.headers["x-strait-spill"] == "primary: utilisation 0.90 >= threshold 0.80"
    assert _explain(full)["spilled"] == {PRIMARY: "utilisation 0.90 >= threshold 0.80"}
    assert _spilling_gauge(gw) == 1
    # Between the marks: still spilling (hysteresis), and it says so.
    middle = at(0.6)
    assert middle.headers["x-strait-deployment"] == FALLBACK
    assert middle.headers["x-strait-spill"] == "primary: still spilling: utilisation 0.60 above the resume mark 0.40"
    assert _spilling_gauge(gw) == 1
    # Below the lower mark: flows back.
    drained = at(0.35)
    assert drained.headers["x-strait-deployment"] == PRIMARY and "x-strait-spill" not in drained.headers
    assert _spilling_gauge(gw) == 0
    # The two spilled answers came from the provider tier, flagged spilled; the calm and drained ones not.
    assert _served(gw, "provider", "true") - spilled_before == 2
    assert _served(gw, "self-hosted", "false") - own_before == 2
    # Back between the marks from below: stays on the primary.
    again = at(0.6)
    assert again.headers["x-strait-deployment"] == PRIMARY and "x-strait-spill" not in again.headers
    table = httpx.get(
        gw.base_url + f"/admin/decisions/{_explain(again)['decision']}",
        headers={"authorization": f"Bearer {KEY}"},
        timeout=5,
    ).json()
    row = next(r for r in table["rows"] if r["deployment"] == PRIMARY)
    assert (row["load"], row["utilisation"], row["queue"]) == ("engine", 0.6, 0)


def test_stale_metrics_fall_back_to_in_flight_counting_flagged_in_explain(gw: ServerProcess, fake: FakeControl) -> None:
    fake.set_metrics(kv_cache_usage=0.95, running=0, waiting=0)
    _fresh_scrapes(fake)
    assert _chat(gw, "spill").headers["x-strait-deployment"] == FALLBACK  # the engine says it is full
    fake.set_metrics(status=503)  # the metrics page fails from now on

    def stale() -> httpx.Response | None:
        r = _chat(gw, "spill")
        return r if _explain(r).get("stale_metrics") == [PRIMARY] else None

    r = _until(stale, "explain flags the primary's metrics as stale")
    # Counted from in-flight requests instead (none): the primary serves again, the last gauge forgotten.
    assert r.headers["x-strait-deployment"] == PRIMARY and "x-strait-spill" not in r.headers
    fake.set_metrics(status=200, kv_cache_usage=0.1)
    _fresh_scrapes(fake)
    fresh = _chat(gw, "spill")
    assert "stale_metrics" not in _explain(fresh)
    assert fresh.headers["x-strait-deployment"] == PRIMARY


def _reloads_applied(gw: ServerProcess) -> float:
    for line in httpx.get(gw.base_url + "/metrics", timeout=5).text.splitlines():
        if line.startswith('strait_policy_reloads_total{result="applied"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_reloaded_policy_gets_its_scraper_and_a_removed_one_stops(
    fake_upstream: ServerProcess, tmp_path: Path
) -> None:
    """A backend gains `metrics_url` by a hot reload: the new runtime's scraper starts and its load steers
    spillover; the reload that removes it stops the scraper. Its own fake engine, so no other gateway scrapes it."""
    port = free_port()
    argv = [sys.executable, "-m", "tests.harness.fake_upstream", "--port", str(port)]
    engine = ServerProcess(argv, port, ready_path="/healthz", log_path=tmp_path / "fake.log")
    with_metrics = _policy(engine.base_url, fake_upstream.base_url)
    without = with_metrics.replace(f', metrics_url: "{engine.base_url}/metrics"', "")
    assert without != with_metrics
    policy = tmp_path / "policy.yaml"
    policy.write_text(without)
    with engine, FakeControl(engine.base_url) as fake, gateway_process(policy, log_path=tmp_path / "gw.log") as gw:
        fake.set_metrics(kv_cache_usage=0.9, running=0, waiting=0)
        assert int(fake.metrics_state()["scrapes"]) == 0  # nothing scrapes a page no policy names
        assert _chat(gw, "spill").headers["x-strait-deployment"] == PRIMARY
        policy.write_text(with_metrics)
        _until(lambda: int(fake.metrics_state()["scrapes"]) >= 2, "the reloaded policy's scraper started")
        _fresh_scrapes(fake)
        assert _chat(gw, "spill").headers["x-strait-spill"].startswith("primary: utilisation 0.90")
        applied = _reloads_applied(gw)
        policy.write_text(without)
        _until(lambda: _reloads_applied(gw) > applied, "the reload without metrics_url applied")
        stopped_at = int(fake.metrics_state()["scrapes"])
        # Several requests later (each a full decision), the page is no longer read: at most one scrape that
        # was already under way when the reload landed.
        for _ in range(10):
            r = _chat(gw, "spill")
        assert int(fake.metrics_state()["scrapes"]) <= stopped_at + 1
        # And its last gauge no longer steers routing: counted from in-flight requests, the primary serves.
        assert r.headers["x-strait-deployment"] == PRIMARY
