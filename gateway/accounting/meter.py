"""Turns what an upstream answered into tokens and money.

Provider usage wins when present; otherwise the tokens are counted with tiktoken over what the upstream
actually produced and the record says `usage_source=estimated`. Never 0 for "unknown": an answer with
text has tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from gateway.policy.model import Price
from gateway.tokens import count_text
from gateway.upstream.wire import PromptTokensDetails, UpstreamErrorBody, Usage


class _FunctionArgs(msgspec.Struct):
    arguments: str | None = None


class _ToolDelta(msgspec.Struct):
    function: _FunctionArgs | None = None


class _Message(msgspec.Struct):
    content: str | None = None
    tool_calls: list[_ToolDelta] | None = None


class _StreamDelta(msgspec.Struct):
    content: str | None = None
    tool_calls: list[_ToolDelta] | None = None


class _Choice(msgspec.Struct):
    text: str | None = None
    message: _Message | None = None
    delta: _StreamDelta | None = None


class _Answer(msgspec.Struct):
    choices: list[_Choice] | None = None


_decode_answer = msgspec.json.Decoder(_Answer).decode


def _texts(answer: _Answer) -> Iterable[str]:
    for c in answer.choices or ():
        for part in (c.message, c.delta):
            if part is None:
                continue
            if part.content:
                yield part.content
            for call in part.tool_calls or ():
                if call.function is not None and call.function.arguments:
                    yield call.function.arguments
        if c.text:
            yield c.text


def completion_tokens_of(payloads: Iterable[bytes], encoding: str) -> int:
    """tiktoken count of the text in a body or in streamed chunks (content, text, tool arguments)."""
    total = 0
    for payload in payloads:
        try:
            answer = _decode_answer(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        total += sum(count_text(t, encoding) for t in _texts(answer))
    return total


class _StreamChoice(msgspec.Struct):
    index: int = 0
    finish_reason: str | None = None
    delta: _StreamDelta | None = None
    text: str | None = None


class StreamChunk(msgspec.Struct):
    """What the relay reads of each streamed chunk, in one decode: the usage chunk, an error, and the
    delta texts it counts when no usage arrives."""

    choices: list[_StreamChoice] | None = None
    usage: Usage | None = None
    error: UpstreamErrorBody | str | None = None


decode_stream_chunk = msgspec.json.Decoder(StreamChunk).decode

# Delta text is held up to this many characters, then counted with tiktoken and dropped: a relay holds
# O(1) of a stream, whatever its length, and an answer shorter than this (most) is never tokenised
# when the provider's usage arrives.
TEXT_FOLD_CHARS = 8 * 1024
_WHITESPACE = (" ", "\n", "\t", "\r")


class StreamMeter:
    """Completion tokens of a streamed answer, counted as it goes (tiktoken over the text of its
    deltas: content, legacy `text`, tool arguments).

    Text is counted in pieces cut before a whitespace: tiktoken's words carry their leading space, so a
    cut there splits no token and the sum matches counting the whole text at once (English text: within
    a token per piece; the texts of several choices are counted as one text).
    """

    __slots__ = ("_encoding", "_held", "_texts", "_tokens", "last")

    def __init__(self, encoding: str) -> None:
        self._encoding = encoding
        self._texts: list[str] = []
        self._held = 0
        self._tokens = 0
        # The last event seen (a model of the chunk Strait adds when the upstream sends no usage).
        self.last: bytes | None = None

    def add(self, chunk: StreamChunk, payload: bytes) -> None:
        """One event, already decoded by the relay (no second decode)."""
        self.last = payload
        choices = chunk.choices
        if not choices:
            return
        texts = self._texts
        held = self._held
        for c in choices:
            d = c.delta
            if d is not None:
                if d.content:
                    texts.append(d.content)
                    held += len(d.content)
                if d.tool_calls:
                    for call in d.tool_calls:
                        if call.function is not None and call.function.arguments:
                            texts.append(call.function.arguments)
                            held += len(call.function.arguments)
            if c.text:
                texts.append(c.text)
                held += len(c.text)
        self._held = held
        if held > TEXT_FOLD_CHARS:
            self._fold()

    def _fold(self) -> None:
        text = "".join(self._texts)
        cut = max(text.rfind(c) for c in _WHITESPACE)
        if cut <= 0:
            cut = len(text)
        self._tokens += count_text(text[:cut], self._encoding)
        rest = text[cut:]
        self._texts = [rest] if rest else []
        self._held = len(rest)

    def tokens(self) -> int:
        """Every token so far (what is still held is counted, not dropped: the meter can go on)."""
        return self._tokens + count_text("".join(self._texts), self._encoding)


def cost_micro_usd(price: Price, prompt: int, completion: int, cached: int = 0) -> int:
    cached = min(cached, prompt)
    cached_rate = price.cached_input_per_mtok if price.cached_input_per_mtok is not None else price.input_per_mtok
    usd_per_m = (prompt - cached) * price.input_per_mtok + cached * cached_rate + completion * price.output_per_mtok
    # Per million tokens in USD equals micro-USD per token: no scaling needed.
    return round(usd_per_m)


def cached_tokens(usage: Usage) -> int:
    details = usage.prompt_tokens_details
    return details.cached_tokens if isinstance(details, PromptTokensDetails) else 0
