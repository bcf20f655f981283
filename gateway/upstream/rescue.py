"""Mid-stream rescue (a route's `resume: continue`): what the client already has of a broken stream, and
the stitching of a continuation into the same stream.

When a committed stream breaks (cut, stall, error event), the relay (gateway.stages.respond) asks the
dispatcher to continue it on the plan's next deployment that declares `prefill`, with the text already
sent as the assistant's prefix (gateway.passthrough.with_prefill). The continuation's events are then
rewritten so the client sees one stream: the `id`, `created`, `model` and `system_fingerprint` the client
already saw, no second role chunk, and one usage chunk summing the billed tokens of every attempt that
produced part of the answer. Only the rare path pays for this: the events relayed before a break are
decoded when it breaks (and, for a long answer, each time what the relay keeps of them doubles:
`compacted` keeps their text and ids only, so a stream holds about its text, not every event); a
continuation's events are re-encoded one by one.

A stream can be continued only when it is one choice (`n` 1) of a chat answer whose content is plain text
(no tool call) and which had not finished; otherwise it ends with its original error.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgspec

from gateway.accounting.counts import counts_of, usage_of
from gateway.upstream.sse import DONE
from gateway.upstream.wire import Usage


class _Delta(msgspec.Struct):
    content: str | None = None
    tool_calls: list[object] | None = None
    function_call: object | None = None


class _Choice(msgspec.Struct):
    index: int = 0
    delta: _Delta | None = None
    finish_reason: str | None = None


class _Chunk(msgspec.Struct):
    id: str | None = None
    created: int | None = None
    model: str | None = None
    system_fingerprint: str | None = None
    choices: list[_Choice] | None = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError)
# The fields of a chunk the client already saw, kept across the continuation.
_IDENTITY = ("id", "created", "model", "system_fingerprint")


@dataclass(frozen=True, slots=True)
class Sent:
    """What the client has of a broken stream: its text, and the identity fields its chunks carried."""

    text: str
    identity: dict[str, Any]


def _scan(events: Iterable[bytes]) -> tuple[list[str], dict[str, Any] | None] | None:
    """The text pieces of choice 0 and the first chunk's identity; None when the stream can never be
    continued (a tool call, a finished choice, another choice)."""
    parts: list[str] = []
    identity: dict[str, Any] | None = None
    for payload in events:
        try:
            chunk = _decode_chunk(payload)
        except _DECODE_ERRORS:
            continue
        if identity is None and chunk.id is not None:
            identity = {name: getattr(chunk, name) for name in _IDENTITY if getattr(chunk, name) is not None}
        for choice in chunk.choices or ():
            if choice.index != 0 or choice.finish_reason is not None:
                return None
            delta = choice.delta
            if delta is None:
                continue
            if delta.tool_calls or delta.function_call:
                return None
            if delta.content:
                parts.append(delta.content)
    return parts, identity


def what_was_sent(events: Iterable[bytes]) -> Sent | None:
    """The text of choice 0 relayed so far and the first chunk's identity; None when the stream cannot be
    continued (a tool call, a finished choice, another choice, no text at all)."""
    scanned = _scan(events)
    if scanned is None:
        return None
    parts, identity = scanned
    if not parts or identity is None:
        return None
    return Sent("".join(parts), identity)


def compacted(events: Iterable[bytes]) -> list[bytes] | None:
    """The relayed events as one chunk that `what_was_sent` reads the same (its text, the identity if one
    came yet): what the relay keeps of a long stream in case it breaks. None when it can never be
    continued (nothing need be kept)."""
    scanned = _scan(events)
    if scanned is None:
        return None
    parts, identity = scanned
    if not parts and identity is None:
        return []
    chunk = {**(identity or {}), "choices": [{"index": 0, "delta": {"content": "".join(parts)}}]}
    return [msgspec.json.encode(chunk)]


def add_usage(a: Usage | None, b: Usage) -> Usage:
    """The billed tokens of two attempts, every kind summed (cache reads and writes, reasoning)."""
    if a is None:
        return b
    return usage_of(counts_of(a) + counts_of(b))


def _add_detail(usage: dict[str, Any], details: str, name: str, extra: int) -> None:
    """Adds `extra` to `usage[details][name]` (creating the details object when it has none)."""
    if not extra:
        return
    block = usage.get(details)
    if not isinstance(block, dict):
        block = usage[details] = {}
    value = block.get(name)
    block[name] = (value if isinstance(value, int) and not isinstance(value, bool) else 0) + extra


def _role_only(choices: list[Any]) -> bool:
    """A chunk whose every choice only announces the assistant's role (the client already has it)."""
    for choice in choices:
        if not isinstance(choice, dict) or choice.get("finish_reason") is not None:
            return False
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return False
        if any(value for key, value in delta.items() if key != "role"):
            return False
    return True


class Stitch:
    """Rewrites a continuation's events into the client's stream."""

    __slots__ = ("_earlier", "_identity")

    def __init__(self, identity: dict[str, Any], earlier: Usage) -> None:
        self._identity = identity
        # The billed tokens of every attempt before the continuation, by kind: added to its usage chunk.
        self._earlier = counts_of(earlier)

    def events(self, batch: list[bytes]) -> list[bytes]:
        out: list[bytes] = []
        for payload in batch:
            if payload == DONE:
                out.append(payload)
                continue
            try:
                chunk = msgspec.json.decode(payload)
            except msgspec.DecodeError:
                out.append(payload)  # the relay already skipped and counted what it could not read
                continue
            if not isinstance(chunk, dict) or "error" in chunk:
                out.append(payload)
                continue
            choices = chunk.get("choices")
            if isinstance(choices, list) and choices and _role_only(choices):
                continue
            if isinstance(choices, list):
                for choice in choices:
                    delta = choice.get("delta") if isinstance(choice, dict) else None
                    if isinstance(delta, dict):
                        delta.pop("role", None)
            for name, value in self._identity.items():
                if name in chunk:
                    chunk[name] = value
            usage = chunk.get("usage")
            if isinstance(usage, dict):
                earlier = self._earlier
                for name, extra in (
                    ("prompt_tokens", earlier.prompt),
                    ("completion_tokens", earlier.completion),
                    ("total_tokens", earlier.total),
                ):
                    value = usage.get(name)
                    if isinstance(value, int) and not isinstance(value, bool):
                        usage[name] = value + extra
                for details, name, extra in (
                    ("prompt_tokens_details", "cached_tokens", earlier.cached),
                    ("prompt_tokens_details", "cache_write_tokens", earlier.cache_write),
                    ("completion_tokens_details", "reasoning_tokens", earlier.reasoning),
                ):
                    _add_detail(usage, details, name, extra)
            out.append(msgspec.json.encode(chunk))
        return out
