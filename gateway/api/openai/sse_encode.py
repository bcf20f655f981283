"""Encodes a streamed answer for an OpenAI client: server-sent events, `data: <chunk>\\n\\n` each.

The pipeline hands the edge the upstream's chunks (OpenAI chunk JSON, unframed) and, at the end, how the
stream ended (`End`). Here they become the client's bytes: a batch of chunks in one piece (one write);
then, if the stream completed, the usage chunk the client asked for when the upstream sent none
(counted by the meter, shaped like the upstream's own chunks) and `data: [DONE]`; if it failed, an
error event in OpenAI's envelope and no `[DONE]`, so the SDK raises instead of returning a silently
truncated answer. A client that left gets nothing more.
"""

from __future__ import annotations

import time

import msgspec

from gateway.context import RequestContext
from gateway.contracts import End
from gateway.errors import ErrorBody, ErrorEnvelope
from gateway.upstream.wire import CompletionTokensDetails, PromptTokensDetails, Usage

DONE_EVENT = b"data: [DONE]\n\n"
_SEPARATOR = b"\n\ndata: "
_encode = msgspec.json.encode


def encode_event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


def encode_batch(payloads: list[bytes]) -> bytes:
    """Several events in one piece (joined once: no copy per event)."""
    if len(payloads) == 1:
        return b"data: " + payloads[0] + b"\n\n"
    return b"data: " + _SEPARATOR.join(payloads) + b"\n\n"


def error_event(error: ErrorBody) -> bytes:
    return encode_event(_encode(ErrorEnvelope(error)))


class _Head(msgspec.Struct):
    id: str | None = None
    object: str | None = None
    created: int | None = None
    model: str | None = None


def usage_chunk(
    ctx: RequestContext, last: bytes, completion: int, earlier: Usage | None = None, reasoning: int = 0
) -> bytes:
    """The chunk OpenAI would have sent (llama-cpp-python and older servers send none), its id, object,
    created and model copied from the stream's last chunk; with `earlier` (the billed tokens of the
    attempts a rescued stream continued) added."""
    try:
        head = msgspec.json.decode(last, type=_Head)
    except (msgspec.DecodeError, msgspec.ValidationError):
        head = _Head()
    prompt = ctx.prompt_tokens.count_now()  # the upstream reported no usage: estimated
    # The parts known without the upstream's word: the meter's reasoning count, and whatever the
    # earlier attempts' provider usage said (this attempt's cache reads and writes are unknown, so 0).
    cached = cache_write = 0
    if earlier is not None:
        prompt += earlier.prompt_tokens
        completion += earlier.completion_tokens
        if isinstance(earlier.prompt_tokens_details, PromptTokensDetails):
            cached = earlier.prompt_tokens_details.cached_tokens
            cache_write = earlier.prompt_tokens_details.cache_write_tokens
        if isinstance(earlier.completion_tokens_details, CompletionTokensDetails):
            reasoning += earlier.completion_tokens_details.reasoning_tokens
    usage = Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached, cache_write_tokens=cache_write)
        if cached or cache_write
        else msgspec.UNSET,
        completion_tokens_details=CompletionTokensDetails(reasoning_tokens=reasoning) if reasoning else msgspec.UNSET,
    )
    upstream_model = ctx.target.deployment.upstream_model if ctx.target is not None else ctx.route_name
    chunk = {
        "id": head.id or f"chatcmpl-{ctx.request_id}",
        "object": head.object or "chat.completion.chunk",
        "created": head.created or int(time.time()),
        "model": head.model or upstream_model,
        "choices": [],
        "usage": usage,
    }
    return _encode(chunk)


def encode_end(ctx: RequestContext, end: End) -> bytes:
    """The stream's last bytes, by how it ended."""
    if end.outcome == "completed":
        if ctx.include_usage and end.usage is None and end.last_event is not None and ctx.target is not None:
            return (
                encode_event(
                    usage_chunk(ctx, end.last_event, end.completion_tokens or 0, end.earlier, end.reasoning_tokens)
                )
                + DONE_EVENT
            )
        return DONE_EVENT
    if end.error is not None:
        return error_event(end.error)
    return b""
