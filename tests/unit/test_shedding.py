"""Load shedding with priority classes, in process: the stage's admission rule (property-tested), the
refusals clients see (503 + Retry-After before the body is read, 403 for a class the tenant may not
use, 400 for an unknown one), health endpoints never shed, the metrics; and /readyz while draining.
The same against a real gateway process with held upstream requests: tests/e2e/test_shedding_live.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from litestar.testing import TestClient

from gateway.app import create_app
from gateway.context import RequestContext
from gateway.errors import InvalidRequest, Overloaded, PermissionDenied
from gateway.inflight import InFlight
from gateway.policy.index import ANONYMOUS, PolicyIndex, Principal, key_digest
from gateway.policy.model import PRIORITY_CLASSES, PolicySet, Shedding
from gateway.runtime import Gateway
from gateway.settings import Settings
from gateway.stages.priority import PRIORITY_HEADER, PriorityStage, class_caps, needed
from gateway.telemetry import Metrics

ACME = "sk-shed-acme-0001"  # may use both classes
NIGHTLY = "sk-shed-nightly-0002"  # batch only
POLICY = f"""
version: 1
server:
  shedding: {{max_in_flight: 10, batch_share: 0.5, retry_after_s: 3}}
backends:
  - {{name: sim, adapter: simulated, simulated: {{ttft_ms: 0, tokens_per_second: 1000000, output_tokens: 3}}}}
models:
  - {{name: m, deployments: [{{backend: sim, upstream_model: sim-1}}]}}
routes:
  - {{name: chat, models: [m]}}
tenants:
  - name: acme
    keys: [{{id: a1, digest: "{key_digest(ACME)}"}}]
  - name: nightly
    keys: [{{id: n1, digest: "{key_digest(NIGHTLY)}"}}]
    priority: {{allowed: [batch]}}
