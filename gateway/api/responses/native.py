"""A Responses client's stream from an upstream that spoke Responses itself (contracts.NativeAnswer,
protocol "responses": plugins/openai_responses.py): the upstream's own events are relayed as they came
(`event: <type>` then its data bytes, in its order; what the pipeline read is their chat translation),
and its final response object (`response.completed` / `response.incomplete`) is what gets stored,
under the upstream's own id (the one the client was given).

A stream that failed or was cut ends as the translated stream would (gateway.api.responses.sse_encode:
response.failed, then `error`), numbered after the upstream's last `sequence_number`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import msgspec

from gateway.api.responses.sse_encode import ResponsesStream
from gateway.context import RequestContext
from gateway.contracts import End, NativeAnswer

# Stores an upstream's final response object (its JSON bytes).
SaveNative = Callable[[bytes], Awaitable[None]]
_FINAL = (b"response.completed", b"response.incomplete")


class _Seq(msgspec.Struct):
    sequence_number: int | None = None


class _Final(msgspec.Struct):
    response: msgspec.Raw


_decode_seq = msgspec.json.Decoder(_Seq).decode
_decode_final = msgspec.json.Decoder(_Final).decode


def frames(native: list[tuple[bytes, bytes]]) -> bytes:
    """An upstream's own events, framed as OpenAI frames them."""
    return b"".join(b"event: " + name + b"\ndata: " + data + b"\n\n" for name, data in native)


class NativeResponsesStream:
    def __init__(self, native: NativeAnswer, fallback: ResponsesStream, save: SaveNative | None) -> None:
        self.native = native
        self.fallback = fallback  # frames the gateway's own failure events
        self.save = save
        self.final: bytes | None = None

    def _relay(self) -> bytes:
        taken = self.native.take()
        for name, data in taken:
            if name in _FINAL:
                try:
                    self.final = bytes(_decode_final(data).response)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    self.final = None
        if taken:
            self.fallback.started = True  # response.created went out: a failure follows it
            try:
                seq = _decode_seq(taken[-1][1]).sequence_number
            except (msgspec.DecodeError, msgspec.ValidationError):
                seq = None
            if seq is not None:
                self.fallback.seq = seq + 1
        return frames(taken)

    def batch(self, payloads: list[bytes]) -> bytes:
        return self._relay()

    def end(self, ctx: RequestContext, end: End) -> bytes:
        if end.outcome == "completed":
            return self._relay()  # the upstream's own response.completed (and anything before it)
        self.final = None  # never stored: the client was not told it completed
        self.native.take()
        return self.fallback.end(ctx, end)

    def cut(self, ctx: RequestContext) -> bytes:
        self.final = None
        return self.fallback.cut(ctx)

    async def settle(self, ctx: RequestContext) -> None:
        if self.final is not None and self.save is not None:
            await self.save(self.final)
