"""The shadow sink that stores a route's shadow copies' answers in the capture store, beside the live one
(gateway.contracts.ShadowSink; the runner is gateway.stages.shadow).

A copy's answer is stored only when the live request it copied was captured (`ctx.capture`, set by the
capture tap: the tenant consents, the request did not opt out, the sample said yes), under the consent
the live record was captured with (what it includes, its redactors, its training consent). Otherwise it
is counted (`strait_shadow_captures{result="no_consent"}`) and dropped: a copy never stores what the live
request could not.

The record: `request_id` `<live id>:shadow`, `shadow_of` the live id, the candidate's model, deployment,
licence and origin, its usage and latency, and its answer (a JSON body, redacted in the writer's thread
like every answer) or how it failed; no request (the live record holds it). It goes through the capture
writer's bounded queue like any record, so the sink never waits.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.capture.records import CaptureRecord
from gateway.capture.writer import CaptureWriter, PendingCapture
from gateway.context import RequestContext
from gateway.contracts import ShadowFailure
from gateway.policy.index import Target
from gateway.telemetry import Metrics
from gateway.upstream.wire import Usage

SHADOW_SUFFIX = ":shadow"


def shadow_request_id(live_request_id: str) -> str:
    return live_request_id + SHADOW_SUFFIX


class CaptureShadowSink:
    def __init__(self, writer: CaptureWriter, metrics: Metrics, policy_version: Callable[[], str]) -> None:
        self.writer = writer
        self.metrics = metrics
        # The policy in force (a reload may change it between the live answer and its copy's).
        self.policy_version = policy_version

    def record(
        self, live: RequestContext, target: Target, answer: bytes | ShadowFailure, latency_s: float, usage: Usage | None
    ) -> None:
        route = live.route.name if live.route is not None else live.route_name
        m = self.metrics
        captured = live.capture
        principal = live.principal
        if captured is None or principal is None or not self.writer.enabled:
            m.child(m.shadow_captures, route, "no_consent").inc()
            return
        consent = captured.consent
        settings = consent.settings
        licence = target.model.licence_terms
        origin = target.origin
        record = CaptureRecord(
            request_id=shadow_request_id(live.request_id),
            # The live request's start, so a window that holds the live record holds its copy.
            ts_ms=int((time.time() - (time.perf_counter() - live.started)) * 1000),
            tenant=principal.tenant,
            key_id=principal.key_id,
            route=route,
            operation=live.operation,
            protocol=live.protocol,
            status=(answer.status or 0) if isinstance(answer, ShadowFailure) else 200,
            outcome=answer.outcome if isinstance(answer, ShadowFailure) else "completed",
            model=target.model.name,
            deployment=target.label,
            backend=target.backend.name,
            licence=licence.name if licence is not None else None,
            licence_outputs_train=licence.outputs_train if licence is not None else None,
            origin_developer=origin.developer if origin is not None else None,
            origin_country=origin.country if origin is not None else None,
            policy_version=self.policy_version(),
            decision_id=live.decision_id,
            prompt_tokens=usage.prompt_tokens if usage is not None else None,
            completion_tokens=usage.completion_tokens if usage is not None else None,
            latency_ms=round(latency_s * 1000, 3),
            consent_training=settings.training,
            include=settings.include,
            redacted_with=settings.redact,
            shadow_of=live.request_id,
        )
        queued = self.writer.submit(
            PendingCapture(
                build=lambda: record,
                request=None,
                redactor=consent.redactor,
                body=answer if isinstance(answer, bytes) else None,
            )
        )
        m.child(m.shadow_captures, route, "queued" if queued else "dropped").inc()
