"""What the engine needs to know about a request, read from its body and headers (shared by the
`route` stage and the offline tools: explain, test, diff)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from gateway.contracts import Operation
from gateway.errors import InvalidRequest
from gateway.policy.engine import Preferences, RequestFeatures
from gateway.tokens import FALLBACK_ENCODING, count_chat, count_text

_decode_prefs = msgspec.json.Decoder(Preferences).decode


def chat_texts(payload: Mapping[str, Any]) -> tuple[list[str], bool]:
    """Message texts, and whether any content part is an image."""
    texts: list[str] = []
    vision = False
    for m in payload.get("messages") or ():
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            parts = []
            for part in content:
                if isinstance(part, dict):
                    if part.get("type") == "image_url":
                        vision = True
                    text = part.get("text")
                    if isinstance(text, str):
                        parts.append(text)
            texts.append(" ".join(parts))
        else:
            texts.append("")
    return texts, vision


def prompt_texts(payload: Mapping[str, Any]) -> list[str]:
    raw = payload.get("prompt", payload.get("input"))
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list):
        return [x for x in raw if isinstance(x, str)]
    return []


def texts_of(payload: Mapping[str, Any], operation: Operation) -> tuple[list[str], bool]:
    """The prompt's texts (read once per request) and whether it contains an image."""
    return chat_texts(payload) if operation == "chat" else (prompt_texts(payload), False)


def count_texts(texts: list[str], operation: Operation) -> int:
    if operation == "chat":
        return count_chat(texts, FALLBACK_ENCODING)
    return sum(count_text(t) for t in texts)


def count_prompt_tokens(payload: Mapping[str, Any], operation: Operation) -> int:
    return count_texts(texts_of(payload, operation)[0], operation)


def operation_of(payload: Mapping[str, Any]) -> Operation:
    if "messages" in payload:
        return "chat"
    if "input" in payload:
        return "embeddings"
    return "completions"


def preferences(payload: Mapping[str, Any], headers: Mapping[str, str]) -> Preferences | None:
    header = headers.get("x-strait-policy")
    body = payload.get("strait")
    if header is None and body is None:
        return None
    try:
        if body is not None:
            return msgspec.convert(body, Preferences)
        assert header is not None
        return _decode_prefs(header.encode())
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        where = "body field 'strait'" if body is not None else "header x-strait-policy"
        raise InvalidRequest(f"Invalid policy preferences in the {where}: {exc}", param="strait") from None


def extract(
    payload: Mapping[str, Any],
    operation: Operation,
    headers: Mapping[str, str],
    prompt_tokens: int,
    route: str | None = None,
    vision: bool | None = None,
) -> RequestFeatures:
    needs: set[str] = set()
    if vision is None:
        vision = operation == "chat" and chat_texts(payload)[1]
    if vision:
        needs.add("vision")
    if payload.get("tools"):
        needs.add("tools")
    fmt = payload.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
        needs.add("json")
    max_tokens = payload.get("max_completion_tokens") or payload.get("max_tokens")
    return RequestFeatures(
        route=route if route is not None else str(payload.get("model", "")),
        operation=operation,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens if isinstance(max_tokens, int) else None,
        needs=frozenset(needs),
        headers=headers,
        preferences=preferences(payload, headers),
    )
