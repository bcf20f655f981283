"""The request's spans: one SERVER span per request (continuing the client's `traceparent`), a child per
stage, a CLIENT span per upstream attempt, with the OpenTelemetry GenAI semantic-convention attributes
and Strait's own. Only used when tracing is configured (`gateway.tracing`); no prompt or completion text
and never a key goes into a span. The request's span ends in its tap (`SpanTap`, the last of the
pipeline's taps: after accounting, so it reports the tokens charged), a stream's when it is over.
"""

from __future__ import annotations

from opentelemetry.trace import Span, SpanKind, Status, StatusCode, set_span_in_context

from gateway.context import RequestContext
from gateway.contracts import End
from gateway.relay import EndTap
from gateway.tracing import Tracing

# gen_ai.operation.name values (semantic conventions) for Strait's operations.
OPERATION = {"chat": "chat", "completions": "text_completion", "embeddings": "embeddings"}


def start_request_span(tracing: Tracing, ctx: RequestContext) -> Span:
    parent = Tracing.extract(ctx.headers)
    span = tracing.tracer.start_span(
        OPERATION.get(ctx.operation, ctx.operation),
        kind=SpanKind.SERVER,
        context=parent,
        attributes={
            "gen_ai.operation.name": OPERATION.get(ctx.operation, ctx.operation),
            "strait.request_id": ctx.request_id,
        },
    )
    ctx.span = span
    return span


def start_attempt_span(tracing: Tracing, ctx: RequestContext, upstream_model: str, backend: str, adapter: str) -> Span:
    assert ctx.span is not None
    op = OPERATION.get(ctx.operation, ctx.operation)
    return tracing.tracer.start_span(
        f"{op} {upstream_model}",
        kind=SpanKind.CLIENT,
        context=set_span_in_context(ctx.span),
        attributes={
            "gen_ai.operation.name": op,
            "gen_ai.provider.name": adapter,
            "gen_ai.request.model": upstream_model,
            "strait.backend": backend,
        },
    )


def end_request_span(ctx: RequestContext, status: int, *, error: str | None = None) -> None:
    """Annotate and end the request's span (once: later calls do nothing)."""
    span = ctx.span
    if span is None:
        return
    ctx.span = None
    span.set_attribute("http.response.status_code", status)
    # What the client asked for, bounded: for a refused request it is the client's own string.
    span.set_attribute("gen_ai.request.model", ctx.route_name[:128])
    if ctx.route is not None:
        span.set_attribute("strait.route", ctx.route.name)
    if ctx.principal is not None:
        span.set_attribute("strait.tenant", ctx.principal.tenant)
    if ctx.decision_id:
        span.set_attribute("strait.decision", ctx.decision_id)
    if ctx.target is not None:
        span.set_attribute("strait.deployment", ctx.target.label)
        span.set_attribute("gen_ai.response.model", ctx.target.deployment.upstream_model)
    span.set_attribute("strait.fallback", len(ctx.failed_attempts) + len(ctx.continued))
    cache = ctx.extra_headers.get("x-strait-cache")
    if cache is not None:
        span.set_attribute("strait.cache", cache)
    if ctx.usage_in is not None:
        span.set_attribute("gen_ai.usage.input_tokens", ctx.usage_in)
    if ctx.usage_out is not None:
        span.set_attribute("gen_ai.usage.output_tokens", ctx.usage_out)
    if ctx.ttft_s is not None:
        span.set_attribute("strait.time_to_first_chunk_ms", round(ctx.ttft_s * 1000, 3))
    if status >= 500 or error is not None:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end()


class SpanTap(EndTap):
    """Ends the request's span with the answer (accounting, an earlier tap, set the tokens it charged)."""

    def on_end(self, ctx: RequestContext, end: End) -> None:
        if ctx.span is not None:
            ctx.ttft_s = end.ttft_s
            end_request_span(ctx, end.status, error=end.error.code if end.error is not None else None)
