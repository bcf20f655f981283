"""Request bodies: size-limited reading, JSON decoding and validation into wire Structs.

Every failure is a 400 (or 413) whose message names the field; Litestar's own 422 never reaches a client.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import msgspec

from gateway.api.inbound import (
    DEFAULT_LIMITS,
    InboundLimits,
    check_container_count,
    check_numbers,
    depth_bound_holds,
    depth_exceeds,
    too_deep,
)
from gateway.api.wire import ChatRequest, CompletionRequest, EmbeddingsRequest
from gateway.errors import InvalidRequest, PayloadTooLarge

T = TypeVar("T", ChatRequest, CompletionRequest, EmbeddingsRequest)

_raw = msgspec.json.Decoder(dict[str, Any])
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {
    t: msgspec.json.Decoder(t) for t in (ChatRequest, CompletionRequest, EmbeddingsRequest)
}
_AT = re.compile(r" - at `\$\.?([^`]*)`$")
_MISSING = re.compile(r"missing required field `([^`]+)`")
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
# Upstream URLs and credentials come only from policy files; a body that carries them is refused rather
# than forwarded (a key in a body would otherwise reach a third party, a URL would redirect the request).
# Names are compared normalised (lower case, without `_` and `-`), so `apiBase`, `API-BASE` and `api_base`
# are one name, at the top level and anywhere inside the containers SDKs and proxies use for pass-through
# options. Message content and tool JSON schemas are NOT searched: they are data, and a tool may well have
# a parameter called `api_key`; only the places an upstream or a proxy reads options from are.
_FORBIDDEN_FIELDS = frozenset(
    {
        "apikey",
        "apibase",
        "apiurl",
        "baseurl",
        "customllmprovider",
        "azureendpoint",
        "azureadtoken",
        "awsaccesskeyid",
        "awssecretaccesskey",
        "awssessiontoken",
        "awsregionname",
        "vertexcredentials",
        "vertexproject",
        "vertexlocation",
        "authorization",
        "proxyauthorization",
        "xapikey",
        "apiversion",
        "organization",
        "openaiorganization",
    }
)
# Where SDKs and proxies read pass-through options from (normalised names): OpenAI's extra_*, LiteLLM's
# client-side `user_config` / `litellm_params` (its own way to send a key and a base URL per request).
_OPTION_CONTAINERS = frozenset(
    {"extrabody", "extraheaders", "extraquery", "metadata", "userconfig", "litellmparams", "litellmmetadata"}
)
_NON_ALNUM = re.compile(r"[^a-z0-9]")


async def read_body(chunks: AsyncIterator[bytes], content_length: str | None, limit: int) -> bytes:
    """Read the body, refusing with 413 as soon as it is known to exceed `limit` (before reading it whole)."""
    if content_length is not None:
        try:
            announced = int(content_length)
        except ValueError:
            raise InvalidRequest("Invalid Content-Length header.") from None
        if announced < 0:
            raise InvalidRequest("Invalid Content-Length header.")
        if announced > limit:
            raise PayloadTooLarge(f"Request body of {announced} bytes exceeds the limit of {limit} bytes.")
    parts: list[bytes] = []
    total = 0
    try:
        async for chunk in chunks:
            total += len(chunk)
            if total > limit:
                raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
            parts.append(chunk)
    finally:
        # Closed now, not when collected: the reader's timeout timer must not outlive the read.
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
    return b"".join(parts)


def decode_request(body: bytes, kind: type[T], limits: InboundLimits = DEFAULT_LIMITS) -> tuple[T, dict[str, Any]]:
    """Decode `body` into the typed request and the pass-through mapping."""
    if not body:
        raise InvalidRequest("The request body is empty; send a JSON object.", code="invalid_json")
    check_container_count(body)
    measure_depth = not depth_bound_holds(body, limits.max_json_depth)
    try:
        raw = _raw.decode(body)
    except RecursionError:
        raise too_deep(limits.max_json_depth) from None
    except msgspec.ValidationError as exc:
        # Not an object, or a number no integer/float can hold (e.g. 1e400, a 5000-digit integer).
        reason = "" if str(exc).startswith("Expected `object`") else f" ({exc})"
        raise InvalidRequest(f"The request body must be a JSON object{reason}.", code="invalid_json") from None
    except msgspec.DecodeError as exc:
        hint = " Strings must be valid Unicode: lone surrogate escapes are refused." if _SURROGATE.search(body) else ""
        raise InvalidRequest(
            f"We could not parse the JSON body of your request: {exc}.{hint}", code="invalid_json"
        ) from None
    if measure_depth and depth_exceeds(raw, limits.max_json_depth):
        raise too_deep(limits.max_json_depth)
    forbidden = _forbidden_field(raw)
    if forbidden is not None:
        raise InvalidRequest(
            f"'{forbidden}' is not accepted in a request body: upstreams and their credentials come from the policy.",
            param=forbidden,
        )
    try:
        typed: T = _decoders[kind].decode(body)
    except msgspec.ValidationError as exc:
        message = str(exc)
        at = _AT.search(message)
        missing = _MISSING.search(message)
        param = at.group(1) if at and at.group(1) else None
        if missing:
            param = f"{param}.{missing.group(1)}" if param else missing.group(1)
        reason = message[: at.start()] if at else message
        where = f" (at '{param}')" if param and not missing else ""
        raise InvalidRequest(f"Invalid request: {reason}{where}.", param=param) from None
    _check_ranges(typed)
    check_numbers(raw, limits)
    return typed, raw


def _normal(name: str) -> str:
    """Compatibility-folded, case-folded, letters and digits only: `API_BASE`, `api.base`, `api base`,
    its full-width form and one with a zero-width space inside are all `apibase`."""
    if not name.isascii():
        name = unicodedata.normalize("NFKC", name)
    return _NON_ALNUM.sub("", name.casefold())


def _forbidden_field(raw: dict[str, Any]) -> str | None:
    """The path (`extra_body.apiBase`, `metadata.opts[0].api_key`) of the first field that would redirect
    or re-credential an upstream, or None."""
    stack: list[tuple[str, Any]] = []
    for name, value in raw.items():
        if _normal(name) in _FORBIDDEN_FIELDS:
            return name
        if _normal(name) in _OPTION_CONTAINERS and isinstance(value, (dict, list)):
            stack.append((name, value))
    # Iterative, not recursive: a deeply nested body must be a 400, never a RecursionError.
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            for name, inner in value.items():
                where = f"{path}.{name}"
                if _normal(name) in _FORBIDDEN_FIELDS:
                    return where
                if isinstance(inner, (dict, list)):
                    stack.append((where, inner))
        else:
            for i, inner in enumerate(value):
                if isinstance(inner, (dict, list)):
                    stack.append((f"{path}[{i}]", inner))
    return None


def _check_ranges(req: ChatRequest | CompletionRequest | EmbeddingsRequest) -> None:
    if isinstance(req, ChatRequest) and not req.messages:
        raise InvalidRequest("'messages' must contain at least one message.", param="messages")
    if isinstance(req, EmbeddingsRequest):
        if isinstance(req.input, list):
            if not req.input:
                raise InvalidRequest("'input' must not be empty.", param="input")
            kinds = {type(i) for i in req.input}
            if len(kinds) > 1:
                raise InvalidRequest(
                    "'input' must be a string, a list of strings or token arrays, not a mix.", param="input"
                )
        return
    n = req.n
    if n is not None and not 1 <= n <= 128:
        raise InvalidRequest(f"{n} is not a valid value for 'n': it must be between 1 and 128.", param="n")
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(req, name, None)
        if value is not None and value < 1:
            raise InvalidRequest(f"'{name}' must be at least 1.", param=name)
    if req.temperature is not None and not 0 <= req.temperature <= 2:
        raise InvalidRequest("'temperature' must be between 0 and 2.", param="temperature")
    if req.top_p is not None and not 0 <= req.top_p <= 1:
        raise InvalidRequest("'top_p' must be between 0 and 1.", param="top_p")
    if isinstance(req.stop, list) and len(req.stop) > 4:
        raise InvalidRequest("'stop' takes at most 4 sequences.", param="stop")
