"""Encodes a streamed answer for a Responses client: the pipeline's chunks (OpenAI chat chunk JSON, as the
relay hands them over) become Responses' named events, each with its `sequence_number`, in OpenAI's order:

    response.created, response.in_progress, then per output item: response.output_item.added,
    (message) response.content_part.added, response.output_text.delta..., response.output_text.done,
    response.content_part.done; (reasoning) the same with response.reasoning_text.*; (function call)
    response.function_call_arguments.delta..., response.function_call_arguments.done;
    response.output_item.done; then response.completed (or response.incomplete at max_output_tokens).

A stream that failed ends with response.failed (the output so far, `error` set) and an `error` event,
never response.completed: the `openai` SDK raises on an event whose data has an `error` object, so the
error event carries one beside Responses' own `code`/`message` fields. One encoder per request (it holds
the open item and the output so far, for the final response object, which `settle` stores).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from gateway.api.responses.decode import Exchange
from gateway.api.responses.encode import (
    ChatUsage,
    call_item,
    item_id,
    message_item,
    output_text_part,
    reasoning_item,
    response_object,
    status_of,
    usage_of,
)
from gateway.context import RequestContext
from gateway.contracts import End
from gateway.upstream.sse import DONE

_encode = msgspec.json.encode
# Stores the final response object (the edge's; None: not stored).
Save = Callable[[dict[str, Any]], Awaitable[None]]


class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _CallDelta(msgspec.Struct):
    index: int = 0
    id: str | None = None
    function: _Function | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    refusal: str | None = None
    tool_calls: list[_CallDelta] | None = None


class _Choice(msgspec.Struct):
    index: int = 0
    delta: _Delta | None = None
    finish_reason: str | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []
    usage: ChatUsage | None = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode


class _Open:
    """The output item being streamed: its kind ("reasoning", "message", or "tool:N"), text so far, and a
    function call's id and name."""

    __slots__ = ("call_id", "index", "kind", "name", "text")

    def __init__(self, kind: str, index: int, call_id: str = "", name: str = "") -> None:
        self.kind = kind
        self.index = index  # its output_index
        self.text: list[str] = []
        self.call_id = call_id
        self.name = name


