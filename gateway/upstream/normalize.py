"""Upstream error bodies, normalised to OpenAI's envelope with the status the SDK expects.

Upstreams disagree: llama.cpp and vLLM send integer `code`s and no `param`, old vLLM a flat
`{"object": "error"}`, some proxies HTML. The client always gets `{"error": {message, type, param,
code}}` with a string or null `code`, the upstream's status, and a capped `Retry-After`.

What the upstream wrote is for its operator, not our clients: the message (and type, code, param) pass
through a `Redactor` (no configured secret, URL, host name, address or file path survives), an
upstream 401/403 (the provider refused *our* credentials) becomes 502 `upstream_auth_failed` with none
of its text, and the upstream's `x-ratelimit-*` headers (our provider account's, not the tenant's) are
never passed on.
"""

from __future__ import annotations

import msgspec

from gateway.errors import UpstreamAuthFailed, UpstreamError
from gateway.upstream.redact import NO_SECRETS, Redactor
from gateway.upstream.wire import UpstreamErrorBody, UpstreamErrorProbe

# The SDKs give up retrying when Retry-After exceeds 120 s (openai) or sleep without a cap (anthropic).
MAX_RETRY_AFTER_S = 120
_PASSED_HEADERS = ("retry-after", "retry-after-ms")
# The provider refused the gateway's credentials: never the client's fault, never the provider's text.
AUTH_FAILURE_STATUS = frozenset({401, 403})
AUTH_FAILED_MESSAGE = (
    "The gateway could not authenticate with the upstream serving this model; its operators have been told."
)
_CONTEXT_HINTS = (
    "context length",
    "context size",
    "context window",
    "exceed_context",
    "too many tokens",
    "prompt is too long",
)
_decode_probe = msgspec.json.Decoder(UpstreamErrorProbe).decode
_DEFAULT_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_denied",
    404: "not_found_error",
    429: "rate_limit_error",
}


def cap_retry_after(value: str) -> str | None:
    try:
        seconds = float(value)
    except ValueError:
        return None  # An HTTP date: rare from upstreams; dropping it falls back to SDK backoff.
    if seconds < 0:
        return None
    return str(min(int(seconds + 0.999), MAX_RETRY_AFTER_S))


def upstream_error(
    status: int, body: bytes, headers: dict[str, str], redact: Redactor = NO_SECRETS
) -> UpstreamAuthFailed | UpstreamError:
    """Build the client-facing error for an upstream's error answer; `redact` knows the secrets."""
    if status in AUTH_FAILURE_STATUS:
        return UpstreamAuthFailed(AUTH_FAILED_MESSAGE)
    if status < 400:
        # A redirect (or any other non-answer): nothing of it is passed on, its Location least of all.
        return UpstreamError(
            f"The upstream answered with HTTP {status} instead of a result; the gateway does not follow redirects.",
            status=502,
            code="upstream_bad_response",
            type_="server_error",
        )
    err = _parse(body)
    message = (err.message or "").strip() or f"The upstream returned HTTP {status}."
    type_ = redact(err.type or "") or _DEFAULT_TYPE.get(status, "upstream_error" if status < 500 else "server_error")
    code: str | None = None if err.code is None or isinstance(err.code, int) else redact(err.code)
    param = redact.optional(err.param)
    lowered = f"{message} {type_}".lower()
    if status == 400 and any(h in lowered for h in _CONTEXT_HINTS):
        # LiteLLM and other clients match this wording; keep the upstream's detail after it.
        code, param = "context_length_exceeded", "messages"
        if "maximum context length" not in message.lower():
            message = f"This model's maximum context length was exceeded: {message}"
    if type_ == "exceed_context_size_error":
        type_ = "invalid_request_error"
    message = redact(message)
    out_headers: dict[str, str] = {}
    for name in _PASSED_HEADERS:
        if name in headers:
            value = cap_retry_after(headers[name]) if name == "retry-after" else headers[name]
            if value is not None:
                out_headers[name] = value
    if status in (429, 503, 529) and "retry-after" not in out_headers:  # 529: Anthropic's overloaded
        out_headers["retry-after"] = "1"
    return UpstreamError(
        message, param=param, code=code or _default_code(status), status=status, headers=out_headers, type_=type_
    )


def is_context_length_error(body: bytes) -> bool:
    """Whether a 400's body says the prompt does not fit the model's context window (OpenAI's
    `context_length_exceeded`, vLLM's and llama.cpp's wordings): the dispatcher then tries a larger model."""
    err = _parse(body)
    if err.code == "context_length_exceeded":
        return True
    lowered = f"{err.message or ''} {err.type or ''}".lower()
    return any(h in lowered for h in _CONTEXT_HINTS)


def _default_code(status: int) -> str | None:
    return {
        429: "rate_limit_exceeded",
        500: "upstream_error",
        502: "upstream_error",
        503: "upstream_unavailable",
        529: "upstream_unavailable",  # Anthropic's overloaded_error
        504: "upstream_timeout",
    }.get(status)


def _parse(body: bytes) -> UpstreamErrorBody:
    try:
        probe = _decode_probe(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        # Not JSON (an HTML error page from a proxy): its text may name internal hosts, so drop it.
        return UpstreamErrorBody()
    if isinstance(probe.error, UpstreamErrorBody):
        return probe.error
    if isinstance(probe.error, str):
        return UpstreamErrorBody(message=probe.error, type=probe.type, code=probe.code)
    return UpstreamErrorBody(message=probe.message, type=probe.type, code=probe.code)
