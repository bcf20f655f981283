"""`POST /v1/feedback`: a signal on one of the tenant's captured requests (README "The learning loop").

    {"request_id": "req_...", "value": 7, "weight": 1, "metadata": {"source": "thumbs"}}
    {"trace_id": "<the client's own x-request-id>", "value": true}
    {"request_id": "req_...", "correction": "the answer as it should have been"}

`request_id` is the gateway's id (`x-strait-request-id` on every answer, and `x-request-id` unless the
client sent its own); failing that, the client's own `x-request-id`, as `trace_id` is. `value` is a
score in -10..10, a boolean (stored as 1 / -1) or a label (1-64 characters); `correction` an edited
answer (redacted like every captured text, with the tenant's redactors, as are labels and metadata
values). At least one of the two. A capture store that cannot be reached is a 503 `capture_unavailable`.

Authorised by the tenant's key: the request must be one of *its* captures, else 404 (an unknown id and
another tenant's are indistinguishable). Behind a load balancer the answer may have come from another
replica whose capture writer has not landed it yet: a capture not found at once is looked up again for
about a second (SHARED_STORE_WAITS_S) before the 404. Bounded: the body (FEEDBACK_MAX_BYTES), every string, the
metadata (16 entries). Stored in the capture store, beside the record (gateway.capture).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, post
from litestar.handlers import HTTPRouteHandler

from gateway.capture.records import Feedback, FeedbackKind
from gateway.capture.redact import redactor_for
from gateway.capture.writer import CaptureWriter, feedback_id
from gateway.errors import GatewayError, InvalidRequest, NotFound, PayloadTooLarge
from gateway.policy.model import BUILTIN_REDACTIONS
from gateway.reply import JSON
from gateway.runtime import Gateway

FEEDBACK_MAX_BYTES = 128 * 1024
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Score = Annotated[float, msgspec.Meta(ge=-10, le=10)]
Label = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
MetaKey = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
MetaValue = Annotated[str, msgspec.Meta(max_length=512)]


class FeedbackBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    request_id: Id | None = None
    trace_id: Id | None = None
    value: bool | Score | Label | None = None
    weight: Annotated[float, msgspec.Meta(ge=0, le=1000)] = 1.0
    metadata: Annotated[dict[MetaKey, MetaValue], msgspec.Meta(max_length=16)] | None = None
    correction: Annotated[str, msgspec.Meta(min_length=1, max_length=64 * 1024)] | None = None


_decode = msgspec.json.Decoder(FeedbackBody).decode
log = logging.getLogger("strait.capture")


class CaptureDown(GatewayError):
    status = 503
    type = "server_error"
    code = "capture_unavailable"


def _parse(body: bytes) -> FeedbackBody:
    try:
        fb = _decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise InvalidRequest(f"Invalid feedback body: {exc}") from None
    if (fb.request_id is None) == (fb.trace_id is None):
        raise InvalidRequest("Name the request with exactly one of `request_id` or `trace_id`.", param="request_id")
    if fb.value is None and fb.correction is None:
        raise InvalidRequest("Give a `value` (-10..10, a boolean or a label) or a `correction`.", param="value")
    return fb


def _kind(fb: FeedbackBody) -> tuple[FeedbackKind, float | None, str | None]:
    """(kind, score, label): a correction's kind wins; its value, if any, is kept beside it."""
    value = fb.value
    score = label = None
    kind: FeedbackKind
    if isinstance(value, bool):
        kind, score = "boolean", 1.0 if value else -1.0
    elif isinstance(value, float | int):
        kind, score = "score", float(value)
    elif isinstance(value, str):
        kind, label = "label", value
    else:
        kind = "correction"
    return ("correction" if fb.correction is not None else kind), score, label


# After this replica's own queue is written, how long a feedback keeps looking for its capture, and the pauses
# between lookups: the answer may have come from another replica whose writer lands its batch every
# flush_every_s (50 ms by default), or a little later under load. An id that never turns up is a 404
# after about a second, whatever its source.
SHARED_STORE_WAITS_S = (0.05, 0.1, 0.2, 0.3, 0.35)
# Feedback lookups waiting that way at once in this process: past it a capture not found is a 404 at once,
# so ids that will never be found (a client's typo, or a flood of them) cannot pile up store queries.
MAX_WAITING_LOOKUPS = 16
_waiting = 0


