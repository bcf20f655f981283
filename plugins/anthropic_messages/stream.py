"""Anthropic's streamed events, decoded one at a time into chat completion chunks (OpenAI's wire format,
what the relay, the commit hold, accounting and the cache read), as they arrive:

    message_start          -> a role chunk (`delta: {role: assistant, content: ""}`); its usage kept
    content_block_start    -> text: its text if any; tool_use: a tool call's first delta (id, name);
                              thinking: its text if any; redacted_thinking: `thinking_blocks: [{type:
                              redacted_thinking, data}]`
    content_block_delta    -> text_delta: `content`; input_json_delta: the call's `arguments`;
                              thinking_delta: `reasoning_content`; signature_delta: `thinking_blocks:
                              [{type: thinking, thinking: "", signature}]` (the block's signature, whole)
    message_delta          -> the chunk with `finish_reason` (and the matched `stop_sequence` as vLLM's
                              `stop_reason`); its usage kept (output tokens are cumulative)
    message_stop           -> the usage chunk (`choices: []`), then `[DONE]`
    ping, content_block_stop, unknown events -> nothing
    error                  -> an in-band `{"error": {...}}` chunk: the relay ends the stream with it
                              (redacted, no `[DONE]`), and before the first content the dispatcher fails
                              over as after a 5xx (an `overloaded_error` mid-stream included)

Every chunk carries the message's id and model (`chat.completion.chunk`). O(1) state per stream: the open
tool calls' indexes by block index, the usage so far, whether the stream ended.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from plugins.anthropic_messages.answer import MessagesUsage, chat_usage, finish_reason

_encode = msgspec.json.encode


class _Block(msgspec.Struct):
    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    thinking: str | None = None
    data: str | None = None


class _Delta(msgspec.Struct):
    type: str | None = None
    text: str | None = None
    partial_json: str | None = None
    thinking: str | None = None
    signature: str | None = None
    stop_reason: str | None = None
    stop_sequence: str | None = None


class _MessageHead(msgspec.Struct):
    id: str = ""
    model: str = ""
    usage: MessagesUsage | None = None


class _ErrorBody(msgspec.Struct):
    type: str | None = None
    message: str | None = None


class StreamEvent(msgspec.Struct):
    """One event's data (its `type` names it, as the `event:` line does)."""

    type: str
    message: _MessageHead | None = None
    index: int = 0
    content_block: _Block | None = None
    delta: _Delta | None = None
    usage: MessagesUsage | None = None
    error: _ErrorBody | None = None


decode_event = msgspec.json.Decoder(StreamEvent).decode


class ChunkTranslator:
    """One stream's translation. `event(parsed)` returns the chunks (JSON bytes) for one decoded event."""

    __slots__ = ("_calls", "_created", "_id", "_model", "_usage", "ended", "errored", "started")

    def __init__(self) -> None:
        self._id = ""
        self._model = ""
        self._created = int(time.time())
        self._calls: dict[int, int] = {}  # content block index -> tool call index
        self._usage = MessagesUsage()
        self.started = False
        self.ended = False  # message_stop seen
        self.errored = False  # an error event seen

    def _chunk(self, delta: dict[str, Any] | None, finish: str | None = None, **choice: Any) -> bytes:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, **choice}]
        return _encode(
            {
                "id": self._id,
                "object": "chat.completion.chunk",
                "created": self._created,
                "model": self._model,
                "choices": choices,
            }
        )

    def _merge_usage(self, usage: MessagesUsage | None) -> None:
        if usage is None:
            return
        kept = self._usage
        # message_delta's counts are cumulative: a field it sends replaces message_start's.
        for name in (
            "input_tokens",
            "output_tokens",
            "cache_read_input_tokens",
            "cache_creation_input_tokens",
            "inference_geo",
        ):
            value = getattr(usage, name)
            if value is not None:
                setattr(kept, name, value)

    def event(self, parsed: StreamEvent) -> list[bytes]:
        kind = parsed.type
        if kind == "message_start":
            head = parsed.message or _MessageHead()
            self._id, self._model = head.id, head.model
            self._merge_usage(head.usage)
            self.started = True
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            return self._block_start(parsed.index, parsed.content_block)
        if kind == "content_block_delta":
            return self._block_delta(parsed.index, parsed.delta)
        if kind == "message_delta":
            self._merge_usage(parsed.usage)
            delta = parsed.delta or _Delta()
            if delta.stop_reason is None:
                return []
            extra = {"stop_reason": delta.stop_sequence} if delta.stop_reason == "stop_sequence" else {}
            return [self._chunk({}, finish_reason(delta.stop_reason), **extra)]
        if kind == "message_stop":
            self.ended = True
            out = self._chunk(None)
            return [out[:-1] + b',"usage":' + _encode(chat_usage(self._usage)) + b"}"]
        if kind == "error":
            self.errored = True
            err = parsed.error or _ErrorBody()
            message = err.message or "The upstream failed mid-stream."
            return [_encode({"error": {"message": message, "type": err.type or "api_error", "code": err.type}})]
        return []  # ping, content_block_stop, and events a later API version adds

    def _block_start(self, index: int, block: _Block | None) -> list[bytes]:
        if block is None:
            return []
        if block.type == "text":
            return [self._chunk({"content": block.text})] if block.text else []
        if block.type == "tool_use":
            call = self._calls[index] = len(self._calls)
            first = {
                "index": call,
                "id": block.id or "",
                "type": "function",
                "function": {"name": block.name or "", "arguments": ""},
            }
            return [self._chunk({"tool_calls": [first]})]
        if block.type == "thinking":
            return [self._chunk({"reasoning_content": block.thinking})] if block.thinking else []
        if block.type == "redacted_thinking":
            return [self._chunk({"thinking_blocks": [{"type": "redacted_thinking", "data": block.data or ""}]})]
        return []  # server tool blocks: only an Anthropic client sends server tools, and it gets the upstream's own events

    def _block_delta(self, index: int, delta: _Delta | None) -> list[bytes]:
        if delta is None:
            return []
        kind = delta.type
        if kind == "text_delta":
            return [self._chunk({"content": delta.text})] if delta.text else []
        if kind == "input_json_delta":
            call = self._calls.get(index)
            if call is None or not delta.partial_json:
                return []
            return [self._chunk({"tool_calls": [{"index": call, "function": {"arguments": delta.partial_json}}]})]
        if kind == "thinking_delta":
            return [self._chunk({"reasoning_content": delta.thinking})] if delta.thinking else []
        if kind == "signature_delta" and delta.signature is not None:
            block = {"type": "thinking", "thinking": "", "signature": delta.signature}
            return [self._chunk({"thinking_blocks": [block]})]
        return []  # citations_delta and later kinds: nothing Chat Completions carries
