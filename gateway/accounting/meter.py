"""Turns what an upstream answered into tokens when it reported no usage.

Provider usage wins when present; otherwise the tokens are counted with tiktoken over what the upstream
actually produced and the record says `usage_source=estimated`. Never 0 for "unknown": an answer with
text has tokens. Reasoning text (`reasoning_content`, as llama.cpp, vLLM and DeepSeek send it, or a
string `reasoning`) is counted too, as completion tokens and apart as their reasoning part, so a cut
stream of a thinking model is charged for its thinking (at the reasoning rate).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

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


class _Part(msgspec.Struct):
    """A message or a stream delta: its answer text, tool arguments and reasoning text."""

    content: str | None = None
    tool_calls: list[_ToolDelta] | None = None
    reasoning_content: str | None = None
    # A string on vLLM's newer servers and OpenRouter; anything else is not counted (never a decode error).
    reasoning: Any = None

    def thinking(self) -> str | None:
        if self.reasoning_content:
            return self.reasoning_content
        return self.reasoning if isinstance(self.reasoning, str) and self.reasoning else None


class _Choice(msgspec.Struct):
    text: str | None = None
    message: _Part | None = None
    delta: _Part | None = None


class _Answer(msgspec.Struct):
    choices: list[_Choice] | None = None


_decode_answer = msgspec.json.Decoder(_Answer).decode


def _texts(answer: _Answer) -> Iterable[tuple[str, bool]]:
    """Each text of the answer, and whether it is reasoning."""
    for c in answer.choices or ():
        for part in (c.message, c.delta):
            if part is None:
                continue
            if part.content:
                yield part.content, False
            for call in part.tool_calls or ():
                if text := call.text():
                    yield text, False
            if thinking := part.thinking():
                yield thinking, True
        if c.text:
            yield c.text, False


def completion_counts_of(payloads: Iterable[bytes], encoding: str) -> tuple[int, int]:
    """tiktoken counts of the text in a body or in streamed chunks: (completion tokens: content, text,
    tool arguments and reasoning; of which reasoning)."""
    total = reasoning = 0
    for payload in payloads:
        try:
            answer = _decode_answer(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        for text, thinking in _texts(answer):
            n = count_text(text, encoding)
            total += n
            if thinking:
                reasoning += n
    return total, reasoning


def completion_tokens_of(payloads: Iterable[bytes], encoding: str) -> int:
    """The completion tokens of `completion_counts_of` (reasoning included)."""
    return completion_counts_of(payloads, encoding)[0]


class _StreamChoice(msgspec.Struct):
    delta: _Part | None = None
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


class _Lane:
    """One kind of text of a stream (the answer, or the reasoning): held up to TEXT_FOLD_CHARS, then
    counted and dropped.

    Text is counted in pieces cut before a whitespace: tiktoken's words carry their leading space, so a
    cut there splits no token and the sum matches counting the whole text at once (English text: within
    a token per piece; the texts of several choices are counted as one text)."""

    __slots__ = ("held", "texts", "tokens")

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.held = 0
        self.tokens = 0

    def add(self, text: str) -> None:
        self.texts.append(text)
        self.held += len(text)

    def fold(self, encoding: str) -> None:
        text = "".join(self.texts)
        cut = max(text.rfind(c) for c in _WHITESPACE)
        if cut <= 0:
            cut = len(text)
        self.tokens += count_text(text[:cut], encoding)
        rest = text[cut:]
        self.texts = [rest] if rest else []
        self.held = len(rest)

    def count(self, encoding: str) -> int:
        return self.tokens + (count_text("".join(self.texts), encoding) if self.texts else 0)


class StreamMeter:
    """Completion tokens of a streamed answer, counted lazily (tiktoken over the text of its deltas:
    content, legacy `text`, tool arguments, reasoning), for when the upstream sends no usage."""

    __slots__ = ("_answer", "_encoding", "_raw", "_raw_bytes", "_thinking", "last")

    def __init__(self, encoding: str) -> None:
        self._encoding = encoding
        self._raw: list[bytes] = []
        self._raw_bytes = 0
        self._answer = _Lane()
        self._thinking = _Lane()
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
        answer, thinking = self._answer, self._thinking
        for payload in self._raw:
            try:
                chunk = _decode_texts(payload)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue  # not a chunk (the relay refuses it); nothing to count
            for c in chunk.choices or ():
                d = c.delta
                if d is not None:
                    if d.content:
                        answer.add(d.content)
                    if d.tool_calls:
                        for call in d.tool_calls:
                            if text := call.text():
                                answer.add(text)
                    if text := d.thinking():
                        thinking.add(text)
                if c.text:
                    answer.add(c.text)
        self._raw = []
        self._raw_bytes = 0
        for lane in (answer, thinking):
            if lane.held > TEXT_FOLD_CHARS:
                lane.fold(self._encoding)

    def counts(self) -> tuple[int, int]:
        """(every completion token so far, of which reasoning); what is still held is counted, not
        dropped: the meter can go on."""
        if self._raw:
            self._decode_held()
        reasoning = self._thinking.count(self._encoding)
        return self._answer.count(self._encoding) + reasoning, reasoning

    def tokens(self) -> int:
        """Every completion token so far, reasoning included."""
        return self.counts()[0]
