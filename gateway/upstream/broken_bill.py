"""What a held whole answer (`resume: restart`) that broke after content cost: the provider bills the
tokens it generated though the client never saw them, so the attempt is billed like a stream continued
after a break (a `ContinuedAttempt`, a non-final usage record at its own deployment's price; gateway.stages.accounting).

Tokens: the upstream's usage if one of the held events carries it; else estimated (tiktoken over the held
events' text, the request's prompt count), counted in a worker thread when long (as accounting does).
Runs once per restarted attempt, never per event.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import msgspec

from gateway.accounting.counts import TokenCounts, counts_of
from gateway.accounting.meter import completion_tokens_of
from gateway.context import ContinuedAttempt, RequestContext
from gateway.policy.index import Target
from gateway.tokens import OFFLOAD_CHARS
from gateway.upstream.wire import Usage, UsageProbe

_probe_usage = msgspec.json.Decoder(UsageProbe).decode


def _usage_in(events: Sequence[bytes]) -> Usage | None:
    """The last usage block among the events (an upstream sends it with, or after, its last chunk)."""
    for payload in reversed(events):
        if b'"usage"' not in payload:
            continue
        try:
            usage = _probe_usage(payload).usage
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        if usage is not None:
            return usage
    return None


async def broken_attempt(
    ctx: RequestContext, target: Target, events: Sequence[bytes], status: int, seconds: float
) -> ContinuedAttempt:
    """The billed attempt of a held stream that broke after content on `target`."""
    usage = _usage_in(events)
    if usage is not None:
        return ContinuedAttempt(
            target=target,
            status=status,
            seconds=seconds,
            tokens=counts_of(usage),
            estimated=False,
            restarted=True,
        )
    prompt = await ctx.prompt_tokens.count()
    encoding = target.model.tokenizer
    if sum(map(len, events)) > OFFLOAD_CHARS:
        completion = await asyncio.to_thread(completion_tokens_of, list(events), encoding)
    else:
        completion = completion_tokens_of(events, encoding)
    return ContinuedAttempt(
        target=target,
        status=status,
        seconds=seconds,
        tokens=TokenCounts(prompt=prompt, completion=completion),
        estimated=True,
        restarted=True,
    )
