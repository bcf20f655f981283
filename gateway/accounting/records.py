"""The usage record, the unit of the ledger: one per upstream attempt (and one per cache hit)."""

from __future__ import annotations

import datetime as dt
from typing import Literal

import msgspec

UsageSource = Literal["provider", "estimated", "none"]
Dimension = Literal["route", "model", "deployment", "key"]
DIMENSIONS: tuple[Dimension, ...] = ("route", "model", "deployment", "key")


class UsageRecord(msgspec.Struct, frozen=True, kw_only=True):
    # Minted by the gateway; with the tenant and attempt, the record's idempotency key.
    request_id: str
    # 1-based; the attempt that answered the client has `final=True`.
    attempt: int
    final: bool
    ts_ms: int
    tenant: str
    key_id: str
    route: str
    model: str
    deployment: str
    backend: str
    status: int
    # Tokens by kind, as the provider reported them (or estimated): `cached_tokens` (read from the
    # provider's prompt cache) and `cache_write_tokens` (written to it) are parts of `prompt_tokens`,
    # `reasoning_tokens` a part of `completion_tokens`. Each is priced at its own rate (gateway.policy.rates).
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    # The attempt's cost on its deployment's rate card, per-request fee included.
    cost_micro_usd: int = 0
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    # Answered from the cache: no upstream ran; `tokens_saved` is what the cached answer cost to make
    # (its prompt + completion tokens), not charged (prompt and completion are 0 for a hit).
    cache_hit: bool = False
    tokens_saved: int = 0
    # The client went away (or the upstream failed) mid-answer: tokens are what the upstream produced.
    partial: bool = False
    usage_source: UsageSource = "provider"
    # The client's own `x-request-id`, for correlation only (never a key).
    client_request_id: str | None = None
    # Where the provider reported the inference ran (its usage's `inference_geo`), when it did.
    inference_geo: str | None = None

    @property
    def day(self) -> str:
        return dt.datetime.fromtimestamp(self.ts_ms / 1000, dt.UTC).strftime("%Y-%m-%d")

    def dimension(self, name: Dimension) -> str:
        if name == "key":
            return self.key_id
        value: str = getattr(self, name)
        return value


class UsageRow(msgspec.Struct, kw_only=True):
    """An aggregate: totals for one value of a dimension (e.g. route `chat`) over the asked days."""

    tenant: str
    dimension: Dimension
    value: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Parts of prompt_tokens (cache reads, cache writes) and of completion_tokens (reasoning).
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    # The exact sum in whole micro-USD (what both ledgers add), and the same in USD for reading.
    cost_micro_usd: int = 0
    cost_usd: float = 0.0
    # Requests answered from the cache, and the tokens those answers did not cost.
    cache_hits: int = 0
    tokens_saved: int = 0


def days_between(since: dt.date, until: dt.date) -> list[str]:
    if until < since:
        return []
    span = (until - since).days
    return [(since + dt.timedelta(days=i)).isoformat() for i in range(min(span, 366) + 1)]
