"""Turns an upstream's answer into the client's response: JSON as is, or a relayed SSE stream.

Streams are relayed event by event, never buffered: the usage chunk Strait always asks for is dropped
when the client did not ask for it, a mid-stream upstream failure becomes an error event without
`[DONE]` (so the SDK raises instead of returning a silently truncated answer), and the upstream
connection is closed in every case, including a client that went away.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence

import anyio
import msgspec

from gateway.accounting.meter import StreamMeter, decode_stream_chunk
from gateway.context import RequestContext
from gateway.contracts import UpstreamResponse, UpstreamStreamBroken
from gateway.errors import ErrorBody, ErrorEnvelope
from gateway.reply import Reply, id_headers
from gateway.spans import end_request_span
from gateway.stages.accounting import AccountingStage
from gateway.telemetry import Metrics
from gateway.tokens import FALLBACK_ENCODING
from gateway.upstream.normalize import upstream_error
from gateway.upstream.signals import LiveSignals
from gateway.upstream.sse import DONE_EVENT, encode_event
from gateway.upstream.wire import UpstreamErrorBody, Usage, UsageProbe

log = logging.getLogger("strait.relay")

_probe_chunk = decode_stream_chunk
_probe_usage = msgspec.json.Decoder(UsageProbe).decode


def response_headers(ctx: RequestContext) -> dict[str, str]:
    headers = {**id_headers(ctx.request_id, ctx.client_request_id), **ctx.extra_headers}
    if ctx.route is not None:
        headers["x-strait-route"] = ctx.route.name
    if ctx.target is not None:
        headers["x-strait-deployment"] = ctx.target.label
    if ctx.decision_id:
        headers["x-strait-decision"] = ctx.decision_id
    return headers


def finish(
    accounting: AccountingStage,
    ctx: RequestContext,
    *,
    status: int,
    usage: Usage | None,
    produced: Sequence[bytes] = (),
    estimated_completion: int | None = None,
    partial: bool = False,
    ttft_s: float | None = None,
) -> None:
    """The one place a request that reached an upstream is accounted (records written, reservation
    released): the JSON path, the upstream-error path, the dispatch-failure path and the stream
    relay's `finally` all end here, so a request is accounted exactly once, whichever way it ends."""
    prompt, completion = accounting.complete(
        ctx,
        status=status,
        usage=usage,
        produced=produced,
        estimated_completion=estimated_completion,
        partial=partial,
        ttft_s=ttft_s,
    )
    if ctx.span is not None:
        # Tracing on: the request's span reports exactly what was charged and ends with the answer.
        ctx.usage_in, ctx.usage_out, ctx.ttft_s = prompt, completion, ttft_s
        end_request_span(ctx, status)


def _count_usage(metrics: Metrics, route: str, usage: Usage | None) -> None:
    if usage is not None:
        metrics.child(metrics.tokens, route, "prompt").inc(usage.prompt_tokens)
        metrics.child(metrics.tokens, route, "completion").inc(usage.completion_tokens)


def respond(
    ctx: RequestContext,
    upstream: UpstreamResponse,
    metrics: Metrics,
    signals: LiveSignals,
    accounting: AccountingStage,
) -> Reply:
    route = ctx.route_name
    headers = response_headers(ctx)
    if not 200 <= upstream.status < 300:
        error = upstream_error(upstream.status, upstream.body, upstream.headers, ctx.redact)
        metrics.child(metrics.requests, route, str(error.status)).inc()
        # A 3xx is recorded as the 502 the client got: nothing was produced, nothing is charged.
        finish(accounting, ctx, status=upstream.status if upstream.status >= 400 else error.status, usage=None)
        return Reply(status=error.status, headers={**headers, **error.headers}, body=error.body())
    metrics.child(metrics.latency, route).observe(time.perf_counter() - ctx.started)
    if upstream.events is None:
        metrics.child(metrics.requests, route, str(upstream.status)).inc()
        usage: Usage | None = None
        try:
            usage = _probe_usage(upstream.body).usage
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.warning("upstream %s returned a body without readable usage", ctx.target.label if ctx.target else "?")
        _count_usage(metrics, route, usage)
        produced = (upstream.body,) if usage is None and ctx.operation != "embeddings" else ()
        finish(accounting, ctx, status=upstream.status, usage=usage, produced=produced)
        return Reply(status=upstream.status, headers=headers, body=upstream.body)
    metrics.child(metrics.requests, route, "200").inc()
    headers["cache-control"] = "no-cache"
    headers["x-accel-buffering"] = "no"
    relay = _relay(ctx, upstream, metrics, signals, accounting)
    return Reply(status=200, headers=headers, stream=relay, media_type="text/event-stream")


class _Head(msgspec.Struct):
    id: str | None = None
    object: str | None = None
    created: int | None = None
    model: str | None = None


