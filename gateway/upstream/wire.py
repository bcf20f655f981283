"""OpenAI wire types of what upstreams answer: the usage block and the probes that decode only what
Strait reads back (usage, errors). Here, below api/, because accounting, the relay and error
normalisation read them; gateway.api.wire re-exports them for the edge."""

from __future__ import annotations

import msgspec


class _Wire(msgspec.Struct, kw_only=True):
    pass


class PromptTokensDetails(_Wire, kw_only=True, omit_defaults=True):
    # Both are included in `prompt_tokens` (OpenAI counts cached reads in the prompt). `cache_write_tokens`
    # is Strait's name for what Anthropic reports as `cache_creation_input_tokens`: prompt tokens written
    # to the provider's prompt cache, priced apart on the rate card.
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class CompletionTokensDetails(_Wire, kw_only=True):
    reasoning_tokens: int = 0


# The most tokens an upstream's usage may claim for one answer (far above any context window).
MAX_USAGE_TOKENS = 2**40


def _clamp(n: int) -> int:
    return 0 if n < 0 else MAX_USAGE_TOKENS if n > MAX_USAGE_TOKENS else n


class Usage(_Wire, kw_only=True):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | msgspec.UnsetType = msgspec.UNSET
    completion_tokens_details: CompletionTokensDetails | msgspec.UnsetType = msgspec.UNSET
    # Where the provider says inference ran (Anthropic's `usage.inference_geo`: "us", "global"), when it
    # says: recorded on the usage record and compared with the backend's declared jurisdiction.
    inference_geo: str | msgspec.UnsetType = msgspec.UNSET

    def __post_init__(self) -> None:
        # An upstream's numbers, clamped where they are decoded: a negative count would credit a
        # budget (and fail a Prometheus counter), a huge one would overflow the store's exact range.
        self.prompt_tokens = _clamp(self.prompt_tokens)
        self.completion_tokens = _clamp(self.completion_tokens)
        self.total_tokens = _clamp(self.total_tokens)
        details = self.prompt_tokens_details
        if isinstance(details, PromptTokensDetails):
            details.cached_tokens = min(_clamp(details.cached_tokens), self.prompt_tokens)
            details.cache_write_tokens = min(
                _clamp(details.cache_write_tokens), self.prompt_tokens - details.cached_tokens
            )
        reasoning = self.completion_tokens_details
        if isinstance(reasoning, CompletionTokensDetails):
            # A part of the completion tokens (priced apart on the rate card), never more than them.
            reasoning.reasoning_tokens = min(_clamp(reasoning.reasoning_tokens), self.completion_tokens)


# ---- what Strait reads back from upstream answers (probes decode only what they need) ----


class UpstreamErrorBody(_Wire, kw_only=True):
    message: str | None = None
    type: str | None = None
    param: str | None = None
    code: str | int | None = None


class ChoiceProbe(_Wire, kw_only=True):
    index: int = 0
    finish_reason: str | None = None


class ChunkProbe(_Wire, kw_only=True):
    """Just enough of a streamed chunk to find the usage chunk and the usage numbers."""

    choices: list[ChoiceProbe] | None = None
    usage: Usage | None = None
    error: UpstreamErrorBody | str | None = None


class UsageProbe(_Wire, kw_only=True):
    usage: Usage | None = None


class UpstreamErrorProbe(_Wire, kw_only=True):
    """Error bodies vary: OpenAI's envelope, llama.cpp's integer `code`, vLLM's flat `{"object":"error"}`."""

    error: UpstreamErrorBody | str | None = None
    message: str | None = None
    type: str | None = None
    code: str | int | None = None
