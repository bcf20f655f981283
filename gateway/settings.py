"""Process settings, read once from the environment into a frozen Struct (policy is separate: a file)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

import msgspec

UpstreamTransport = Literal["aiohttp", "httpx"]
AsgiServer = Literal["uvicorn", "granian"]


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    policy_path: str = "policies/demo.yaml"
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    # `memory` (in-process, the embedded default) or a redis:// URL (arrives with shared state).
    state: str = "memory"
    # HTTP client under the adapters: aiohttp's transport measured faster than httpx's own (loadtest/README.md).
    upstream_transport: UpstreamTransport = "aiohttp"
    log_level: str = "WARNING"
    # The ASGI server behind `strait serve`, chosen by measurement (loadtest/README.md).
    server: AsgiServer = "uvicorn"

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
            ("upstream_transport", "STRAIT_UPSTREAM_TRANSPORT"),
            ("log_level", "STRAIT_LOG_LEVEL"),
            ("server", "STRAIT_SERVER"),
        ):
            if var in env:
                values[field] = env[var]
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return msgspec.convert(values, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise ValueError(f"invalid setting: {exc}") from None
