"""Turns what an upstream answered into tokens and money.

Provider usage wins when present; otherwise the tokens are counted with tiktoken over what the upstream
actually produced and the record says `usage_source=estimated`. Never 0 for "unknown": an answer with
text has tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from gateway.api.wire import PromptTokensDetails, Usage
from gateway.policy.model import Price
from gateway.tokens import count_text


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


# A stream's events are held raw up to this many bytes (so a stream whose provider usage arrives costs one
# append per event, nothing decoded); past it their texts are extracted, and text past TEXT_FOLD_CHARS is
# counted with tiktoken and dropped. A relay thus holds O(1) of a stream, whatever its length.
FOLD_BYTES = 64 * 1024
TEXT_FOLD_CHARS = 8 * 1024
_WHITESPACE = (" ", "\n", "\t", "\r")


class StreamMeter:
    """Completion tokens of a streamed answer, counted as it goes (tiktoken over the text of its
    deltas: content, legacy `text`, tool arguments).

    Text is counted in pieces cut before a whitespace: tiktoken's words carry their leading space, so a
    cut there splits no token and the sum matches counting the whole text at once (English text: within
    a token per piece of TEXT_FOLD_CHARS; the texts of several choices are counted as one text).
    """

    __slots__ = ("_encoding", "_events", "_held", "_text", "_tokens", "last")

    def __init__(self, encoding: str) -> None:
        self._encoding = encoding
        self._events: list[bytes] = []
        self._held = 0
        self._text = ""
        self._tokens = 0
        # The last event seen (a model of the chunk Strait adds when the upstream sends no usage).
        self.last: bytes | None = None

    def add(self, payload: bytes) -> None:
        self._events.append(payload)
        self.last = payload
        self._held += len(payload)
        if self._held > FOLD_BYTES:
            self._fold()

    def _fold(self) -> None:
        texts = [self._text]
        for payload in self._events:
            try:
                answer = _decode_answer(payload)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            texts.extend(_texts(answer))
        self._events = []
        self._held = 0
        text = "".join(texts)
        if len(text) > TEXT_FOLD_CHARS:
            cut = max(text.rfind(c) for c in _WHITESPACE)
            if cut <= 0:
                cut = len(text)
            self._tokens += count_text(text[:cut], self._encoding)
            text = text[cut:]
        self._text = text

    def tokens(self) -> int:
        """Every token so far (counts what is still held; the meter can go on after)."""
        self._fold()
        return self._tokens + count_text(self._text, self._encoding)


def cost_micro_usd(price: Price, prompt: int, completion: int, cached: int = 0) -> int:
    cached = min(cached, prompt)
    cached_rate = price.cached_input_per_mtok if price.cached_input_per_mtok is not None else price.input_per_mtok
    usd_per_m = (prompt - cached) * price.input_per_mtok + cached * cached_rate + completion * price.output_per_mtok
    # Per million tokens in USD equals micro-USD per token: no scaling needed.
    return round(usd_per_m)


def cached_tokens(usage: Usage) -> int:
    details = usage.prompt_tokens_details
    return details.cached_tokens if isinstance(details, PromptTokensDetails) else 0