def _usage_chunk(ctx: RequestContext, last: bytes, completion: int) -> bytes:
    assert ctx.target is not None
    try:
        head = msgspec.json.decode(last, type=_Head)
    except (msgspec.DecodeError, msgspec.ValidationError):
        head = _Head()
    prompt = ctx.prompt_tokens.count_now()  # the upstream reported no usage: estimated
    usage = Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
    chunk = {
        "id": head.id or f"chatcmpl-{ctx.request_id}",
        "object": head.object or "chat.completion.chunk",
        "created": head.created or int(time.time()),
        "model": head.model or ctx.target.deployment.upstream_model,
        "choices": [],
        "usage": usage,
    }
    return msgspec.json.encode(chunk)


def _error_event(message: str, type_: str, code: str | None) -> bytes:
    return encode_event(msgspec.json.encode(ErrorEnvelope(ErrorBody(message=message, type=type_, code=code))))


async def _relay(
    ctx: RequestContext,
    upstream: UpstreamResponse,
    metrics: Metrics,
    signals: LiveSignals,
    accounting: AccountingStage,
) -> AsyncIterator[bytes]:
    assert upstream.events is not None
    include_usage = ctx.include_usage
    usage: Usage | None = None
    # What the upstream produced, counted as it goes (O(1) held); used only if no usage arrives.
    meter = StreamMeter(ctx.target.model.tokenizer if ctx.target is not None else FALLBACK_ENCODING)
    ttft: float | None = None
    complete = False
    status = 200
    # The stream's last event: [DONE] on success, else an error event (so the SDK raises).
    final = DONE_EVENT
    try:
        async for payload in upstream.events:
            if ttft is None:
                ttft = time.perf_counter() - ctx.started
                ctx.lease_renewed = time.monotonic()
                metrics.child(metrics.ttft, ctx.route_name).observe(ttft)
            elif ctx.ticket is not None:
                accounting.keepalive(ctx, time.monotonic())
            try:
                probe = _probe_chunk(payload)
            except (msgspec.DecodeError, msgspec.ValidationError):
                status = 502
                final = _error_event("The upstream sent an invalid stream event.", "server_error", "upstream_bad_event")
                break
            meter.add(probe, payload)
            if probe.error is not None:
                err = (
                    probe.error
                    if isinstance(probe.error, UpstreamErrorBody)
                    else UpstreamErrorBody(message=probe.error)
                )
                code = err.code if isinstance(err.code, str) else None
                status = 502
                # Redacted like any upstream error text: no secret, host, address or path reaches the client.
                message, type_ = ctx.redact(err.message or ""), ctx.redact(err.type or "")
                code = ctx.redact.optional(code)
                final = _error_event(message or "The upstream failed mid-stream.", type_ or "server_error", code)
                break
            if probe.usage is not None:
                usage = probe.usage
                if not include_usage and probe.choices is not None and not probe.choices:
                    continue
            yield encode_event(payload)
        else:
            complete = True
            if include_usage and usage is None and meter.last is not None and ctx.target is not None:
                # The client asked for usage and this upstream sent none (llama-cpp-python, older servers):
                # add the chunk OpenAI would have sent, counted with tiktoken.
                yield encode_event(_usage_chunk(ctx, meter.last, meter.tokens()))
    except UpstreamStreamBroken as exc:
        log.warning("request %s: %s", ctx.request_id, exc)
        status = 502
        final = _error_event(exc.client_message, "server_error", exc.code)
    finally:
        # Runs exactly once, whether the stream ended, failed, or the client left (then the code after
        # this block never runs: the generator is being closed).
        if not complete and upstream.drain is not None:
            # Left early or failed: what the upstream already sent is charged too, not only what was
            # relayed (a usage chunk among it wins, as it would have).
            usage = _drained(upstream.drain(), meter, usage)
        if upstream.close is not None:
            # Shielded: a client that went away cancels this task, and the upstream must still be closed
            # (so the engine stops generating for nobody).
            with anyio.CancelScope(shield=True):
                await upstream.close()
        if ctx.target is not None:
            signals.finished(ctx.target.backend.name)
        _count_usage(metrics, ctx.route_name, usage)
        # Not complete: the client left or the upstream failed; charge what the upstream produced.
        finish(
            accounting,
            ctx,
            status=status,
            usage=usage,
            estimated_completion=meter.tokens() if usage is None else None,
            partial=not complete,
            ttft_s=ttft,
        )
    # The concurrency slots are free before the client sees the end, so its next request finds them so.
    if ctx.settling is not None:
        await asyncio.shield(ctx.settling)
    yield final


def _drained(events: list[bytes], meter: StreamMeter, usage: Usage | None) -> Usage | None:
    for payload in events:
        try:
            probe = _probe_chunk(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        meter.add(probe, payload)
        if probe.usage is not None:
            usage = probe.usage
    return usage
