"""Stage `auth`: the API key becomes a Principal (tenant, key id). Keys are compared by digest only."""

from __future__ import annotations

from gateway.context import RequestContext
from gateway.errors import AuthenticationFailed
from gateway.pipeline import RequestOnly
from gateway.policy.index import ANONYMOUS, PolicyIndex, Principal, key_digest


def bearer_key(headers: dict[str, str]) -> str | None:
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None
    return headers.get("x-api-key") or headers.get("api-key")


class AuthStage(RequestOnly):
    """The first stage: it runs before `decode`, so an unauthenticated client costs no parsing."""

    name = "auth"

    def __init__(self, index: PolicyIndex) -> None:
        self.index = index

    async def on_request(self, ctx: RequestContext) -> None:
        ctx.principal = self.authenticate(ctx.headers)

    def authenticate(self, headers: dict[str, str]) -> Principal:
        """Also used by the endpoints outside the pipeline (models list, usage, decisions)."""
        if not self.index.auth_required:
            return ANONYMOUS
        key = bearer_key(headers)
        if key is None:
            raise AuthenticationFailed(
                "Missing API key: send it as 'Authorization: Bearer <key>'.", code="missing_api_key"
            )
        principal = self.index.principals.get(key_digest(key))
        if principal is None:
            # Never echo the key, nor any part of it, back to the client or the log.
            raise AuthenticationFailed("Incorrect API key provided.")
        return principal
