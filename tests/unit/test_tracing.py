"""Tracing configuration from OTEL_* variables, exported through the real OTLP/HTTP exporter to a real
OTLP/HTTP receiver (decoded with opentelemetry-proto)."""

from __future__ import annotations

import pytest
from opentelemetry.trace import SpanKind

from gateway.tracing import Tracing, TracingConfigError, tracing_from_env
from tests.harness.otlp_receiver import OtlpReceiver


def test_off_unless_configured() -> None:
    assert tracing_from_env({}) is None
    assert tracing_from_env({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"}) is None
    with pytest.raises(TracingConfigError):
        tracing_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    with pytest.raises(TracingConfigError):
        tracing_from_env({"OTEL_TRACES_EXPORTER": "zipkin"})


def test_spans_reach_a_real_receiver_and_the_client_trace_is_continued() -> None:
    with OtlpReceiver() as receiver:
        tracing = tracing_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_SERVICE_NAME": "gw"})
        assert isinstance(tracing, Tracing)
        parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        context = Tracing.extract({"traceparent": parent})
        with tracing.tracer.start_as_current_span("chat", kind=SpanKind.SERVER, context=context) as span:
            span.set_attribute("gen_ai.operation.name", "chat")
            upstream: dict[str, str] = {}
            Tracing.inject(upstream)
        tracing.shutdown()  # flushes the batch
        spans = receiver.snapshot()
    assert [s.name for s in spans] == ["chat"]
    (s,) = spans
    assert s.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736" and s.parent_id == "00f067aa0ba902b7"
    assert s.service == "gw" and s.attributes["gen_ai.operation.name"] == "chat"
    assert upstream["traceparent"].split("-")[1] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert upstream["traceparent"].split("-")[2] == s.span_id
