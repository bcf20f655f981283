"""Process settings, read once from the environment into a frozen Struct (policy is separate: a file)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from gateway.capture.store import check_capture_url

AsgiServer = Literal["uvicorn", "granian"]


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    policy_path: str = "policies/demo.yaml"
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    # `memory` (in-process, one replica: the embedded default), redis://, rediss:// or redis+cluster://.
    state: str = "memory"
    log_level: str = "WARNING"
    # The process log (not the access log): classic text lines, or one JSON object per line.
    log_format: Literal["text", "json"] = "text"
    # Where cached answers live: `memory`, redis://, rediss:// or redis+cluster://. Unset: the state's Redis (its own key
    # space) or memory. Production: a Redis of its own with maxmemory + allkeys-lru (docker/compose.yaml),
    # so cache entries can never evict limiter or ledger state.
    cache: str | None = None
    # How many gateway processes share the state (sizes budget fallbacks; `memory` refuses more than 1).
    replicas: int = 1
    # Bound on every state-store call on the request path (ms): a down or frozen Redis costs at most this
    # (then the breaker skips Redis). Event-loop lag counts against it, so a busy replica needs headroom.
    state_timeout_ms: int = 250
    # Where usage records wait while the ledger is unreachable (one spool per replica).
    spool_dir: str = ".strait/spool"
    # The ASGI server behind `strait serve`, chosen by measurement (loadtest/README.md).
    server: AsgiServer = "uvicorn"
    # When set, GET /metrics requires `Authorization: Bearer <token>` (compared in constant time);
    # unset (or empty) leaves it open, as Prometheus scrapers expect by default.
    metrics_token: str | None = None

    # Inbound limits (README "Inbound limits"): what a client may send before Strait refuses it.
    # Request line + header block, in bytes, and the number of header lines (431 beyond; uvicorn only).
    max_header_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 32 * 1024
    max_header_count: Annotated[int, msgspec.Meta(ge=1)] = 100
    # From the connection's (or the request's) first byte to the end of its header block (408, closed).
    header_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    # Reading a request body: longest wait for the next chunk, and for the whole body (408, closed).
    body_idle_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    body_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 120.0
    # Deepest nesting of arrays/objects in a JSON body (400 beyond, before anything recursive runs).
    max_json_depth: Annotated[int, msgspec.Meta(ge=2, le=256)] = 64
    # Largest `max_tokens` / `max_completion_tokens` accepted (400 beyond).
    max_output_tokens: Annotated[int, msgspec.Meta(ge=1, le=50_000_000)] = 1_000_000
    # Open connections + running requests per worker before new requests get 503 (0: no limit).
    max_connections: Annotated[int, msgspec.Meta(ge=0)] = 0
    # SIGTERM: how long in-flight requests and streams get to finish before each is ended with an error
    # (a stream: an in-band error event). Keep the orchestrator's kill timeout above it plus a few seconds
    # (Kubernetes' terminationGracePeriodSeconds is 30 by default; docker/compose.yaml sets 30 s).
    shutdown_grace_s: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 25.0
    # SIGTERM: how long the replica goes on accepting new requests while /readyz already answers 503
    # `draining`, so that load balancers take it out of rotation before its listener closes (Kubernetes'
    # preStop sleep, Envoy's drain time). The grace period starts when this ends. 0: close at once.
    drain_delay_s: Annotated[float, msgspec.Meta(ge=0, le=600)] = 0.0
    # One JSON line per request on stderr (gateway.access_log); the share of successful ones written.
    access_log: Literal["on", "off"] = "on"
    access_log_sample: Annotated[float, msgspec.Meta(ge=0, le=1)] = 1.0
    # The region this replica runs in (`eu-west`): the ingress region of every request it receives, which
    # a tenant's compliance may require (`required_ingress_regions`) and a route may prefer deployments in.
    # Unset: in no region (a tenant that requires one is refused here).
    region: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern="^[A-Za-z0-9._-]+$")] | None = None
    # A JSON line per decided request (features, no content) appended to this file, for `strait policy
    # diff` (gateway.stages.observers); the share of requests written.
    feature_log: str | None = None
    feature_log_sample: Annotated[float, msgspec.Meta(ge=0, le=1)] = 1.0
    # A candidate policy decided next to the live one on every request, never acted on (shadow mode).
    shadow_policy: str | None = None
    # Where captured requests and feedback are stored (README "The learning loop"): sqlite:///path/capture.db
    # (one file, WAL; relative to the working directory, sqlite:////abs for an absolute path),
    # postgresql://user@host/db (several replicas), or `off`. Unset: capture.db beside the spool directory
    # (`.strait/capture.db` by default). Opened only once a tenant that consented is captured.
    capture: str | None = None

    def __post_init__(self) -> None:
        if self.metrics_token is not None and not all("!" <= c <= "~" for c in self.metrics_token):
            raise ValueError("STRAIT_METRICS_TOKEN must be printable ASCII without spaces")
        check_capture_url(self.capture_url)

    @property
    def cache_url(self) -> str:
        if self.cache:
            return self.cache
        return (
            self.state
            if self.state.startswith(("redis://", "rediss://", "redis+cluster://", "rediss+cluster://"))
            else "memory"
        )

    @property
    def capture_url(self) -> str:
        if self.capture:
            return self.capture
        return "sqlite:///" + str(Path(self.spool_dir).parent / "capture.db")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for field, var in (
            ("policy_path", "STRAIT_POLICY"),
            ("host", "STRAIT_HOST"),
            ("port", "STRAIT_PORT"),
            ("workers", "STRAIT_WORKERS"),
            ("state", "STRAIT_STATE"),
            ("cache", "STRAIT_CACHE"),
            ("log_level", "STRAIT_LOG_LEVEL"),
            ("log_format", "STRAIT_LOG_FORMAT"),
            ("server", "STRAIT_SERVER"),
            ("replicas", "STRAIT_REPLICAS"),
            ("state_timeout_ms", "STRAIT_STATE_TIMEOUT_MS"),
            ("spool_dir", "STRAIT_SPOOL_DIR"),
            ("metrics_token", "STRAIT_METRICS_TOKEN"),
            ("max_header_bytes", "STRAIT_MAX_HEADER_BYTES"),
            ("max_header_count", "STRAIT_MAX_HEADER_COUNT"),
            ("header_timeout_s", "STRAIT_HEADER_TIMEOUT_S"),
            ("body_idle_timeout_s", "STRAIT_BODY_IDLE_TIMEOUT_S"),
            ("body_timeout_s", "STRAIT_BODY_TIMEOUT_S"),
            ("max_json_depth", "STRAIT_MAX_JSON_DEPTH"),
            ("max_output_tokens", "STRAIT_MAX_OUTPUT_TOKENS"),
            ("max_connections", "STRAIT_MAX_CONNECTIONS"),
            ("shutdown_grace_s", "STRAIT_SHUTDOWN_GRACE_S"),
            ("drain_delay_s", "STRAIT_DRAIN_DELAY_S"),
            ("access_log", "STRAIT_ACCESS_LOG"),
            ("access_log_sample", "STRAIT_ACCESS_LOG_SAMPLE"),
            ("region", "STRAIT_REGION"),
            ("feature_log", "STRAIT_FEATURE_LOG"),
            ("feature_log_sample", "STRAIT_FEATURE_LOG_SAMPLE"),
            ("shadow_policy", "STRAIT_SHADOW_POLICY"),
            ("capture", "STRAIT_CAPTURE"),
        ):
            # Empty means unset for the optional names (a compose file's `${VAR:-}`).
            if var in env and (env[var] or field not in ("metrics_token", "region")):
                values[field] = env[var]
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return msgspec.convert(values, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise ValueError(f"invalid setting: {exc}") from None