async def _resolve(
    writer: CaptureWriter | None,
    tenant: str,
    *,
    request_id: str | None = None,
    client_id: str | None = None,
    response_id: str | None = None,
    waits: tuple[float, ...] = (),
) -> str | None:
    """The tenant's capture a feedback names. A client may rate an answer the moment it has it, before
    the writer's batch landed: when it is not found, what this replica has queued (or is writing) is
    written first and it is looked up again; then once after each of `waits` (another replica's batch)."""
    if writer is None or not writer.enabled:
        return None
    global _waiting
    if waits and _waiting >= MAX_WAITING_LOOKUPS:
        waits = ()
    if waits:
        _waiting += 1
    try:
        return await _look_up(writer, tenant, request_id, client_id, response_id, waits)
    finally:
        if waits:
            _waiting -= 1


async def _look_up(
    writer: CaptureWriter,
    tenant: str,
    request_id: str | None,
    client_id: str | None,
    response_id: str | None,
    waits: tuple[float, ...],
) -> str | None:
    for attempt in range(2 + len(waits)):
        store = await writer.existing_store()
        if store is not None:
            found = await store.resolve(tenant, request_id=request_id, client_id=client_id, response_id=response_id)
            if found is not None:
                return found
        if attempt == 0:
            await writer.flush()
        elif attempt - 1 < len(waits):
            await asyncio.sleep(waits[attempt - 1])
    return None


async def record_bad_hit(gateway: Gateway, tenant: str, key_id: str, response_id: str, reason: str | None) -> bool:
    """Implicit feedback: a cached answer reported wrong (POST /v1/cache/feedback, by the id it was served
    with) is a `cache_bad_hit` on the captured request it answered, when that one was captured. Its
    reason, redacted, is kept in the metadata. Whether one was recorded."""
    writer = gateway.services.capture
    try:
        request_id = await _resolve(writer, tenant, response_id=response_id)
    except Exception:  # the cache's report stands without it
        log.exception("capture: the bad-hit report could not be looked up")
        return False
    if request_id is None or writer is None:
        return False
    found = gateway.runtime.index.tenants.get(tenant)
    redactor = redactor_for(found.capture.redact if found is not None else BUILTIN_REDACTIONS)
    metadata = {"reason": await asyncio.to_thread(redactor.redact, reason[:512])} if reason else {}
    try:
        await writer.add_feedback(
            Feedback(
                id=feedback_id(),
                request_id=request_id,
                tenant=tenant,
                ts_ms=int(time.time() * 1000),
                kind="cache_bad_hit",
                metadata=metadata,
                key_id=key_id,
            )
        )
    except Exception:
        log.exception("capture: the bad-hit report could not be recorded")
        return False
    return True


def build_feedback_handlers(gateway: Gateway, id_headers_of: Any, headers_of: Any) -> list[HTTPRouteHandler]:
    @post("/v1/feedback", status_code=200)
    async def feedback(request: Request[Any, Any, Any]) -> Response[bytes]:
        runtime = gateway.runtime
        principal = runtime.auth.authenticate(headers_of(request.scope))
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > FEEDBACK_MAX_BYTES:
                raise PayloadTooLarge(f"A feedback body is at most {FEEDBACK_MAX_BYTES} bytes.")
        fb = _parse(bytes(body))
        named = fb.request_id or fb.trace_id
        writer = gateway.services.capture
        try:
            request_id = await _resolve(
                writer,
                principal.tenant,
                request_id=fb.request_id,
                client_id=fb.trace_id or fb.request_id,
                waits=SHARED_STORE_WAITS_S,
            )
        except Exception:
            log.exception("capture: feedback lookup failed")
            raise CaptureDown("Feedback cannot be recorded right now; retry later.") from None
        if request_id is None or writer is None:
            raise NotFound(f"No captured request '{named}' for your tenant.", param="request_id")
        kind, score, label = _kind(fb)
        tenant = runtime.index.tenants.get(principal.tenant)
        redactor = redactor_for(tenant.capture.redact if tenant is not None else BUILTIN_REDACTIONS)
        correction, metadata, label = await asyncio.to_thread(
            lambda: (
                redactor.redact(fb.correction) if fb.correction is not None else None,
                {k: redactor.redact(v) for k, v in (fb.metadata or {}).items()},
                redactor.redact(label) if label is not None else None,
            )
        )
        record = Feedback(
            id=feedback_id(),
            request_id=request_id,
            tenant=principal.tenant,
            ts_ms=int(time.time() * 1000),
            kind=kind,
            score=score,
            label=label,
            correction=correction,
            weight=fb.weight,
            metadata=metadata,
            key_id=principal.key_id,
        )
        try:
            await writer.add_feedback(record)
        except Exception:
            log.exception("capture: feedback could not be written")
            raise CaptureDown("Feedback cannot be recorded right now; retry later.") from None
        out = {"object": "feedback", "id": record.id, "request_id": request_id, "kind": kind, "recorded": True}
        return Response(msgspec.json.encode(out), media_type=JSON, headers=id_headers_of(request.scope))

    return [feedback]
