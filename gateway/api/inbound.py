"""Inbound limits checked on a request body: JSON nesting depth (before any decoder runs), the number of
containers, and the ranges of the integers Strait or an upstream computes with (`max_tokens`, `n`, `seed`, ...).

Every refusal is a 400 whose message names the limit. The depth scan is bytes operations only (C speed):
a typical body is settled by counting brackets; a body with many brackets has its strings removed and
its bracket skeleton reduced one nesting level per pass, at most `limit` passes.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import msgspec

from gateway.errors import InvalidRequest
from gateway.settings import Settings


class InboundLimits(msgspec.Struct, frozen=True, kw_only=True):
    max_json_depth: int = 64
    max_output_tokens: int = 1_000_000
    body_idle_timeout_s: float = 30.0
    body_timeout_s: float = 120.0


DEFAULT_LIMITS = InboundLimits()


def inbound_limits(settings: Settings) -> InboundLimits:
    return InboundLimits(
        max_json_depth=settings.max_json_depth,
        max_output_tokens=settings.max_output_tokens,
        body_idle_timeout_s=settings.body_idle_timeout_s,
        body_timeout_s=settings.body_timeout_s,
    )


# ---- JSON nesting depth ----
#
# An upper bound first, at C speed: the nesting of every bracket in the body, those inside strings included
# (`bytes.translate` keeps only brackets; a regex built for `limit` levels matches the skeleton when it is
# balanced and no deeper). Only a body that fails the bound (deep, or brackets in its strings) is measured
# exactly, on the decoded value; msgspec's own recursion guard (about 1000 levels, the interpreter's
# recursion limit) bounds that decode.

_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_SQUARE = bytes.maketrans(b"{}", b"[]")


@functools.cache
def _skeleton_pattern(limit: int) -> re.Pattern[bytes]:
    pattern = rb"\[\]"
    for _ in range(limit - 1):
        pattern = rb"\[(?:" + pattern + rb")*+\]"  # possessive: linear, no backtracking
    return re.compile(pattern)


# Arrays and objects in one body: decoding costs per container (a 3 MB body of a million empty arrays
# took 0.6 s of CPU), so past this many the body is refused before it is decoded. Real requests hold a
# few thousand at most (messages, content parts, tool schemas, token arrays of an embeddings batch).
MAX_CONTAINERS = 50_000
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*+"')


def check_container_count(body: bytes) -> None:
    """Refuse a body with more than MAX_CONTAINERS arrays/objects, before decoding it. Brackets are
    counted at C speed; only when that upper bound is passed are brackets inside strings discounted."""
    if body.count(b"[") + body.count(b"{") <= MAX_CONTAINERS:
        return
    bare = _JSON_STRING.sub(b"", body)
    if bare.count(b"[") + bare.count(b"{") > MAX_CONTAINERS:
        raise InvalidRequest(
            f"The JSON body holds more than {MAX_CONTAINERS} arrays/objects, the limit.", code="invalid_json"
        )


def depth_bound_holds(body: bytes, limit: int) -> bool:
    """True when no bracket of `body` (strings included) nests deeper than `limit`: then neither can its
    JSON values. False means "measure it" (see `depth_exceeds`), not "too deep"."""
    skeleton = body.translate(_SQUARE, _NOT_BRACKET)
    if skeleton.count(b"[") <= limit:
        return True  # fewer openers than levels, strings included: it cannot be deeper
    # Brackets inside strings can make a deep body look shallow (`[["]"[]"["]]` reads as depth 2 but is
    # 3), so the shape is judged only once the strings are gone (C-speed regex; JSON has no quote
    # outside a string).
    skeleton = _JSON_STRING.sub(b"", body).translate(_SQUARE, _NOT_BRACKET)
    if skeleton.count(b"[") <= limit:
        return True
    return _skeleton_pattern(limit).fullmatch(skeleton) is not None


def depth_exceeds(value: Any, limit: int) -> bool:
    """Whether a decoded JSON value nests arrays/objects deeper than `limit` (the value itself is depth 1);
    breadth first, so the cost is one visit per element and the Python stack stays flat."""
    level: list[Any] = [value] if isinstance(value, dict | list) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        below: list[Any] = []
        for container in level:
            items = container.values() if isinstance(container, dict) else container
            below += [v for v in items if isinstance(v, dict | list)]
        level = below
    return False


def too_deep(limit: int) -> InvalidRequest:
    return InvalidRequest(
        f"The JSON body nests arrays/objects deeper than the limit of {limit} levels.", code="invalid_json"
    )


# ---- integer ranges (of the top-level fields the limits stage reserves from and upstreams compute with) ----

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


# Only Strait's own bounds are checked here, never OpenAI's product limits: a request may go to llama.cpp or
# vLLM, which accept more (`top_logprobs` 50, `logprobs` 10, a penalty of 3, a logit bias of 200 or
# `false`), and an OpenAI upstream answers its own 400 for them, passed on with its `param` (a route's
# later candidates are not tried after a 400: the same body would be refused the same way by OpenAI, and
# an engine that accepts it is the operator's first choice to list). Strait's bounds: the integers it
# computes with (`max_tokens` and the `n`/`best_of` fan-out size the token reservation), the numbers an
# engine must be able to hold (a 64-bit seed; no vocabulary has a million tokens), and numbers no double
# can hold (a 401-digit bias).
TOKEN_IDS_MAX = 1_000_000


def _ranges(max_output_tokens: int) -> tuple[tuple[str, int, int], ...]:
    return (
        ("max_tokens", 1, max_output_tokens),
        ("max_completion_tokens", 1, max_output_tokens),
        ("n", 1, 128),
        ("best_of", 1, 128),
        ("seed", INT64_MIN, INT64_MAX),
        ("top_logprobs", 0, TOKEN_IDS_MAX),
        ("logprobs", 0, TOKEN_IDS_MAX),  # an integer in legacy completions (a boolean in chat)
        ("dimensions", 1, 65_536),
        ("top_k", -1, TOKEN_IDS_MAX),  # vLLM, SGLang, llama.cpp: -1 (or 0) disables it
    )


# Every top-level field `check_numbers` reads: the codec decodes just these to plain values.
_FLOATS = ("presence_penalty", "frequency_penalty")  # modelled in chat only: checked for the others too
NUMBER_FIELDS = (*(name for name, _, _ in _ranges(1)), "logit_bias", *_FLOATS)
_FLOAT_FIELDS = frozenset(_FLOATS)


def _show(value: int) -> str:
    if -(10**20) < value < 10**20:
        return str(value)
    return f"a number of about {int(value.bit_length() * 0.30103) + 1} digits"  # no str() of a huge int


# The ranges that do not depend on the limits, by name (max_tokens and max_completion_tokens: up to the
# limits' max_output_tokens).
_OUTPUT_FIELDS = frozenset({"max_tokens", "max_completion_tokens"})
_FIXED_RANGES = {name: (lo, hi) for name, lo, hi in _ranges(1) if name not in _OUTPUT_FIELDS}


def _all_plain(raw: Mapping[str, Any], max_output_tokens: int) -> bool:
    """Nothing to refuse, found field by field present (the common body: a few plain integers in range,
    float penalties, chat's boolean `logprobs`) rather than range by range. False when anything else is
    there (the full check then decides, and names the first field it refuses)."""
    for name, value in raw.items():
        kind = type(value)
        if kind is int:
            if name in _OUTPUT_FIELDS:
                if not 1 <= value <= max_output_tokens:
                    return False
            elif name in _FLOAT_FIELDS:
                if not -(2**63) < value < 2**63:
                    return False
            else:
                bounds = _FIXED_RANGES.get(name)
                if bounds is None or not bounds[0] <= value <= bounds[1]:
                    return False
        elif value is None or (kind is float and name in _FLOAT_FIELDS) or (kind is bool and name == "logprobs"):
            continue
        else:
            return False
    return True


def check_numbers(raw: Mapping[str, Any], limits: InboundLimits) -> None:
    """Refuse integers outside their range, whatever the field's type in the wire Structs: `raw` holds the
    body's top-level NUMBER_FIELDS as decoded JSON; they are forwarded upstream as the client wrote them
    and the token reservation is computed from them."""
    if not _all_plain(raw, limits.max_output_tokens):
        _check_each(raw, limits)


def _check_each(raw: Mapping[str, Any], limits: InboundLimits) -> None:
    """`check_numbers` range by range: the first field refused, in a fixed order."""
    for name, lo, hi in _ranges(limits.max_output_tokens):
        value = raw.get(name)
        if value is None or (name == "logprobs" and isinstance(value, bool)):
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRequest(f"'{name}' must be an integer.", param=name)
        if not lo <= value <= hi:
            raise InvalidRequest(f"'{name}' must be between {lo} and {hi} (got {_show(value)}).", param=name)
    bias = raw.get("logit_bias")
    if isinstance(bias, dict):
        for token, weight in bias.items():
            # Any number a double holds, or a boolean (llama.cpp's `false` bans a token); OpenAI's ±100 is
            # OpenAI's to enforce. A 401-digit integer would otherwise be forwarded as is.
            if isinstance(weight, bool):
                continue
            if not isinstance(weight, int | float) or not _fits_a_double(weight):
                raise InvalidRequest("'logit_bias' values must be numbers (or booleans).", param=f"logit_bias.{token}")
    # JSON cannot spell NaN or infinity and msgspec refuses out-of-range floats: only a huge integer is left.
    for name in _FLOATS:
        fvalue = raw.get(name)
        if isinstance(fvalue, int) and not isinstance(fvalue, bool) and not _fits_a_double(fvalue):
            raise InvalidRequest(f"'{name}' is too large a number.", param=name)


def _fits_a_double(value: float) -> bool:
    try:
        float(value)
    except OverflowError:
        return False
    return True
