"""A shared bearer token for operational endpoints (`STRAIT_METRICS_TOKEN` for /metrics)."""

from __future__ import annotations

import hmac

from gateway.errors import AuthenticationFailed


def check_bearer(authorization: str | None, token: str) -> None:
    """Raise 401 (OpenAI envelope) unless `authorization` is `Bearer <token>`; constant-time compare."""
    scheme, _, presented = (authorization or "").strip().partition(" ")
    # Header values arrive decoded as latin-1, so they encode back to their own bytes; the token is ASCII.
    given = presented.strip().encode("latin-1", "replace")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given, token.encode("ascii")):
        raise AuthenticationFailed(
            "This endpoint needs 'Authorization: Bearer <metrics token>'.",
            headers={"www-authenticate": "Bearer"},
        )