"""
BODY = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}


@contextlib.contextmanager
def _client(tmp_path: Path, policy_text: str = POLICY) -> Iterator[tuple[TestClient[object], Gateway]]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text)
    app = create_app(Settings(policy_path=str(policy), spool_dir=str(tmp_path / "spool")))
    with TestClient(app) as c:
        yield c, app.state["gateway"]


def _auth(key: str, priority: str | None = None) -> dict[str, str]:
    headers = {"authorization": f"Bearer {key}"}
    if priority is not None:
        headers[PRIORITY_HEADER] = priority
    return headers


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.rsplit(" ", 1)[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


@given(cap=st.integers(1, 1_000_000), share=st.floats(0.0, 1.0, exclude_min=True))
def test_batch_cap_is_a_share_of_the_cap_never_above_it_never_zero(cap: int, share: float) -> None:
    caps = class_caps(Shedding(max_in_flight=cap, batch_share=share))
    assert caps is not None
    assert caps["interactive"] == cap
    assert 1 <= caps["batch"] <= cap
    assert caps["batch"] == max(1, int(cap * share))


def test_no_cap_no_shedding_and_no_stage_for_a_default_policy() -> None:
    assert class_caps(Shedding()) is None
    assert not needed(PolicyIndex(msgspec.convert({"tenants": [{"name": "t"}]}, PolicySet)))
    assert needed(PolicyIndex(msgspec.convert({"server": {"shedding": {"max_in_flight": 1}}}, PolicySet)))
    assert needed(
        PolicyIndex(msgspec.convert({"tenants": [{"name": "t", "priority": {"allowed": ["batch"]}}]}, PolicySet))
    )


@given(
    cap=st.integers(1, 50),
    share=st.sampled_from([0.1, 0.5, 0.7, 1.0]),
    in_flight=st.integers(1, 60),
    asked=st.sampled_from([None, *PRIORITY_CLASSES]),
)
def test_a_request_is_admitted_exactly_while_its_class_is_under_its_cap(
    cap: int, share: float, in_flight: int, asked: str | None
) -> None:
    """`in_flight` counts the request itself (the edge entered it before the stage runs)."""
    index = PolicyIndex(
        msgspec.convert({"server": {"shedding": {"max_in_flight": cap, "batch_share": share}}}, PolicySet)
    )
    inflight = InFlight()
    inflight.count = in_flight
    metrics = Metrics()
    stage = PriorityStage(index, inflight, metrics)
    headers = {} if asked is None else {PRIORITY_HEADER: asked}
    ctx = RequestContext(request_id="r", operation="chat", started=0.0, headers=headers, principal=ANONYMOUS)
    priority = asked or "interactive"  # the open tenant's default: the most important class
    limit = cap if priority == "interactive" else max(1, int(cap * share))
    shed = metrics.child(metrics.shed, priority)
    if in_flight <= limit:
        asyncio.run(stage.on_request(ctx))
        assert shed.pending == 0
    else:
        with pytest.raises(Overloaded) as refused:
            asyncio.run(stage.on_request(ctx))
        assert refused.value.status == 503 and refused.value.headers == {"retry-after": "1"}
        assert shed.pending == 1


def test_class_must_be_known_and_allowed_for_the_tenant() -> None:
    index = PolicyIndex(
        msgspec.convert({"tenants": [{"name": "nightly", "priority": {"allowed": ["batch"]}}]}, PolicySet)
    )
    stage = PriorityStage(index, InFlight(), Metrics())
    nightly = Principal(tenant="nightly", key_id="n1", allowed_routes=None)

    def run(headers: dict[str, str]) -> None:
        ctx = RequestContext(request_id="r", operation="chat", started=0.0, headers=headers, principal=nightly)
        asyncio.run(stage.on_request(ctx))

    run({})  # no header: the tenant's default, batch (the only class it has)
    run({PRIORITY_HEADER: " Batch "})  # case and spaces do not matter
    with pytest.raises(PermissionDenied) as denied:
        run({PRIORITY_HEADER: "interactive"})
    assert denied.value.code == "priority_not_allowed" and "allowed: batch" in denied.value.message
    with pytest.raises(InvalidRequest) as invalid:
        run({PRIORITY_HEADER: "urgent"})
    assert invalid.value.code == "invalid_priority" and "urgent" not in invalid.value.message


def test_refusals_clients_see_and_what_is_never_shed(tmp_path: Path) -> None:
    with _client(tmp_path) as (c, gateway):
        # Nothing held: every class is served.
        assert c.post("/v1/chat/completions", json=BODY, headers=_auth(ACME, "batch")).status_code == 200
        assert c.post("/v1/chat/completions", json=BODY, headers=_auth(NIGHTLY)).status_code == 200

        # 5 other requests in flight (this one makes 6): past batch's cap (5 of 10), not interactive's.
        gateway.inflight.count += 5
        try:
            # Not even a body: a shed request is refused before the body is read, so not a 400.
            r = c.post("/v1/chat/completions", content=b"{not json", headers=_auth(ACME, "batch"))
            assert r.status_code == 503
            assert r.headers["retry-after"] == "3"
            assert r.json()["error"]["code"] == "overloaded" and r.json()["error"]["type"] == "server_error"
            assert "x-strait-request-id" in r.headers
            assert c.post("/v1/chat/completions", json=BODY, headers=_auth(NIGHTLY)).status_code == 503
            assert c.post("/v1/chat/completions", json=BODY, headers=_auth(ACME)).status_code == 200

            gateway.inflight.count += 4  # 10 with the next request: interactive's cap, still admitted
            assert c.post("/v1/chat/completions", json=BODY, headers=_auth(ACME)).status_code == 200
            gateway.inflight.count += 1  # 11: over
            r = c.post("/v1/chat/completions", json=BODY, headers=_auth(ACME, "interactive"))
            assert r.status_code == 503 and r.headers["retry-after"] == "3"

            # A class the tenant may not use is refused whatever the load, and says why.
            r = c.post("/v1/chat/completions", json=BODY, headers=_auth(NIGHTLY, "interactive"))
            assert r.status_code == 403 and r.json()["error"]["code"] == "priority_not_allowed"
            r = c.post("/v1/chat/completions", json=BODY, headers=_auth(ACME, "urgent"))
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_priority"

            # Health and metrics are never shed.
            assert c.get("/readyz").status_code == 200
            assert c.get("/healthz").status_code == 200
            text = c.get("/metrics").text
            assert _metric(text, 'strait_shed_total{priority="batch"}') == 2
            assert _metric(text, 'strait_shed_total{priority="interactive"}') == 1
            assert _metric(text, "strait_in_flight_requests") == 10  # the 10 pretended (no request is running)
        finally:
            gateway.inflight.count -= 10
        assert gateway.inflight.count == 0  # every request left the count on its way out


def test_readyz_turns_draining_at_once_and_requests_still_finish(tmp_path: Path) -> None:
    with _client(tmp_path) as (c, gateway):
        assert c.get("/readyz").json()["status"] == "ready"

        async def drain() -> None:
            gateway.inflight.drain(60)

        c.blocking_portal.call(drain)
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "draining"
        # Requests that reach the app while it drains are still answered (the server stops accepting).
        assert c.post("/v1/chat/completions", json=BODY, headers=_auth(ACME)).status_code == 200
        assert _metric(c.get("/metrics").text, "strait_draining") == 1
