"""CORS for browser clients: the origins a policy lists (`server.cors`, none by default) may call the
API from a web page.

A preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) is answered here, before any
route: 204 with the allowed methods, the headers the page asked to send (echoed: Strait's keys travel in
`Authorization`, and the openai JS SDK sends its own `x-stainless-*` headers) and `Access-Control-Max-Age`;
from an origin the policy does not list, 403 with the error envelope naming the setting. Every other
answer to a request with an `Origin` (JSON, streams, errors alike) gets, at its head,
`Access-Control-Allow-Origin` (the origin itself, or `*` when the policy allows any origin without
credentials: never `*` with credentials, which the policy loader refuses), `Access-Control-Expose-Headers`
(Strait's and the rate-limit headers, so the page can read them) and `Vary: Origin`. A request without an
`Origin` header (every non-browser client) costs one test when the policy lists no origins, a scan of its
header list otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from gateway.api.asgi_send import Message, Scope, Send
from gateway.errors import PermissionDenied
from gateway.policy.model import Cors

_METHODS = b"GET, POST, DELETE, OPTIONS"
_EXPOSED = b", ".join(
    [
        b"x-request-id",
        b"x-strait-request-id",
        b"x-strait-route",
        b"x-strait-deployment",
        b"x-strait-decision",
        b"x-strait-explain",
        b"x-strait-cache",
        b"x-strait-cache-similarity",
        b"x-strait-budget",
        b"x-strait-spill",
        b"retry-after",
        b"x-should-retry",
        *(b"x-ratelimit-%s-%s" % (k, w) for k in (b"limit", b"remaining", b"reset") for w in (b"requests", b"tokens")),
    ]
)
# What a page may ask to send: header names, comma-separated (anything else is not echoed).
_HEADER_LIST = re.compile(rb"^[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*$")
_MAX_HEADER_LIST = 2048


class CorsRules:
    """One policy's `server.cors`, ready for the hot path."""

    __slots__ = ("active", "any", "credentials", "max_age", "origins")

    def __init__(self, cors: Cors) -> None:
        self.any = "*" in cors.allowed_origins and not cors.allow_credentials
        self.origins = frozenset(o.encode("latin-1") for o in cors.allowed_origins if o != "*")
        self.credentials = cors.allow_credentials
        self.max_age = str(cors.max_age_s).encode()
        self.active = self.any or bool(self.origins)

    def allows(self, origin: bytes) -> bool:
        return self.any or origin in self.origins

    def grant(self, origin: bytes) -> list[tuple[bytes, bytes]]:
        """The headers that let the page at `origin` read the answer."""
        headers = [(b"access-control-allow-origin", b"*" if self.any else origin)]
        if self.credentials:
            headers.append((b"access-control-allow-credentials", b"true"))
        return headers


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value  # type: ignore[no-any-return]
    return None


def _with_vary(headers: list[Any]) -> list[Any]:
    for i, (key, value) in enumerate(headers):
        if key.lower() == b"vary":
            if b"origin" not in value.lower() and value.strip() != b"*":
                headers[i] = (key, value + b", Origin")
            return headers
    headers.append((b"vary", b"Origin"))
    return headers


class CorsGate:
    """Reads the running policy's rules per request (`current`), so a reload changes them at once."""

    def __init__(self, current: Callable[[], Cors]) -> None:
        self._current = current
        self._compiled: tuple[Cors, CorsRules] | None = None

    def _rules(self) -> CorsRules:
        cors = self._current()
        compiled = self._compiled
        if compiled is None or compiled[0] is not cors:  # a new policy: compiled once
            compiled = self._compiled = (cors, CorsRules(cors))
        return compiled[1]

    def sender(self, scope: Scope, send: Send) -> Send | None:
        """`send`, adding the CORS headers to the answer's head when the request has an `Origin`; None when
        the request is a preflight, to be answered by `preflight`."""
        method = scope["method"]
        rules = self._rules()
        if method != "OPTIONS" and not rules.active:
            return send
        origin = _header(scope, b"origin")
        if origin is None:
            return send
        if method == "OPTIONS" and _header(scope, b"access-control-request-method") is not None:
            return None
        granted = [*rules.grant(origin), (b"access-control-expose-headers", _EXPOSED)] if rules.allows(origin) else []

        def sending(message: Message) -> Any:
            if message["type"] == "http.response.start":
                message["headers"] = _with_vary([*message.get("headers", ()), *granted])
            return send(message)

        return sending

    async def preflight(self, scope: Scope, send: Send) -> None:
        origin = _header(scope, b"origin") or b""
        rules = self._rules()
        if not rules.allows(origin):
            error = PermissionDenied(
                f"The origin {origin.decode('latin-1')!r} may not call this API from a browser: "
                "the gateway's policy lists the origins that may (server.cors.allowed_origins).",
                code="cors_origin_not_allowed",
            )
            body = error.body()
            head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 403, "headers": _with_vary(head)})
            await send({"type": "http.response.body", "body": body})
            return
        asked = _header(scope, b"access-control-request-headers")
        headers = [
            *rules.grant(origin),
            (b"access-control-allow-methods", _METHODS),
            (b"access-control-max-age", rules.max_age),
            (b"content-length", b"0"),
        ]
        if asked and len(asked) <= _MAX_HEADER_LIST and _HEADER_LIST.match(asked.strip()):
            headers.append((b"access-control-allow-headers", asked.strip()))
        headers.append((b"vary", b"Origin, Access-Control-Request-Headers"))
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
