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
        # Keys that authenticated against `index`, to their principal: a SHA-256 per request is ~1 % of
        # its CPU. Only keys the policy knows get in (bounded by the policy: a flood of wrong keys adds
        # nothing), and the memo belongs to one index (a reload that revokes a key starts a new one).
        self._known: dict[str, Principal] = {}
        self._known_index = index

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
        index = self.index
        known = self._known
        if self._known_index is not index:
            known = self._known = {}
            self._known_index = index
        principal = known.get(key)
        if principal is not None:
            return principal
        principal = index.principals.get(key_digest(key))
        if principal is not None:
            known[key] = principal
            return principal
        # Never echo the key, nor any part of it, back to the client or the log.
        raise AuthenticationFailed("Incorrect API key provided.")
