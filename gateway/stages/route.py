"""Stage `route`: the policy engine decides where the request may run and in which order.

This stage gathers what the pure engine needs (prompt token estimate, capabilities used, the
client's narrowing preferences, live signals) and writes `ctx.route`, `ctx.plan` and `ctx.decision`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec

from gateway.context import RequestContext
from gateway.errors import InvalidRequest
from gateway.policy.engine import Preferences, RequestFeatures, decide
from gateway.policy.index import PolicyIndex
from gateway.tokens import FALLBACK_ENCODING, count_chat, count_text
from gateway.upstream.signals import LiveSignals

# Prompts larger than this (characters) are counted in a worker thread, off the event loop.
_OFFLOAD_CHARS = 20_000
_decode_prefs = msgspec.json.Decoder(Preferences).decode


def _texts(payload: dict[str, Any]) -> tuple[list[str], bool]:
    """Message texts and whether any part is an image."""
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


def _prompt_texts(payload: dict[str, Any]) -> list[str]:
    raw = payload.get("prompt", payload.get("input"))
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list):
        return [x for x in raw if isinstance(x, str)]
    return []


async def estimate_prompt_tokens(ctx: RequestContext) -> tuple[int, bool]:
    if ctx.operation == "chat":
        texts, vision = _texts(ctx.payload)
        size = sum(len(t) for t in texts)
        if size > _OFFLOAD_CHARS:
            return await asyncio.to_thread(count_chat, texts, FALLBACK_ENCODING), vision
        return count_chat(texts, FALLBACK_ENCODING), vision
    texts = _prompt_texts(ctx.payload)
    if sum(len(t) for t in texts) > _OFFLOAD_CHARS:
        return await asyncio.to_thread(lambda: sum(count_text(t) for t in texts)), False
    return sum(count_text(t) for t in texts), False


def preferences(ctx: RequestContext) -> Preferences | None:
    header = ctx.headers.get("x-strait-policy")
    body = ctx.payload.get("strait")
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


class RouteStage:
    name = "route"

    def __init__(self, index: PolicyIndex, signals: LiveSignals) -> None:
        self.index = index
        self.signals = signals

    async def on_request(self, ctx: RequestContext) -> None:
        assert ctx.principal is not None
        p = ctx.payload
        prompt_tokens, vision = await estimate_prompt_tokens(ctx)
        ctx.prompt_tokens = prompt_tokens
        needs: set[str] = set()
        if vision:
            needs.add("vision")
        if p.get("tools"):
            needs.add("tools")
        fmt = p.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
            needs.add("json")
        max_tokens = p.get("max_completion_tokens") or p.get("max_tokens")
        features = RequestFeatures(
            route=ctx.route_name,
            operation=ctx.operation,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens if isinstance(max_tokens, int) else None,
            needs=frozenset(needs),
            headers=ctx.headers,
            preferences=preferences(ctx),
        )
        plan = decide(
            self.index, ctx.principal, features, self.signals.snapshot(time.monotonic()), decision_id=ctx.decision_id
        )
        ctx.route = plan.route
        ctx.plan = plan.targets
        ctx.decision = plan.decision
