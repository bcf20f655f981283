"""Turns what an upstream answered into tokens and money.

Provider usage wins when present; otherwise the tokens are counted with tiktoken over what the upstream
actually produced and the record says `usage_source=estimated`. Never 0 for "unknown": an answer with
text has tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from gateway.tokens import count_text


class _FunctionArgs(msgspec.Struct):
    arguments: str | None = None


class _CustomInput(msgspec.Struct):
    input: str | None = None


class _ToolDelta(msgspec.Struct):
    function: _FunctionArgs | None = None
    custom: _CustomInput | None = None  # a custom (freeform) tool's call: its input is text

    def text(self) -> str | None:
        if self.function is not None and self.function.arguments:
            return self.function.arguments
        return self.custom.input if self.custom is not None else None


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
                if text := call.text():
                    yield text
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
    delta: _StreamDelta | None = None
    text: str | None = None


class _StreamTexts(msgspec.Struct):
    """What the meter reads of a streamed chunk: the texts of its deltas."""

    choices: list[_StreamChoice] | None = None


_decode_texts = msgspec.json.Decoder(_StreamTexts).decode

# Events are held as received, up to this many bytes, and only then decoded and their text counted: the
# upstream is always asked for usage, so for most streams (shorter than this, or ending with a usage
# chunk) nothing is ever decoded or tokenised for the meter. Delta text is then held up to
# TEXT_FOLD_CHARS characters, counted with tiktoken and dropped: a relay holds O(1) of a stream,
# whatever its length.
RAW_HOLD_BYTES = 32 * 1024
TEXT_FOLD_CHARS = 8 * 1024
_WHITESPACE = (" ", "\n", "\t", "\r")


class StreamMeter:
    """Completion tokens of a streamed answer, counted lazily (tiktoken over the text of its deltas:
    content, legacy `text`, tool arguments), for when the upstream sends no usage.

    Text is counted in pieces cut before a whitespace: tiktoken's words carry their leading space, so a
    cut there splits no token and the sum matches counting the whole text at once (English text: within
    a token per piece; the texts of several choices are counted as one text).
    """

    __slots__ = ("_encoding", "_held", "_raw", "_raw_bytes", "_texts", "_tokens", "last")

    def __init__(self, encoding: str) -> None:
        self._encoding = encoding
        self._raw: list[bytes] = []
        self._raw_bytes = 0
        self._texts: list[str] = []
        self._held = 0
        self._tokens = 0
        # The last event seen (a model of the chunk Strait adds when the upstream sends no usage).
        self.last: bytes | None = None

    def add(self, payloads: list[bytes]) -> None:
        """Events as received (a batch, never empty): held, decoded only past RAW_HOLD_BYTES."""
        self.last = payloads[-1]
        self._raw += payloads
        size = self._raw_bytes
        for payload in payloads:
            size += len(payload)
        self._raw_bytes = size
        if size > RAW_HOLD_BYTES:
            self._decode_held()

    def _decode_held(self) -> None:
        texts = self._texts
        held = self._held
        for payload in self._raw:
            try:
                chunk = _decode_texts(payload)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue  # not a chunk (the relay refuses it); nothing to count
            for c in chunk.choices or ():
                d = c.delta
                if d is not None:
                    if d.content:
                        texts.append(d.content)
                        held += len(d.content)
                    if d.tool_calls:
                        for call in d.tool_calls:
                            if text := call.text():
                                texts.append(text)
                                held += len(text)
                if c.text:
                    texts.append(c.text)
                    held += len(c.text)
        self._raw = []
        self._raw_bytes = 0
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
        if self._raw:
            self._decode_held()
        return self._tokens + count_text("".join(self._texts), self._encoding)
