"""Tap `capture` (gateway.contracts.Tap): a consenting tenant's answered requests, handed to the capture
writer (gateway.capture.writer) when they end, never written on the request's time.

Consent is the tenant's `capture` policy (off by default): `enabled`, then `sample_rate` (decided once
per request, at random). A request opts out with `x-strait-capture: off`; no header opts a request in.
Embeddings are never captured. The pipeline holds this tap only when some tenant of the policy
captures (gateway.runtime), so a policy without consent pays nothing at all.

Per request the tap only collects references: the request's context and End, the JSON answer's bytes
(`ctx.answer_body`, set by the pipeline) or the stream's chunk payloads (appended as they are relayed,
up to MAX_STREAM_BYTES), and the clock at the end. The record itself (its fields, redaction, assembly,
JSON) is built by the writer, off the request path, before anything is written.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from functools import partial

from gateway.capture.records import CaptureRecord
from gateway.capture.redact import redactor_for
from gateway.capture.writer import CaptureWriter, PendingCapture
from gateway.context import RequestContext
from gateway.contracts import End, TextRedactor
from gateway.policy.index import PolicyIndex
from gateway.policy.model import CaptureSettings

OPT_OUT_HEADER = "x-strait-capture"
TAGS_HEADER = "x-strait-tags"
# A stream's chunks kept for its capture, at most (beyond: the answer is marked truncated).
MAX_STREAM_BYTES = 4 * 1024 * 1024


@dataclass(slots=True)
class _Consent:
    settings: CaptureSettings
    redactor: TextRedactor


class StreamCapture:
    """A captured stream's chunk payloads, as relayed (ctx.capture)."""

    __slots__ = ("consent", "events", "size", "truncated")

    def __init__(self, consent: _Consent) -> None:
        self.consent = consent
        self.events: list[bytes] = []
        self.size = 0
        self.truncated = False


def captures_any(index: PolicyIndex) -> bool:
    return any(t.capture.enabled for t in index.policy.tenants)


class CaptureTap:
    name = "capture"

    def __init__(self, index: PolicyIndex, writer: CaptureWriter, rand: random.Random | None = None) -> None:
        self.writer = writer
        self.version = index.version
        self._random = (rand or random.Random()).random
        # Built once per policy: each consenting tenant's settings and redactor chain.
        self._tenants = {
            t.name: _Consent(t.capture, redactor_for(t.capture.redact))
            for t in index.policy.tenants
            if t.capture.enabled
        }

    def _consent(self, ctx: RequestContext) -> _Consent | None:
        principal = ctx.principal
        if principal is None or ctx.operation == "embeddings":
            return None
        consent = self._tenants.get(principal.tenant)
        if consent is None:
            return None
        opt_out = ctx.headers.get(OPT_OUT_HEADER)
        if opt_out is not None and opt_out.strip().lower() in ("off", "0", "false", "no"):
            return None
        rate = consent.settings.sample_rate
        if rate < 1.0 and self._random() >= rate:
            return None
        return consent

    def _record(
        self, ctx: RequestContext, end: End, settings: CaptureSettings, wall: float, now: float
    ) -> CaptureRecord:
        """The record's fields (no texts), built in the writer's thread from what the request left: the
        context is not written to once the request has ended (but for the usage a deferred count sets)."""
        principal = ctx.principal
        assert principal is not None
        target = ctx.target
        model = target.model if target is not None else None
        licence = model.licence_terms if model is not None else None
        origin = target.origin if target is not None else None
        elapsed = now - ctx.started
        return CaptureRecord(
            request_id=ctx.request_id,
            ts_ms=int((wall - elapsed) * 1000),
            tenant=principal.tenant,
            key_id=principal.key_id,
            route=ctx.route.name if ctx.route is not None else ctx.route_name,
            operation=ctx.operation,
            protocol=ctx.protocol,
            status=end.status,
            outcome=end.outcome,
            client_request_id=ctx.client_request_id,
            model=model.name if model is not None else None,
            deployment=target.label if target is not None else None,
            backend=target.backend.name if target is not None else None,
            licence=licence.name if licence is not None else None,
            licence_outputs_train=licence.outputs_train if licence is not None else None,
            origin_developer=origin.developer if origin is not None else None,
            origin_country=origin.country if origin is not None else None,
            policy_version=self.version,
            decision_id=ctx.decision_id,
            partial=end.partial,
            cache=end.cache,
            prompt_tokens=ctx.usage_in,
            completion_tokens=ctx.usage_out,
            latency_ms=round(elapsed * 1000, 3),
            ttft_ms=None if end.ttft_s is None else round(end.ttft_s * 1000, 3),
            consent_training=settings.training,
            include=settings.include,
            redacted_with=settings.redact,
        )

    def on_start(self, ctx: RequestContext) -> None:
        consent = self._consent(ctx)
        if consent is not None:
            ctx.capture = StreamCapture(consent)

    def on_event(self, ctx: RequestContext, event: bytes) -> None:
        capture = ctx.capture
        if capture is None or capture.truncated:
            return
        capture.size += len(event)
        if capture.size > MAX_STREAM_BYTES:
            capture.truncated = True
            return
        capture.events.append(event)

    def on_end(self, ctx: RequestContext, end: End) -> None:
        stream = ctx.capture
        if end.stream:
            if stream is None:
                return
            consent = stream.consent
        else:
            found = self._consent(ctx)
            if found is None:
                return
            consent = found
            # Marks the request as captured, with this consent: a shadow copy of it is stored only then.
            ctx.capture = StreamCapture(consent)
        settings = consent.settings
        self.writer.submit(
            PendingCapture(
                build=partial(self._record, ctx, end, settings, time.time(), time.perf_counter()),
                request=ctx.request,
                redactor=consent.redactor,
                body=None if end.stream else ctx.answer_body,
                events=stream.events if stream is not None else None,
                truncated=stream.truncated if stream is not None else False,
                tags=ctx.headers.get(TAGS_HEADER),
                regenerate_window_s=settings.regenerate_window_s,
            )
        )
