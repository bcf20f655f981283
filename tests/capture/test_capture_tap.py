"""The capture tap's consent decision on its own: sampling, opt-out, embeddings, tenants without consent,
and a policy without consent, whose pipeline (built at load and at every reload) has no capture tap."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from gateway.app import create_app
from gateway.capture.writer import CaptureWriter
from gateway.context import RequestContext
from gateway.contracts import End
from gateway.policy.index import PolicyIndex, Principal
from gateway.policy.load import load_policy
from gateway.settings import Settings
from gateway.stages.capture import CaptureTap, captures_any
from gateway.telemetry import Metrics

POLICY = """
version: 1
backends: [{{name: b, adapter: simulated}}]
models: [{{name: m, capabilities: [chat, embeddings], deployments: [{{backend: b, upstream_model: m}}]}}]
routes: [{{name: r, models: [m]}}]
tenants:
  - name: sampled
    capture: {{enabled: {enabled}, sample_rate: 0.3}}
  - name: silent
"""


def tap_for(tmp_path: Path, enabled: bool = True, seed: int = 5) -> tuple[CaptureTap, CaptureWriter, PolicyIndex]:
    path = tmp_path / f"p-{str(enabled).lower()}.yaml"
    path.write_text(POLICY.format(enabled=str(enabled).lower()))
    index = PolicyIndex(load_policy(path))
    writer = CaptureWriter(f"sqlite:///{tmp_path}/c.db", Metrics(), max_queued=100_000)
    return CaptureTap(index, writer, random.Random(seed)), writer, index


def ctx(tenant: str, headers: dict[str, str] | None = None, operation: str = "chat") -> RequestContext:
    c = RequestContext(request_id="req_x", operation=operation, started=time.perf_counter(), headers=headers or {})  # type: ignore[arg-type]
    c.principal = Principal(tenant=tenant, key_id="k", allowed_routes=None)
    c.route_name = "r"
    return c


def test_the_sample_rate_is_the_share_captured(tmp_path: Path) -> None:
    tap, writer, _ = tap_for(tmp_path)
    n = 4000
    for _ in range(n):
        tap.on_end(ctx("sampled"), End("completed", 200))
    # 0.3 of 4000 = 1200; the bound is about six standard deviations (sd = 29).
    assert 1030 <= writer.queued() <= 1370


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("value", ["off", "OFF", " off ", "0", "false", "no"])
def test_an_opt_out_header_is_never_captured(tmp_path: Path, value: str, stream: bool) -> None:
    tap, writer, _ = tap_for(tmp_path, seed=1)
    for _ in range(50):
        c = ctx("sampled", {"x-strait-capture": value})
        if stream:
            tap.on_start(c)
            assert c.capture is None
        tap.on_end(c, End("completed", 200, stream=stream))
    assert writer.queued() == 0


def test_no_consent_no_embeddings_no_capture(tmp_path: Path) -> None:
    tap, writer, _ = tap_for(tmp_path)
    for _ in range(200):
        tap.on_end(ctx("silent", {"x-strait-capture": "on"}), End("completed", 200))
        tap.on_end(ctx("sampled", operation="embeddings"), End("completed", 200))
        tap.on_end(ctx("nobody"), End("completed", 200))
    assert writer.queued() == 0


@pytest.mark.parametrize("enabled", [True, False])
def test_the_pipeline_holds_a_capture_tap_only_when_a_tenant_consents(tmp_path: Path, enabled: bool) -> None:
    _, _, index = tap_for(tmp_path, enabled=enabled)
    assert captures_any(index) is enabled
    app = create_app(
        Settings(policy_path=str(tmp_path / f"p-{str(enabled).lower()}.yaml"), spool_dir=str(tmp_path / "spool"))
    )
    taps = app.state["gateway"].runtime.pipeline.taps
    assert any(isinstance(t, CaptureTap) for t in taps) is enabled
