"""OpenAI request bodies, decoded once: validated into the wire Structs (a wrong type is a 400 naming the
field), turned into the canonical request, the client's bytes kept beside it for passthrough.

The body is parsed into typed values once. A skim of its top level (`dict[str, Raw]`: zero-copy views of
each value, no Python objects built for them) gives the field names the forbidden-field check reads, the
integers range-checked by name, the fields Strait does not model (kept as `Raw` in `Request.extra`), and
the byte spans of the members passthrough edits. A body only materialises as plain Python values when
its nesting depth must be measured exactly (brackets inside strings, or a deep body).

Every failure is a 400 (or 413) whose message names the field; Litestar's own 422 never reaches a client.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Final

import msgspec

from gateway.api.inbound import (
    DEFAULT_LIMITS,
    NUMBER_FIELDS,
    InboundLimits,
    check_container_count,
    check_numbers,
    depth_bound_holds,
    depth_exceeds,
    too_deep,
)
from gateway.api.openai.to_canonical import canonical_request
from gateway.api.wire import ChatRequest, CompletionRequest, EmbeddingsRequest
from gateway.canonical import Operation, Request
from gateway.errors import InvalidRequest
from gateway.passthrough import RepeatedField, original_of

WireRequest = ChatRequest | CompletionRequest | EmbeddingsRequest

_skim = msgspec.json.Decoder(dict[str, msgspec.Raw])
_any = msgspec.json.Decoder()
_str = msgspec.json.Decoder(str)
_WIRE: Final[dict[Operation, type[WireRequest]]] = {
    "chat": ChatRequest,
    "completions": CompletionRequest,
    "embeddings": EmbeddingsRequest,
}
_decoders: Final[dict[Operation, msgspec.json.Decoder[Any]]] = {op: msgspec.json.Decoder(t) for op, t in _WIRE.items()}
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
    {"extrabody", "extraheaders", "extraquery", "headers", "metadata", "userconfig", "litellmparams", "litellmmetadata"}
)
_NON_ALNUM = re.compile(r"[^a-z0-9]")
# Top-level names that are neither forbidden nor option containers (the common case skips normalising).
_PLAIN_FIELDS = (
    frozenset().union(*(t.__struct_fields__ for t in (ChatRequest, CompletionRequest, EmbeddingsRequest)))
    | {"strait", "logprobs", "top_logprobs", "best_of", "logit_bias", "parallel_tool_calls", "top_k"}
) - {"metadata"}


def skim(body: bytes, limits: InboundLimits = DEFAULT_LIMITS) -> dict[str, msgspec.Raw]:
    """A body's top level as Raw values, after the input bounds every codec applies: a JSON object, valid
    UTF-8, within the container count and nesting depth, and without a field that would redirect or
    re-credential an upstream. Shared by the Anthropic codec (gateway.api.anthropic.decode)."""
    if not body:
        raise InvalidRequest("The request body is empty; send a JSON object.", code="invalid_json")
    check_container_count(body)
    measure_depth = not depth_bound_holds(body, limits.max_json_depth)
    try:
        top = _skim.decode(body)
    except RecursionError:
        raise too_deep(limits.max_json_depth) from None
    except msgspec.ValidationError as exc:
        raise _not_an_object(exc) from None
    except msgspec.DecodeError as exc:
        hint = " Strings must be valid Unicode: lone surrogate escapes are refused." if _SURROGATE.search(body) else ""
        raise InvalidRequest(
            f"We could not parse the JSON body of your request: {exc}.{hint}", code="invalid_json"
        ) from None
    if not body.isascii():
        # The skim does not check the UTF-8 of values it skips, and the bytes go upstream as they are.
        try:
            body.decode()
        except UnicodeDecodeError:
            raise InvalidRequest(
                "We could not parse the JSON body of your request: Invalid UTF-8 encoded string.", code="invalid_json"
            ) from None
    if measure_depth:
        # Rare (a deep body, or brackets inside strings): measured exactly on the decoded value.
        try:
            value = _any.decode(body)
        except RecursionError:
            raise too_deep(limits.max_json_depth) from None
        except msgspec.ValidationError as exc:  # a number no float can hold: refused as before
            raise _not_an_object(exc) from None
        if depth_exceeds(value, limits.max_json_depth):
            raise too_deep(limits.max_json_depth)
    forbidden = forbidden_field(top)
    if forbidden is not None:
        raise InvalidRequest(
            f"'{forbidden}' is not accepted in a request body: upstreams and their credentials come from the policy.",
            param=forbidden,
        )
    return top


def decode(body: bytes, operation: Operation, limits: InboundLimits = DEFAULT_LIMITS) -> Request:
    """Decode and validate an OpenAI request body into the canonical request (its bytes kept for passthrough)."""
    top = skim(body, limits)
    try:
        typed: WireRequest = _decoders[operation].decode(body)
    except msgspec.ValidationError as exc:
        raise invalid(str(exc)) from None
    _check_ranges(typed)
    numbers = {name: value_of(top, name) for name in NUMBER_FIELDS if name in top}
    check_numbers(numbers, limits)
    try:
        source = original_of("openai", body, top)
    except RepeatedField as exc:
        raise InvalidRequest(
            f"The field '{exc.name}' appears more than once in the request body; send each field once.",
            param=exc.name,
        ) from None
    return canonical_request(operation, typed, top, numbers, source)


def _not_an_object(exc: msgspec.ValidationError) -> InvalidRequest:
    # Not an object, or a number no integer/float can hold (e.g. 1e400).
    reason = "" if str(exc).startswith("Expected `object`") else f" ({exc})"
    return InvalidRequest(f"The request body must be a JSON object{reason}.", code="invalid_json")


def invalid(message: str) -> InvalidRequest:
    """A msgspec validation message as a 400 naming the field (`messages[0].role`)."""
    at = _AT.search(message)
    missing = _MISSING.search(message)
    param = at.group(1) if at and at.group(1) else None
    if missing:
        param = f"{param}.{missing.group(1)}" if param else missing.group(1)
    reason = message[: at.start()] if at else message
    where = f" (at '{param}')" if param and not missing else ""
    return InvalidRequest(f"Invalid request: {reason}{where}.", param=param)


def value_of(top: dict[str, msgspec.Raw], name: str) -> Any:
    """A top-level value as plain Python (small fields only: numbers, option containers)."""
    try:
        return _any.decode(top[name])
    except msgspec.ValidationError as exc:  # a float out of range (1e400)
        raise InvalidRequest(f"Invalid request: {exc} (at '{name}').", param=name) from None


def _normal(name: str) -> str:
    """Compatibility-folded, case-folded, letters and digits only: `API_BASE`, `api.base`, `api base`,
    its full-width form and one with a zero-width space inside are all `apibase`."""
    if not name.isascii():
        name = unicodedata.normalize("NFKC", name)
    return _NON_ALNUM.sub("", name.casefold())


def forbidden_field(top: dict[str, msgspec.Raw]) -> str | None:
    """The path (`extra_body.apiBase`, `metadata.opts[0].api_key`) of the first field that would redirect
    or re-credential an upstream, or None. Only option containers are decoded to be searched."""
    stack: list[tuple[str, Any]] = []
    containers: list[str] = []
    for name in top:
        if name in _PLAIN_FIELDS:
            continue
        normal = _normal(name)
        if normal in _FORBIDDEN_FIELDS:
            return name
        if normal in _OPTION_CONTAINERS:
            containers.append(name)
            value = value_of(top, name)
            if isinstance(value, dict | list):
                stack.append((name, value))
    if not containers:
        return None
    # Iterative, not recursive: a deeply nested body must be a 400, never a RecursionError.
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            for name, inner in value.items():
                where = f"{path}.{name}"
                if _normal(name) in _FORBIDDEN_FIELDS:
                    return where
                if isinstance(inner, dict | list):
                    stack.append((where, inner))
        else:
            for i, inner in enumerate(value):
                if isinstance(inner, dict | list):
                    stack.append((f"{path}[{i}]", inner))
    return _forbidden_key_spelled(top, containers)


# A JSON key: a string followed by a colon (in valid JSON no string value is).
_JSON_KEY = re.compile(rb'"((?:[^"\\]|\\.)*+)"[ \t\n\r]*:')


def _forbidden_key_spelled(top: dict[str, msgspec.Raw], containers: list[str]) -> str | None:
    """A forbidden name anywhere in an option container's bytes, as `container.name`. The bytes are what goes
    upstream, and a name repeated inside an object (`{"a": {"api_key": ...}, "a": {}}`) is absent from the
    decoded value `forbidden_field` searches, so the keys are read from the bytes as well."""
    for container in containers:
        for match in _JSON_KEY.finditer(bytes(top[container])):
            quoted = match.group(0)[: match.end(1) - match.start(0) + 1]
            name = _str.decode(quoted) if b"\\" in quoted else match.group(1).decode()
            if _normal(name) in _FORBIDDEN_FIELDS:
                return f"{container}.{name}"
    return None


def _check_ranges(req: WireRequest) -> None:
    if isinstance(req, ChatRequest):
        if not req.messages:
            raise InvalidRequest("'messages' must contain at least one message.", param="messages")
        _check_objects(req)
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
    # `top_p` is a probability by definition, for every engine. OpenAI's own product limits (temperature
    # at most 2, at most 4 `stop` sequences, penalties within ±2, 20 logprobs, logit biases within ±100,
    # the response_format types it knows) are not checked here: llama.cpp, vLLM and others accept more,
    # and OpenAI answers its own 400 for them, which Strait passes on (see `gateway.api.inbound`).
    if req.top_p is not None and not 0 <= req.top_p <= 1:
        raise InvalidRequest("'top_p' must be between 0 and 1.", param="top_p")


def _check_objects(req: ChatRequest) -> None:
    """JSON schemas are kept as the client's bytes (`Raw`), never decoded: they must still be objects."""
    for i, tool in enumerate(req.tools or ()):
        if tool.type == "function":
            if tool.function is None:
                raise InvalidRequest(
                    f"Invalid request: a tool of type 'function' needs its 'function' (at 'tools[{i}]').",
                    param=f"tools[{i}].function",
                )
            _object(tool.function.parameters, f"tools[{i}].function.parameters")
    if req.response_format is not None:
        _object(req.response_format.json_schema, "response_format.json_schema")


def _object(raw: msgspec.Raw, where: str) -> None:
    first = memoryview(raw)[:1].tobytes()
    if first in (b"", b"n"):  # absent, or null: as if absent
        return
    if first != b"{":
        got = {b"[": "array", b'"': "str", b"t": "bool", b"f": "bool"}.get(first, "number")
        raise InvalidRequest(f"Invalid request: Expected `object`, got `{got}` (at '{where}').", param=where)
