"""Process settings, read once from the environment into a frozen Struct (policy is separate: a file)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

import msgspec

AsgiServer = Literal["uvicorn", "granian"]


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    policy_path: str = "policies/demo.yaml"
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    # `memory` (in-process, one replica: the embedded default), redis://, rediss:// or redis+cluster://.
    state: str = "memory"
    log_level: str = "WARNING"
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

    def __post_init__(self) -> None:
        if self.metrics_token is not None and not all("!" <= c <= "~" for c in self.metrics_token):
            raise ValueError("STRAIT_METRICS_TOKEN must be printable ASCII without spaces")

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
            ("log_level", "STRAIT_LOG_LEVEL"),
            ("server", "STRAIT_SERVER"),
            ("replicas", "STRAIT_REPLICAS"),
            ("state_timeout_ms", "STRAIT_STATE_TIMEOUT_MS"),
            ("spool_dir", "STRAIT_SPOOL_DIR"),
            ("metrics_token", "STRAIT_METRICS_TOKEN"),
        ):
            if var in env and (env[var] or field != "metrics_token"):
                values[field] = env[var]
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return msgspec.convert(values, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise ValueError(f"invalid setting: {exc}") from None
