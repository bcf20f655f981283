"""The usage chunk Strait synthesizes when the upstream sent none but the client asked for usage: the
token kinds it knows (the meter's reasoning count, an earlier attempt's provider details) are shown."""

from __future__ import annotations

import json

from gateway.api.openai.sse_encode import usage_chunk
from gateway.context import RequestContext
from gateway.upstream.wire import CompletionTokensDetails, PromptTokensDetails, Usage

LAST = b'{"id":"chatcmpl-1","object":"chat.completion.chunk","created":7,"model":"m","choices":[]}'


def _usage(raw: bytes) -> dict[str, object]:
    got: dict[str, object] = json.loads(raw)["usage"]
    return got


def _ctx() -> RequestContext:
    return RequestContext(request_id="r", operation="chat", started=0.0, headers={})


def test_no_known_parts_means_no_details() -> None:
    usage = _usage(usage_chunk(_ctx(), LAST, 5))
    assert usage["completion_tokens"] == 5
    assert "prompt_tokens_details" not in usage and "completion_tokens_details" not in usage


def test_reasoning_from_the_meter_is_shown() -> None:
    usage = _usage(usage_chunk(_ctx(), LAST, 9, reasoning=4))
    assert usage["completion_tokens"] == 9
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 4}
    assert "prompt_tokens_details" not in usage


def test_earlier_attempts_details_are_added() -> None:
    earlier = Usage(
        prompt_tokens=100,
        completion_tokens=20,
        total_tokens=120,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=60, cache_write_tokens=30),
        completion_tokens_details=CompletionTokensDetails(reasoning_tokens=10),
    )
    usage = _usage(usage_chunk(_ctx(), LAST, 9, earlier, reasoning=4))
    assert usage["completion_tokens"] == 29
    assert usage["prompt_tokens"] >= 100  # type: ignore[operator]
    assert usage["total_tokens"] == usage["prompt_tokens"] + 29  # type: ignore[operator]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 60, "cache_write_tokens": 30}
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 14}
