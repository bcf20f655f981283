"""An OpenAI Responses upstream's answer, read for the pipeline: the `openai` adapter of a backend with
the `responses` capability sends a Responses client's own body to `{base_url}/responses` (passthrough)
and keeps the answer as the upstream sent it (contracts.NativeAnswer, protocol "responses") for the
client, while the taps (accounting, limits, commit, cache) read this translation into OpenAI chat:

    JSON response object     -> one chat.completion: the output_text parts joined as `content`, the
                                reasoning summaries/text as `reasoning_content`, function_call items as
                                `tool_calls`; `finish_reason` tool_calls / length (incomplete at
                                max_output_tokens) / stop; usage input/output/cached/reasoning tokens
    response.created         -> a role chunk
    response.output_text.delta, response.refusal.delta        -> `content`
    response.reasoning_summary_text.delta, response.reasoning_text.delta -> `reasoning_content`
    response.output_item.added (function_call)                -> a tool call's first delta (id, name)
    response.function_call_arguments.delta                    -> that call's `arguments`
    response.completed / response.incomplete                  -> the finish chunk with usage, then `[DONE]`
    response.failed, error   -> an in-band `{"error": {...}}` chunk: the relay ends the stream with it
    anything else (added/done bookkeeping, events a later API adds) -> nothing

Every event but `error` and `response.failed` is also kept, in order, as (type, data bytes) for the edge to relay unchanged.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from gateway.contracts import NativeAnswer
from gateway.upstream.sse import DONE, SSEDecoder

PROTOCOL = "responses"
_encode = msgspec.json.encode


class _InputDetails(msgspec.Struct):
    cached_tokens: int = 0


class _OutputDetails(msgspec.Struct):
    reasoning_tokens: int = 0


class ResponsesUsage(msgspec.Struct):
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int | None = None
    input_tokens_details: _InputDetails | None = None
    output_tokens_details: _OutputDetails | None = None


class _Part(msgspec.Struct):
    type: str = ""
    text: str | None = None
    refusal: str | None = None


class _Item(msgspec.Struct):
    type: str = ""
    content: list[_Part] | None = None
    summary: list[_Part] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None


class _Incomplete(msgspec.Struct):
    reason: str | None = None


class ResponseObject(msgspec.Struct):
    id: str = ""
    model: str = ""
    created_at: int | None = None
    status: str | None = None
    output: list[_Item] = []
    usage: ResponsesUsage | None = None
    incomplete_details: _Incomplete | None = None


class _Error(msgspec.Struct):
    message: str | None = None
    code: str | None = None
    type: str | None = None


class StreamEvent(msgspec.Struct):
    type: str
    delta: str | None = None
    output_index: int = 0
    item: _Item | None = None
    response: ResponseObject | None = None
    message: str | None = None  # the `error` event's own fields
    code: str | None = None


# Not relayed as the upstream sent them: the pipeline ends a failed stream with its own (redacted) events.
_FAILURES = frozenset({"error", "response.failed"})
_decode_response = msgspec.json.Decoder(ResponseObject).decode
decode_event = msgspec.json.Decoder(StreamEvent).decode


def chat_usage(usage: ResponsesUsage) -> dict[str, Any]:
    out: dict[str, Any] = {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens
        if usage.total_tokens is not None
        else usage.input_tokens + usage.output_tokens,
    }
    if usage.input_tokens_details is not None:
        out["prompt_tokens_details"] = {"cached_tokens": usage.input_tokens_details.cached_tokens}
    if usage.output_tokens_details is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": usage.output_tokens_details.reasoning_tokens}
    return out


def _finish(response: ResponseObject, calls: bool) -> str:
    if response.status == "incomplete":
        reason = response.incomplete_details.reason if response.incomplete_details is not None else None
        return "content_filter" if reason == "content_filter" else "length"
    return "tool_calls" if calls else "stop"


def chat_completion(raw: bytes) -> bytes:
    """A Responses response object (JSON bytes) as one chat.completion; raises msgspec errors on another shape."""
    response = _decode_response(raw)
    text: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    for item in response.output:
        if item.type == "message":
            for part in item.content or ():
                piece = part.text if part.type == "output_text" else part.refusal
                if piece:
                    text.append(piece)
        elif item.type == "reasoning":
            for part in (*(item.summary or ()), *(item.content or ())):
                if part.text:
                    reasoning.append(part.text)
        elif item.type == "function_call":
            function = {"name": item.name or "", "arguments": item.arguments or ""}
            calls.append({"id": item.call_id or "", "type": "function", "function": function})
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) if text or not calls else None}
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    out: dict[str, Any] = {
        "id": response.id,
        "object": "chat.completion",
        "created": response.created_at or int(time.time()),
        "model": response.model,
        "choices": [{"index": 0, "message": message, "finish_reason": _finish(response, bool(calls))}],
    }
    if response.usage is not None:
        out["usage"] = chat_usage(response.usage)
    return _encode(out)


class ChunkTranslator:
    """One stream's translation state: the response's id and model, the function calls by output index."""

    __slots__ = ("_calls", "_created", "_id", "_model", "ended", "errored")

    def __init__(self) -> None:
        self._id = ""
        self._model = ""
        self._created = int(time.time())
        self._calls: dict[int, int] = {}  # output_index -> tool call index
        self.ended = False  # response.completed or response.incomplete seen
        self.errored = False  # response.failed or error seen

    def _chunk(self, delta: dict[str, Any] | None, finish: str | None = None, usage: Any = None) -> bytes:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
        chunk: dict[str, Any] = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": choices,
        }
        if usage is not None:
            chunk["usage"] = usage
        return _encode(chunk)

    def event(self, parsed: StreamEvent) -> list[bytes]:
        kind = parsed.type
        if kind == "response.created":
            if parsed.response is not None:
                self._id, self._model = parsed.response.id, parsed.response.model
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind in ("response.output_text.delta", "response.refusal.delta"):
            return [self._chunk({"content": parsed.delta})] if parsed.delta else []
        if kind in ("response.reasoning_summary_text.delta", "response.reasoning_text.delta"):
            return [self._chunk({"reasoning_content": parsed.delta})] if parsed.delta else []
        if kind == "response.output_item.added" and parsed.item is not None and parsed.item.type == "function_call":
            index = self._calls.setdefault(parsed.output_index, len(self._calls))
            item = parsed.item
            function = {"name": item.name or "", "arguments": item.arguments or ""}
            call = {"index": index, "id": item.call_id or "", "type": "function", "function": function}
            return [self._chunk({"tool_calls": [call]})]
        if kind == "response.function_call_arguments.delta":
            known = self._calls.get(parsed.output_index)
            if known is None or not parsed.delta:
                return []
            return [self._chunk({"tool_calls": [{"index": known, "function": {"arguments": parsed.delta}}]})]
        if kind in ("response.completed", "response.incomplete"):
            self.ended = True
            response = parsed.response or ResponseObject(status="incomplete" if kind.endswith("incomplete") else None)
            finish = self._chunk({}, _finish(response, bool(self._calls)))
            usage = chat_usage(response.usage) if response.usage is not None else None
            return [finish, self._chunk(None, usage=usage)] if usage is not None else [finish]
        if kind in ("response.failed", "error"):
            self.errored = True
            message = parsed.message or "The upstream failed the response."
            return [
                _encode({"error": {"message": message, "type": "api_error", "code": parsed.code or "upstream_error"}})
            ]
        return []


class ResponsesStreamState:
    """SSE framing, the translation and the native events kept for the edge, for one upstream stream."""

    __slots__ = ("decoder", "done", "native", "refused", "translator")

    def __init__(self, max_event_bytes: int, native: NativeAnswer | None) -> None:
        self.decoder = SSEDecoder(max_event_bytes)
        self.translator = ChunkTranslator()
        self.native = native
        self.done = False
        self.refused: list[bytes] = []  # the translation of a read that held an oversize line (drained)

    def translate(self, payloads: list[bytes]) -> list[bytes]:
        out: list[bytes] = []
        translator = self.translator
        native = self.native
        for payload in payloads:
            if translator.ended or translator.errored:
                break  # nothing after the end (or an error) is the answer's
            try:
                parsed = decode_event(payload)
            except (msgspec.DecodeError, msgspec.ValidationError):
                out.append(payload)  # not an event: the relay counts it malformed and skips it
                continue
            if native is not None and parsed.type not in _FAILURES:
                native.frames.append((parsed.type.encode(), payload))
            out.extend(translator.event(parsed))
        if translator.ended and not self.done:
            self.done = True
            out.append(DONE)
        return out

    def feed(self, data: bytes) -> list[bytes]:
        """The chunks the complete events in `data` translate to (`b""`: the end of the body)."""
        return self.translate(self.decoder.feed(data) if data else self.decoder.close())
