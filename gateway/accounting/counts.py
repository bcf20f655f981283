"""The tokens of one attempt, by kind, and what they cost on a deployment's rate card.

`prompt` and `completion` are totals, as OpenAI's usage reports them: `cached` (read from the provider's
prompt cache) and `cache_write` (written to it) are parts of `prompt`, `reasoning` a part of
`completion`. Every usage record carries all five (gateway.accounting.records); the price of each is
the deployment's (gateway.policy.rates).
"""

from __future__ import annotations

import msgspec

from gateway.policy.model import Price
from gateway.policy.rates import rate_card
from gateway.upstream.wire import CompletionTokensDetails, PromptTokensDetails, Usage


class TokenCounts(msgspec.Struct, frozen=True, gc=False):
    """(A Struct: two or three are made per request, and a frozen dataclass's __init__ sets each field
    through object.__setattr__. Untracked by the cyclic collector: it holds only integers.)"""

    prompt: int = 0
    completion: int = 0
    cached: int = 0
    cache_write: int = 0
    reasoning: int = 0

    def __add__(self, other: TokenCounts) -> TokenCounts:
        return TokenCounts(
            self.prompt + other.prompt,
            self.completion + other.completion,
            self.cached + other.cached,
            self.cache_write + other.cache_write,
            self.reasoning + other.reasoning,
        )

    @property
    def total(self) -> int:
        return self.prompt + self.completion


NONE = TokenCounts()


def counts_of(usage: Usage) -> TokenCounts:
    """An upstream's usage block by kind (the wire decoder already clamped each part to its total)."""
    prompt_details = usage.prompt_tokens_details
    completion_details = usage.completion_tokens_details
    cached = cache_write = reasoning = 0
    if isinstance(prompt_details, PromptTokensDetails):
        cached, cache_write = prompt_details.cached_tokens, prompt_details.cache_write_tokens
    if isinstance(completion_details, CompletionTokensDetails):
        reasoning = completion_details.reasoning_tokens
    return TokenCounts(usage.prompt_tokens, usage.completion_tokens, cached, cache_write, reasoning)


def usage_of(counts: TokenCounts) -> Usage:
    """The usage block a client is sent for `counts` (details only when they are not zero)."""
    return Usage(
        prompt_tokens=counts.prompt,
        completion_tokens=counts.completion,
        total_tokens=counts.total,
        prompt_tokens_details=(
            PromptTokensDetails(cached_tokens=counts.cached, cache_write_tokens=counts.cache_write)
            if counts.cached or counts.cache_write
            else msgspec.UNSET
        ),
        completion_tokens_details=(
            CompletionTokensDetails(reasoning_tokens=counts.reasoning) if counts.reasoning else msgspec.UNSET
        ),
    )


def cost_micro_usd(price: Price, counts: TokenCounts) -> int:
    """What `counts` cost at `price`, in whole micro-USD (exact; gateway.policy.rates)."""
    return rate_card(price).micro_usd(
        counts.prompt, counts.cached, counts.cache_write, counts.completion, counts.reasoning
    )


def worst_cost_micro_usd(price: Price, prompt: int, completion: int) -> int:
    """The most `prompt` and `completion` tokens could cost at `price`, whatever their kinds."""
    return rate_card(price).worst_micro_usd(prompt, completion)
