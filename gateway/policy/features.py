"""What the engine needs to know about a request, read from the canonical request and its headers (shared
by the `route` stage and the offline tools: explain, test, diff), and whether the routing decision needs
the prompt's exact token count or can do with its cheap upper bound (`exact_prompt_needed`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, get_args

import msgspec

from gateway.canonical import Image, Message, Opaque, Operation, Part, Request, ResponseFormat, Role, Text, Tool
from gateway.errors import InvalidRequest
from gateway.policy.compile import COST_OBJECTIVES, prompt_needs
from gateway.policy.engine import Preferences, RequestFeatures
from gateway.policy.index import PolicyIndex
from gateway.tokens import FALLBACK_ENCODING, count_chat, count_text

_decode_prefs = msgspec.json.Decoder(Preferences).decode


def count_texts(texts: list[str], operation: Operation) -> int:
    if operation == "chat":
        return count_chat(texts, FALLBACK_ENCODING)
    return sum(count_text(t) for t in texts)


def count_prompt_tokens(request: Request) -> int:
    return count_texts(request.prompt_texts(), request.operation)


def preferences(request: Request, headers: Mapping[str, str]) -> Preferences | None:
    header = headers.get("x-strait-policy")
    body = request.preferences
    if header is None and body is None:
        return None
    try:
        if body is not None:
            return _decode_prefs(body)
        assert header is not None
        return _decode_prefs(header.encode())
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        where = "body field 'strait'" if body is not None else "header x-strait-policy"
        raise InvalidRequest(f"Invalid policy preferences in the {where}: {exc}", param="strait") from None


def extract(
    request: Request,
    headers: Mapping[str, str],
    prompt_tokens: int,
    route: str | None = None,
    prefs: Preferences | None = None,
    ingress_region: str | None = None,
) -> RequestFeatures:
    needs: set[str] = set()
    if request.operation == "chat" and request.uses_images():
        needs.add("vision")
    if request.tools:
        needs.add("tools")
    fmt = request.response_format
    if fmt is not None and fmt.type in ("json_object", "json_schema"):
        needs.add("json")
    return RequestFeatures(
        route=route if route is not None else request.model,
        operation=request.operation,
        prompt_tokens=prompt_tokens,
        max_tokens=request.max_output_tokens,
        needs=frozenset(needs),
        headers=headers,
        preferences=prefs if prefs is not None else preferences(request, headers),
        messages=request.messages,
        ingress_region=ingress_region,
        inputs=request.inputs,
    )


# ---- whether the decision needs the exact prompt size ----


def exact_prompt_needed(
    index: PolicyIndex, request: Request, route: str, bound: int, prefs: Preferences | None, explain: bool
) -> bool:
    """Whether the engine's answer may depend on the exact prompt tokens, given `bound` >= them: a rule on
    prompt size, a cost-ranked objective, an explain table (it shows costs), or a context window the
    bound plus max_tokens does not clear. Otherwise the bound is as good as the count."""
    if explain or (prefs is not None and prefs.objective in COST_OBJECTIVES):
        return True
    needs = index.prompt_needs.get((route, request.operation))
    if needs is None:  # a route the policy does not know: refused by the engine, nothing kept
        needs = prompt_needs(index.routes, index.policy.rules, index.targets, route, request.operation)
    return needs.always or (needs.window is not None and bound + (request.max_output_tokens or 0) > needs.window)


# ---- requests given as OpenAI-shaped mappings (offline tools: explain, test, diff) ----


def operation_of(payload: Mapping[str, Any]) -> Operation:
    if "messages" in payload:
        return "chat"
    if "input" in payload:
        return "embeddings"
    return "completions"


def _part(part: Any) -> Part:
    if isinstance(part, Mapping):
        if part.get("type") == "image_url":
            return Image(url=str((part.get("image_url") or {}).get("url", "")))
        if isinstance(part.get("text"), str):
            return Text(text=part["text"])
    return Opaque(protocol="openai", kind=str(part.get("type")) if isinstance(part, Mapping) else "")


_ROLES: dict[str, Role] = {r: r for r in get_args(Role)}


def _messages(payload: Mapping[str, Any]) -> tuple[Message, ...]:
    out = []
    for m in payload.get("messages") or ():
        content = m.get("content") if isinstance(m, Mapping) else None
        parts: tuple[Part, ...] = ()
        if isinstance(content, str):
            parts = (Text(text=content),)
        elif isinstance(content, list):
            parts = tuple(_part(p) for p in content)
        given = m.get("role") if isinstance(m, Mapping) else None
        # Roles kept: a route's prefix affinity keys on the messages through the first user message.
        role: Role = _ROLES.get(given, "user") if isinstance(given, str) else "user"
        out.append(Message(role=role, content=parts))
    return tuple(out)


def request_of(payload: Mapping[str, Any]) -> Request:
    """A canonical request from an OpenAI-shaped mapping, leniently (a policy test file, not a client)."""
    op = operation_of(payload)
    raw = payload.get("prompt", payload.get("input"))
    inputs = (
        (raw,) if isinstance(raw, str) else tuple(x for x in raw if isinstance(x, str)) if isinstance(raw, list) else ()
    )
    fmt = payload.get("response_format")
    max_tokens = payload.get("max_completion_tokens") or payload.get("max_tokens")
    strait = payload.get("strait")
    return Request(
        operation=op,
        model=str(payload.get("model", "")),
        messages=_messages(payload) if op == "chat" else (),
        inputs=inputs,
        tools=tuple(Tool(name="tool") for _ in payload.get("tools") or ()),
        response_format=ResponseFormat(type=fmt["type"]) if isinstance(fmt, Mapping) and "type" in fmt else None,
        max_output_tokens=max_tokens if isinstance(max_tokens, int) else None,
        preferences=msgspec.Raw(msgspec.json.encode(strait)) if strait is not None else None,
    )
