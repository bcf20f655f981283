"""Encodes a streamed answer for an Anthropic client: the pipeline's chunks (OpenAI chunk JSON, as the
relay hands them over) become Anthropic's named events, in Anthropic's order:

    message_start, then per content block content_block_start, content_block_delta (text_delta,
    input_json_delta, or thinking_delta for an upstream's `reasoning_content`)..., content_block_stop,
    then message_delta (stop_reason, usage), message_stop.

A native Anthropic upstream's thinking comes with its signature in the chunk's `thinking_blocks` (the
extension field, docs/anthropic.md): a `signature_delta` that closes the thinking block, or a whole
`redacted_thinking` block. When the upstream spoke Messages itself (`ctx.native`, contracts.NativeAnswer)
its own events are relayed instead, each as it came (`event:` line, then its data bytes), in its order,
pings included; only a failure is the gateway's own `event: error` (redacted).

Every event has its `event:` line (the SDK skips unnamed ones). A stream that failed ends with
`event: error` in Anthropic's envelope and no message_stop, so the SDK raises instead of returning a
truncated message. One encoder per request (it holds the open block); only this route pays for it.
"""

from __future__ import annotations

from typing import Any

import msgspec

from gateway.api.anthropic.encode import (
    CallExtra,
    ChatUsage,
    ThinkingPiece,
    call_signature,
    ending,
    error_body,
    message_id,
    signature_block,
    usage_of,
)
from gateway.context import RequestContext
from gateway.contracts import End
from gateway.upstream.sse import DONE

_encode = msgspec.json.encode


class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _CallDelta(msgspec.Struct):
    index: int = 0
    id: str | None = None
    function: _Function | None = None
    extra_content: CallExtra | None = None  # Gemini's thought signature (on the call's first delta)


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    thinking_blocks: list[ThinkingPiece] | None = None
    tool_calls: list[_CallDelta] | None = None


class _Choice(msgspec.Struct):
    index: int = 0
    delta: _Delta | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # vLLM's matched stop sequence


class _Chunk(msgspec.Struct):
    id: str = ""
    choices: list[_Choice] = []
    usage: ChatUsage | None = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode


def event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _encode(data) + b"\n\n"


def frames(native: list[tuple[bytes, bytes]]) -> bytes:
    """An upstream's own events, framed as Anthropic frames them."""
    return b"".join(b"event: " + name + b"\ndata: " + data + b"\n\n" for name, data in native)


