"""OpenTelemetry traces: off unless the standard OTEL_* variables ask for them.

On when `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` is set (or
`OTEL_TRACES_EXPORTER=otlp`), and off with `OTEL_TRACES_EXPORTER=none`. The OTLP/HTTP protobuf exporter
ships with Strait (`OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf`, the default; gRPC is not bundled and is
refused at start-up rather than silently ignored). The SDK itself reads the rest: endpoint, headers,
timeout, compression, `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`, `OTEL_RESOURCE_ATTRIBUTES`.
`OTEL_SERVICE_NAME` defaults to `strait`.

No global provider is installed (no module globals): the app owns one `Tracing` and shuts it down, so
spans still batched are exported on a graceful stop. Spans are exported from the SDK's own worker
thread, never from the event loop. W3C `traceparent` is continued from the client and propagated to
upstreams (`extract` / `inject`).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING

from opentelemetry.context import Context
from opentelemetry.trace import Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

_PROPAGATOR = TraceContextTextMapPropagator()


class TracingConfigError(ValueError):
    """The OTEL_* variables ask for something Strait cannot do (refused at start-up)."""


class Tracing:
    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer: Tracer = provider.get_tracer("strait")

    @staticmethod
    def extract(headers: Mapping[str, str]) -> Context:
        """The client's trace context (`traceparent`, `tracestate`), or an empty one."""
        return _PROPAGATOR.extract(headers)

    @staticmethod
    def inject(headers: MutableMapping[str, str], context: Context | None = None) -> None:
        """Add `traceparent` (and `tracestate`) for the current span to an upstream request's headers."""
        _PROPAGATOR.inject(headers, context=context)

    def shutdown(self) -> None:
        self.provider.shutdown()


def tracing_from_env(environ: Mapping[str, str], *, exporter: SpanExporter | None = None) -> Tracing | None:
    """A `Tracing` if the environment configures traces, else None (the default: no cost at all)."""
    chosen = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if chosen not in ("", "otlp", "none"):
        raise TracingConfigError(f"OTEL_TRACES_EXPORTER={chosen!r}: only 'otlp' (or 'none') is supported")
    if chosen == "none" or (not endpoint and chosen != "otlp" and exporter is None):
        return None
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or ""
    ).strip()
    if protocol not in ("", "http/protobuf"):
        raise TracingConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: only 'http/protobuf' is bundled")
    # Imported only when traces are on: the SDK, the exporter and protobuf are ~10 MB resident that an
    # untraced gateway never needs.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": environ.get("OTEL_SERVICE_NAME") or "strait"})
    provider = TracerProvider(resource=resource)
    if exporter is None:
        # The traces endpoint is a whole URL; the generic one is a base that /v1/traces is added to.
        traces = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        url = traces or (base.rstrip("/") + "/v1/traces" if base else None)
        exporter = OTLPSpanExporter(endpoint=url)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracing(provider)
