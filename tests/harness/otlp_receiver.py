"""A real OTLP/HTTP trace receiver for tests: POST /v1/traces with an `ExportTraceServiceRequest`
protobuf body (what the OpenTelemetry SDK's OTLP/HTTP exporter sends), decoded with `opentelemetry-proto`
and kept in memory. Runs in a thread of the test process on a free loopback port; stopped by `close()`."""

from __future__ import annotations

import gzip
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class Span:
    def __init__(self, raw: Any, service: str) -> None:
        self.name: str = raw.name
        self.trace_id = raw.trace_id.hex()
        self.span_id = raw.span_id.hex()
        self.parent_id = raw.parent_span_id.hex()
        self.kind: int = raw.kind
        self.start_ns: int = raw.start_time_unix_nano
        self.end_ns: int = raw.end_time_unix_nano
        self.attributes = {a.key: _value(a.value) for a in raw.attributes}
        self.events = [e.name for e in raw.events]
        self.status_code: int = raw.status.code
        self.service = service


class OtlpReceiver:
    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.requests = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                request = ExportTraceServiceRequest.FromString(body)
                with receiver._lock:
                    receiver.requests += 1
                    for rs in request.resource_spans:
                        attrs = {a.key: _value(a.value) for a in rs.resource.attributes}
                        service = str(attrs.get("service.name", ""))
                        for ss in rs.scope_spans:
                            receiver.spans.extend(Span(s, service) for s in ss.spans)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def snapshot(self) -> list[Span]:
        with self._lock:
            return list(self.spans)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> OtlpReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
