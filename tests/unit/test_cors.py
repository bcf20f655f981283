"""The CORS gate on plain ASGI messages: `*` only without credentials, Vary merged, reloads seen."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.api.cors import CorsGate
from gateway.policy.model import Cors


def _scope(method: str = "POST", **headers: str) -> dict[str, Any]:
    return {
        "type": "http",
        "method": method,
        "headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()],
    }


def _head(
    gate: CorsGate, scope: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None
) -> dict[bytes, bytes]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def run() -> None:
        wrapped = gate.sender(scope, send)
        if wrapped is None:
            await gate.preflight(scope, send)
        else:
            await wrapped({"type": "http.response.start", "status": 200, "headers": headers or []})

    asyncio.run(run())
    return dict(sent[0]["headers"])


def test_any_origin_without_credentials_is_a_star() -> None:
    gate = CorsGate(lambda: Cors(allowed_origins=("*",)))
    head = _head(gate, _scope(origin="https://anywhere.example"))
    assert head[b"access-control-allow-origin"] == b"*" and b"access-control-allow-credentials" not in head


def test_credentials_echo_the_origin_never_a_star() -> None:
    gate = CorsGate(lambda: Cors(allowed_origins=("https://app.example.com",), allow_credentials=True))
    head = _head(gate, _scope(origin="https://app.example.com"))
    assert head[b"access-control-allow-origin"] == b"https://app.example.com"
    assert head[b"access-control-allow-credentials"] == b"true"
    pre = _head(gate, _scope("OPTIONS", origin="https://app.example.com", access_control_request_method="POST"))
    assert pre[b"access-control-allow-origin"] == b"https://app.example.com"


def test_vary_is_merged_into_an_existing_one() -> None:
    gate = CorsGate(lambda: Cors(allowed_origins=("https://app.example.com",)))
    head = _head(gate, _scope(origin="https://app.example.com"), [(b"vary", b"Accept-Encoding")])
    assert head[b"vary"] == b"Accept-Encoding, Origin"


def test_a_reloaded_policy_is_read_at_once() -> None:
    current = [Cors()]
    gate = CorsGate(lambda: current[0])
    assert b"access-control-allow-origin" not in _head(gate, _scope(origin="http://localhost:3000"))
    current[0] = Cors(allowed_origins=("http://localhost:3000",))
    assert (
        _head(gate, _scope(origin="http://localhost:3000"))[b"access-control-allow-origin"] == b"http://localhost:3000"
    )


def test_a_header_list_that_is_not_one_is_not_echoed() -> None:
    gate = CorsGate(lambda: Cors(allowed_origins=("https://app.example.com",)))
    scope = _scope(
        "OPTIONS",
        origin="https://app.example.com",
        access_control_request_method="POST",
        access_control_request_headers="x-ok\r\nset-cookie: a",
    )
    assert b"access-control-allow-headers" not in _head(gate, scope)
