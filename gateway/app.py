"""create_app: the one wiring point.

The handler builds a RequestContext (ids, headers, a body source), runs the pipeline
(gateway.pipeline) and sends its Reply (gateway.api.asgi_send, a stream framed by the OpenAI codec in
gateway.api.openai.sse_encode); stages, in order, `on_request`:
  auth (before the body is read) -> priority (only when the policy sheds load or restricts classes:
  gateway.stages.priority; a shed request is refused before its body is read) -> decode (gateway.api.openai.request_stage: the body, read and decoded only
  once authenticated; injected here so nothing below api/ imports it) -> route (policy engine,
  explain) -> limits (one state-store call; a spent budget may switch to the plan's downgrade) -> upstream (terminal, gateway.stages.upstream: walks the
  plan with fallback; gateway.stages.respond makes the JSON reply, or the upstream's stream an event
  source).
`on_response` runs in reverse for stages that have one (none yet). Taps (gateway.contracts.Tap), in
the order their `on_end` runs: live signals and token metrics (the upstream stage's), accounting
(usage records to the ledger writer, reservation reconciled, both in the background; a stream's lease
renewed by a timer), capture (gateway.stages.capture: only when some tenant consents; a consenting
tenant's request and answer queued for the capture writer, redacted and written off the request path),
the request's span when tracing. The pipeline ends every request that reached the
upstream stage through them exactly once: a JSON answer, an upstream error, a dispatch failure or a
cancellation right away; a stream through the one relay it wraps around it (gateway.relay), when it is
over or when the edge closes it (the client left, even before the first event). So accounting is
reached from one place, `AccountingStage.on_end`. A stage refuses by raising a GatewayError, rendered
below as an OpenAI error envelope (on /v1/messages, by its endpoint in Anthropic's: gateway.api.anthropic).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

from litestar import Litestar, Request, Response
from litestar.datastructures import State
from litestar.exceptions import HTTPException

from gateway.access_log import AccessLog
from gateway.accounting.open import open_ledger
from gateway.accounting.spool import Spool
from gateway.accounting.writer import UsageWriter
from gateway.api.console.handlers import build_console_handlers
from gateway.api.console.history import MetricHistory
from gateway.api.cors import CorsGate
from gateway.api.front import FrontedLitestar
from gateway.api.identity import request_id_of, scope_id_headers
from gateway.api.inbound import inbound_limits
from gateway.api.openai.request_stage import DecodeStage
from gateway.api.responses.stored import Conversations
from gateway.api.routes import build_handlers, model_endpoints
from gateway.api.shutdown import before_sigterm
from gateway.cache.pool import EmbedderPool
from gateway.cache.store import open_cache_store
from gateway.capture.shadow_sink import CaptureShadowSink
from gateway.capture.writer import CaptureWriter
from gateway.contracts import AdapterFactory, ShadowSink
from gateway.errors import GatewayError, InternalError, InvalidRequest, MethodNotAllowed, NotFound, PayloadTooLarge
from gateway.gauges import GatewayGauges
from gateway.policy.decisions import DecisionLog
from gateway.policy.load import freeze_loaded, load_policy, serving_collector
from gateway.registry import discover_adapters
from gateway.reload import PolicyReloader
from gateway.reply import JSON
from gateway.responses_store import open_response_store
from gateway.runtime import Gateway, Services, build_runtime
from gateway.settings import Settings
from gateway.stages.accounting import AccountingStage
from gateway.stages.observers import FeatureLogFile, ShadowPolicy
from gateway.stages.recent import RecentDecisions
from gateway.stages.shadow import ShadowRunner
from gateway.state import open_store
from gateway.telemetry import Metrics
from gateway.tracing import tracing_from_env
from gateway.upstream.signals import LiveSignals

log = logging.getLogger("strait")


def _error_response(request: Request[Any, Any, Any], error: GatewayError) -> Response[bytes]:
    headers = {**scope_id_headers(request.scope), **error.headers}
    return Response(error.body(), status_code=error.status, media_type=JSON, headers=headers)


def _on_gateway_error(request: Request[Any, Any, Any], exc: GatewayError) -> Response[bytes]:
    return _error_response(request, exc)


def _on_http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    """Litestar's own errors (unknown path, wrong method, bad framing) in the OpenAI envelope."""
    status = exc.status_code
    error: GatewayError
    if status == 404:
        error = NotFound(f"Unknown path {request.url.path}.")
    elif status == 405:
        error = MethodNotAllowed(f"Method {request.method} is not allowed on {request.url.path}.")
    elif status == 413:
        error = PayloadTooLarge("Request body too large.")
    elif status < 500:
        error = InvalidRequest(str(exc.detail), status=400 if status == 422 else status)
    else:
        error = InternalError("The gateway failed to process the request.")
    return _error_response(request, error)


def _on_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    # The traceback goes to the server log with the request id; the client gets no internals.
    log.exception("request %s failed", request_id_of(request.scope))
    return _error_response(request, InternalError("The gateway failed to process the request."))


