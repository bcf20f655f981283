"""The exception tree: every failure a client can see maps to an HTTP status and an OpenAI error envelope.

The official SDKs pick their exception class from the status and read `type`, `code` and `param` from
`{"error": {...}}`, so every error that leaves Strait is one of these, never a traceback.
"""

from __future__ import annotations

import msgspec


class ErrorBody(msgspec.Struct, omit_defaults=False):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(msgspec.Struct):
    error: ErrorBody


class GatewayError(Exception):
    """Base: a client-visible error. Subclasses fix the status and the OpenAI `type`."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        type_: str | None = None,
    ) -> None:
        super().__init__(message)
        if type_ is not None:
            self.type = type_
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers: dict[str, str] = headers or {}

    def envelope(self) -> ErrorEnvelope:
        return ErrorEnvelope(ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code))

    def body(self) -> bytes:
        return msgspec.json.encode(self.envelope())


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_denied"
    code = "policy_violation"


class ModelNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RequestTimeout(GatewayError):
    """408: the client sent its request too slowly (body idle or total read timeout); the connection closes."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class ClientClosedRequest(GatewayError):
    """499 (nginx's code): the client went away before its request was read; nothing can be sent back, and
    it is the client's doing, so no traceback is logged."""

    status = 499
    type = "invalid_request_error"
    code = "client_closed_request"


class BudgetExceeded(GatewayError):
    """The tenant's or key's budget is spent: answered the way OpenAI signals exhausted quota (429,
    `insufficient_quota`, sent with `x-should-retry: false`), so the openai SDK raises RateLimitError
    at once instead of retrying; a 402 maps to no SDK class."""

    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class UpstreamError(GatewayError):
    """An upstream answered with an error status; status, type and code are carried over faithfully."""

    type = "upstream_error"


class UpstreamUnavailable(GatewayError):
    """No upstream could be reached (connect refused, timeout) for any target in the plan."""

    status = 502
    type = "upstream_error"
    code = "upstream_unavailable"


class UpstreamAuthFailed(GatewayError):
    """The provider refused the gateway's own credentials (401/403): the gateway's problem, not the
    client's, whose key was fine. Never the upstream's text (it may echo the provider key)."""

    status = 502
    type = "server_error"
    code = "upstream_auth_failed"


class UpstreamResponseTooLarge(GatewayError):
    """An upstream answer larger than the backend's `max_body_bytes`: refused once that much was read."""

    status = 502
    type = "upstream_error"
    code = "upstream_response_too_large"


class UpstreamTimeout(GatewayError):
    status = 504
    type = "upstream_error"
    code = "upstream_timeout"


class InternalError(GatewayError):
    status = 500
    type = "server_error"
    code = "internal_error"


class Overloaded(GatewayError):
    """503: this replica has as many requests in flight as its priority class may have (load shedding);
    sent with `Retry-After` at once, before the body is read, so the client retries elsewhere or later
    instead of waiting in a queue."""

    status = 503
    type = "server_error"
    code = "overloaded"


class ShuttingDown(GatewayError):
    """503: the replica is shutting down and its grace period ran out before the answer began."""

    status = 503
    type = "server_error"
    code = "shutting_down"


class StoreUnavailable(GatewayError):
    """503: a stored response could not be read (the state store is down or too slow); retryable, and
    never a 404, which would tell the client its response is gone."""

    status = 503
    type = "server_error"
    code = "store_unavailable"