class MessagesStream:
    """The stream's state: whether message_start went out, the open block, the stop reason and usage."""

    def __init__(self, ctx: RequestContext, model: str) -> None:
        self.ctx = ctx
        self.model = model
        self.started = False
        self.blocks = 0  # content blocks started so far (the next one's index)
        self.open: str | None = None  # "text", or the tool call index ("tool:N") of the open block
        self.finish: str | None = None
        self.matched: str | int | None = None
        self.usage: ChatUsage | None = None

    def _start(self, upstream_id: str, out: list[bytes]) -> None:
        self.started = True
        prompt = self.ctx.prompt_tokens
        # Counted here once when cheap (as Anthropic reports it up front); message_delta has the upstream's.
        known = prompt.known if prompt.known is not None or prompt.long() else prompt.count_now()
        message: dict[str, Any] = {
            "id": message_id(upstream_id, self.ctx.request_id),
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": known or 0, "output_tokens": 0},
        }
        out.append(event("message_start", {"type": "message_start", "message": message}))

    def _close(self, out: list[bytes]) -> None:
        if self.open is not None:
            out.append(event("content_block_stop", {"type": "content_block_stop", "index": self.blocks - 1}))
            self.open = None

    def _open(self, kind: str, block: dict[str, Any], out: list[bytes]) -> None:
        self._close(out)
        out.append(
            event("content_block_start", {"type": "content_block_start", "index": self.blocks, "content_block": block})
        )
        self.blocks += 1
        self.open = kind

    def _delta(self, delta: dict[str, Any], out: list[bytes]) -> None:
        out.append(
            event("content_block_delta", {"type": "content_block_delta", "index": self.blocks - 1, "delta": delta})
        )

    def batch(self, payloads: list[bytes]) -> bytes:
        native = self.ctx.native
        if native is not None:
            return frames(native.take())
        out: list[bytes] = []
        for payload in payloads:
            if payload == DONE:
                continue
            try:
                chunk = _decode_chunk(payload)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue  # the relay checked every event; nothing of a foreign one can be shown
            if not self.started:
                self._start(chunk.id, out)
            if chunk.usage is not None:
                self.usage = chunk.usage
            for choice in chunk.choices:
                if choice.index != 0:
                    continue  # Messages has one answer
                delta = choice.delta
                if delta is not None:
                    if delta.reasoning_content:
                        if self.open != "thinking":
                            self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""}, out)
                        self._delta({"type": "thinking_delta", "thinking": delta.reasoning_content}, out)
                    for piece in delta.thinking_blocks or ():
                        self._thinking_piece(piece, out)
                    if delta.content:
                        if self.open != "text":
                            self._open("text", {"type": "text", "text": ""}, out)
                        self._delta({"type": "text_delta", "text": delta.content}, out)
                    for call in delta.tool_calls or ():
                        kind = f"tool:{call.index}"
                        f = call.function
                        if self.open != kind:
                            signature = call_signature(call.extra_content)
                            if signature is not None:
                                # Its own signed thinking block first, as the non-streamed answer has it.
                                self._open("signature", {**signature_block(""), "signature": ""}, out)
                                self._delta({"type": "signature_delta", "signature": signature}, out)
                            name = (f.name if f is not None else None) or ""
                            block = {"type": "tool_use", "id": call.id or "", "name": name, "input": {}}
                            self._open(kind, block, out)
                        if f is not None and f.arguments:
                            self._delta({"type": "input_json_delta", "partial_json": f.arguments}, out)
                if choice.finish_reason is not None:
                    self.finish = choice.finish_reason
                    self.matched = choice.stop_reason
        return b"".join(out)

    def _thinking_piece(self, piece: ThinkingPiece, out: list[bytes]) -> None:
        """A signature ends the open thinking block (one is opened for a block without text); a redacted
        block is whole at once. The next reasoning opens a new thinking block."""
        if piece.type == "redacted_thinking":
            self._open("redacted", {"type": "redacted_thinking", "data": piece.data or ""}, out)
            return
        if piece.signature is None:
            return
        if self.open != "thinking":
            self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""}, out)
        self._delta({"type": "signature_delta", "signature": piece.signature}, out)
        self.open = "signed"

    def end(self, ctx: RequestContext, end: End) -> bytes:
        """The stream's last events, by how it ended."""
        out: list[bytes] = []
        native = ctx.native
        if native is not None and end.outcome == "completed":
            return frames(native.take())  # the upstream's own message_delta and message_stop
        if end.outcome == "completed":
            if not self.started:
                self._start("", out)
            self._close(out)
            usage = usage_of(self.usage)
            if self.usage is None:  # the upstream reported none: what the relay counted
                usage = {"input_tokens": ctx.prompt_tokens.count_now(), "output_tokens": end.completion_tokens or 0}
            stops = ctx.request.stop if ctx.request is not None else ()
            reason, sequence = ending(self.finish, self.matched, stops)
            delta = {"stop_reason": reason, "stop_sequence": sequence}
            out.append(event("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}))
            out.append(event("message_stop", {"type": "message_stop"}))
            return b"".join(out)
        if end.error is not None:
            status = end.status if end.status >= 400 else 500
            body = msgspec.json.decode(error_body(status, end.error.message, ctx.request_id))
            return event("error", body)
        return b""

    async def settle(self, ctx: RequestContext) -> None:
        return None  # nothing to do before the last byte

    def cut(self, ctx: RequestContext) -> bytes:
        message = "The gateway shut down before the answer was complete (its grace period ran out); retry."
        return event("error", msgspec.json.decode(error_body(529, message, ctx.request_id)))