def _retention_days(gateway: Gateway, tenant: str) -> int | None:
    """The tenant's capture retention under the policy in force; None when it no longer captures."""
    found = gateway.runtime.index.tenants.get(tenant)
    return found.capture.retention_days if found is not None and found.capture.enabled else None


def create_app(
    settings: Settings,
    *,
    factories: Mapping[str, AdapterFactory] | None = None,
    access_log_out: BinaryIO | None = None,
    drain_on_sigterm: bool = False,
    shadow_sink: ShadowSink | None = None,
) -> Litestar:
    """`drain_on_sigterm`: the app is served by `strait serve` (uvicorn): SIGTERM starts the drain at
    once (gateway.api.shutdown); in-process tests leave it off and call `InFlight.drain` themselves.
    `shadow_sink`: where routes' shadow copies' answers go (gateway.contracts.ShadowSink); None: the capture
    store (gateway.capture.shadow_sink) unless STRAIT_CAPTURE=off, then logged."""
    factories = discover_adapters() if factories is None else factories
    metrics = Metrics()
    signals = LiveSignals()
    policy = load_policy(settings.policy_path, adapters=factories.keys())
    store = open_store(settings.state, timeout_s=settings.state_timeout_ms / 1000, replicas_hint=settings.replicas)
    ledger = open_ledger(settings.state)
    writer = UsageWriter(ledger, Spool(Path(settings.spool_dir)))
    limits = inbound_limits(settings)
    # Stored responses live where the limits do (the state's Redis when there is one: every replica
    # reads them), not in the cache's Redis, whose LRU eviction would lose conversations.
    responses = open_response_store(settings.state)
    capture = CaptureWriter(settings.capture_url, metrics)
    services = Services(
        metrics,
        signals,
        store,
        AccountingStage(
            writer,
            store,
            metrics,
            AccessLog(sample=settings.access_log_sample, out=access_log_out) if settings.access_log == "on" else None,
        ),
        DecisionLog(),
        decode=lambda policy: DecodeStage(
            limits, policy.server.max_body_bytes, Conversations(responses, policy.server.responses)
        ),
        tracing=tracing_from_env(os.environ),
        cache_store=open_cache_store(settings.cache_url, timeout_s=settings.state_timeout_ms / 1000),
        embedders=EmbedderPool(),
        region=settings.region,
        responses=responses,
        feature_log=FeatureLogFile(settings.feature_log, settings.feature_log_sample) if settings.feature_log else None,
        shadow=ShadowPolicy(settings.shadow_policy, metrics) if settings.shadow_policy else None,
        capture=capture,
        # Routes' `shadow` copies; their sink is set below (the capture store's needs the gateway).
        shadow_traffic=ShadowRunner(metrics, shadow_sink),
        recent=RecentDecisions(),
    )
    runtime = build_runtime(policy, factories, services)
    if drain_on_sigterm:
        # Served by `strait serve`: the policy and its runtime live until a reload, out of the cyclic
        # collector's way. (In-process tests build many apps: they would freeze their own garbage.)
        freeze_loaded()
        serving_collector()
    gateway = Gateway(runtime, services, writer, ledger)
    capture.retention_days = lambda tenant: _retention_days(gateway, tenant)
    if shadow_sink is None and capture.enabled and services.shadow_traffic is not None:
        # Shadow answers beside the live ones, for tenants whose live request was captured.
        services.shadow_traffic.sink = CaptureShadowSink(capture, metrics, lambda: gateway.runtime.index.version)
    metrics.registry.register(GatewayGauges(gateway))
    reloader = PolicyReloader(gateway, settings.policy_path, factories)
    inflight = services.inflight
    grace_s = settings.shutdown_grace_s

    async def drain_on_term() -> None:
        before_sigterm(
            lambda: inflight.drain(grace_s),
            delay_s=settings.drain_delay_s,
            on_notice=lambda: inflight.announce(settings.drain_delay_s),
        )

    async def stop_draining() -> None:
        inflight.close()

    endpoints = model_endpoints(gateway, limits)
    # The console's answers by tier per minute (its overview's "over time"), sampled from the metrics.
    history = MetricHistory(metrics)
    return FrontedLitestar(
        endpoints=endpoints,
        cors=CorsGate(lambda: gateway.runtime.index.policy.server.cors),
        route_handlers=[
            *build_handlers(gateway, limits, metrics_token=settings.metrics_token, endpoints=endpoints),
            # The console (/ui) and its JSON (/admin/api): admin keys only (gateway.api.console).
            *build_console_handlers(gateway, reloader, factories.keys(), history),
        ],
        exception_handlers={
            GatewayError: _on_gateway_error,
            HTTPException: _on_http_exception,
            Exception: _on_unexpected,
        },
        on_startup=[gateway.start, reloader.start, history.start, *([drain_on_term] if drain_on_sigterm else [])],
        # The usage writer flushes (or spools) everything queued in `gateway.aclose`: nothing is lost.
        on_shutdown=[stop_draining, reloader.stop, history.stop, gateway.aclose],
        request_max_body_size=None,
        # The running gateway, for in-process tests and tools (e.g. to wait for the cache's background writes).
        state=State({"gateway": gateway}),
        openapi_config=None,
        logging_config=None,
        debug=False,
    )