class ResponsesStream:
    def __init__(self, ctx: RequestContext, exchange: Exchange, save: Save | None) -> None:
        self.ctx = ctx
        self.exchange = exchange
        self.rid = ctx.request_id
        self.save = save
        self.seq = 0
        self.started = False
        self.output: list[dict[str, Any]] = []  # finished items
        self.open: _Open | None = None
        self.calls = 0  # function calls so far (their item ids)
        self.finish: str | None = None
        self.usage: ChatUsage | None = None
        self.final: dict[str, Any] | None = None  # the response object once complete (what `settle` stores)

    def _event(self, kind: str, out: list[bytes], **fields: Any) -> None:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        out.append(b"event: " + kind.encode() + b"\ndata: " + _encode(data) + b"\n\n")

    def _start(self, out: list[bytes]) -> None:
        self.started = True
        response = response_object(self.exchange, self.rid, status="in_progress", output=[], usage=None)
        self._event("response.created", out, response=response)
        self._event("response.in_progress", out, response=response)

    # -- items -----------------------------------------------------------------------------------------

    def _item(self, status: str) -> dict[str, Any]:
        """The open item as it stands, with `status`."""
        o = self.open
        assert o is not None
        text = "".join(o.text)
        if o.kind == "reasoning":
            return reasoning_item(self.rid, text, status)
        if o.kind == "message":
            return message_item(self.rid, [output_text_part(text)], status)
        return call_item(self.rid, self.calls - 1, o.call_id, o.name, text, status)

    def _open(self, kind: str, out: list[bytes], call_id: str = "", name: str = "") -> None:
        self._close(out)
        index = len(self.output)
        if kind.startswith("tool:"):
            self.calls += 1
        self.open = _Open(kind, index, call_id, name)
        item = self._item("in_progress")
        if not kind.startswith("tool:"):
            item["content"] = []  # its parts come with content_part.added
        self._event("response.output_item.added", out, output_index=index, item=item)
        if kind == "message":
            part = output_text_part("")
        elif kind == "reasoning":
            part = {"type": "reasoning_text", "text": ""}
        else:
            return
        ids = {"item_id": item["id"], "output_index": index, "content_index": 0}
        self._event("response.content_part.added", out, **ids, part=part)

    def _close(self, out: list[bytes], status: str = "completed") -> None:
        o = self.open
        if o is None:
            return
        item = self._item(status)
        text = "".join(o.text)
        ids = {"item_id": item["id"], "output_index": o.index}
        if o.kind == "message":
            self._event("response.output_text.done", out, **ids, content_index=0, text=text, logprobs=[])
            self._event("response.content_part.done", out, **ids, content_index=0, part=item["content"][0])
        elif o.kind == "reasoning":
            self._event("response.reasoning_text.done", out, **ids, content_index=0, text=text)
            self._event("response.content_part.done", out, **ids, content_index=0, part=item["content"][0])
        else:
            self._event("response.function_call_arguments.done", out, **ids, name=o.name, arguments=text)
        self._event("response.output_item.done", out, output_index=o.index, item=item)
        self.output.append(item)
        self.open = None

    def _text(self, delta: str, out: list[bytes]) -> None:
        """A piece of the open item's text: output text, reasoning text or a call's arguments."""
        o = self.open
        assert o is not None
        o.text.append(delta)
        if o.kind == "message":
            ids = {"item_id": item_id("msg", self.rid), "output_index": o.index, "content_index": 0}
            self._event("response.output_text.delta", out, **ids, delta=delta, logprobs=[])
        elif o.kind == "reasoning":
            ids = {"item_id": item_id("rs", self.rid), "output_index": o.index, "content_index": 0}
            self._event("response.reasoning_text.delta", out, **ids, delta=delta)
        else:
            ids = {"item_id": item_id("fc", self.rid, self.calls - 1), "output_index": o.index}
            self._event("response.function_call_arguments.delta", out, **ids, delta=delta)

    # -- the codec ---------------------------------------------------------------------------------------

    def batch(self, payloads: list[bytes]) -> bytes:
        out: list[bytes] = []
        if not self.started:
            self._start(out)
        for payload in payloads:
            if payload == DONE:
                continue
            try:
                chunk = _decode_chunk(payload)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue  # the relay checked every event; nothing of a foreign one can be shown
            if chunk.usage is not None:
                self.usage = chunk.usage
            for choice in chunk.choices:
                if choice.index != 0:
                    continue  # a response has one answer
                delta = choice.delta
                if delta is not None:
                    self._delta(delta, out)
                if choice.finish_reason is not None:
                    self.finish = choice.finish_reason
        return b"".join(out)

    def _delta(self, delta: _Delta, out: list[bytes]) -> None:
        if delta.reasoning_content:
            if self.open is None or self.open.kind != "reasoning":
                self._open("reasoning", out)
            self._text(delta.reasoning_content, out)
        text = delta.content or delta.refusal
        if text:
            if self.open is None or self.open.kind != "message":
                self._open("message", out)
            self._text(text, out)
        for call in delta.tool_calls or ():
            kind = f"tool:{call.index}"
            f = call.function
            if self.open is None or self.open.kind != kind:
                call_id = call.id or item_id("call", self.rid, self.calls)
                self._open(kind, out, call_id, (f.name if f is not None else None) or "")
            if f is not None and f.arguments:
                self._text(f.arguments, out)

    def end(self, ctx: RequestContext, end: End) -> bytes:
        """The stream's last events, by how it ended."""
        out: list[bytes] = []
        if end.outcome == "completed":
            if not self.started:
                self._start(out)
            status, incomplete = status_of(self.finish)
            self._close(out, "incomplete" if incomplete else "completed")  # the item the answer stopped in
            estimate = (ctx.prompt_tokens.count_now(), end.completion_tokens or 0)
            usage = usage_of(self.usage, estimate)
            self.final = response_object(
                self.exchange, self.rid, status=status, output=self.output, usage=usage, incomplete=incomplete
            )
            self._event("response.incomplete" if incomplete else "response.completed", out, response=self.final)
            return b"".join(out)
        if end.error is not None:
            server_side = end.status >= 500 or end.status < 400
            code = end.error.code or ("server_error" if server_side else "invalid_request_error")
            return self._failed(out, end.error.message, end.error.type, code)
        return b""

    def _failed(self, out: list[bytes], message: str, kind: str, code: str) -> bytes:
        if not self.started:
            self._start(out)
        output = self.output + ([self._item("incomplete")] if self.open is not None else [])
        # The response object's `code` is one of OpenAI's listed few (the SDK's type says which); the
        # gateway's own code and type ride in the error event and in `type` here.
        listed = "rate_limit_exceeded" if code == "rate_limit_exceeded" else "server_error"
        error = {"code": listed, "message": message, "type": kind}
        failed = response_object(self.exchange, self.rid, status="failed", output=output, usage=None, error=error)
        self._event("response.failed", out, response=failed)
        inner = {"type": kind, "code": code, "message": message, "param": None}
        self._event("error", out, code=code, message=message, param=None, error=inner)
        return b"".join(out)

    def cut(self, ctx: RequestContext) -> bytes:
        message = "The gateway shut down before the answer was complete (its grace period ran out); retry."
        return self._failed([], message, "server_error", "shutting_down")

    async def settle(self, ctx: RequestContext) -> None:
        """Store the complete response (when asked to) before the stream's last byte, so that a client's
        next request naming it as `previous_response_id` finds it."""
        if self.final is not None and self.save is not None:
            await self.save(self.final)
