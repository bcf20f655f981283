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


def cost_micro_usd(price: Price, prompt: int, completion: int, cached: int = 0) -> int:
    cached = min(cached, prompt)
    cached_rate = price.cached_input_per_mtok if price.cached_input_per_mtok is not None else price.input_per_mtok
    usd_per_m = (prompt - cached) * price.input_per_mtok + cached * cached_rate + completion * price.output_per_mtok
    # Per million tokens in USD equals micro-USD per token: no scaling needed.
    return round(usd_per_m)


def cached_tokens(usage: Usage) -> int:
    details = usage.prompt_tokens_details
    return details.cached_tokens if isinstance(details, PromptTokensDetails) else 0
