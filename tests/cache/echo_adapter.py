"""An in-process adapter whose every answer is unique and names its question: `answer <n> to <text>`.

So a cache test can tell a fresh answer (a new n) from a served one (an n seen before), and whose question
an answer was made for (a tenant must never receive another's). It speaks OpenAI's wire format, JSON and
SSE (role chunk, content in pieces, finish chunk, usage chunk when asked, as the real API does), and counts
its calls.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from gateway.canonical import Text
from gateway.contracts import UpstreamCall, UpstreamResponse
from gateway.policy.model import Backend

_encode = msgspec.json.encode


def _question(call: UpstreamCall) -> str:
    for message in reversed(call.request.messages):
        if message.role == "user":
            return " ".join(p.text for p in message.content if isinstance(p, Text))
    return ""


class EchoAdapter:
    counter = itertools.count(1)

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.calls: list[UpstreamCall] = []

    async def aclose(self) -> None:
        return None

    async def send(self, call: UpstreamCall) -> UpstreamResponse:
        self.calls.append(call)
        n = next(self.counter)
        text = f"answer {n} to {_question(call)}"
        words = text.split(" ")
        limit = call.request.max_output_tokens
        finish = "length" if limit is not None and limit < len(words) else "stop"
        if finish == "length":
            words = words[:limit]
            text = " ".join(words)
        usage = {"prompt_tokens": 11, "completion_tokens": len(words), "total_tokens": 11 + len(words)}
        ident = f"chatcmpl-echo{n}"
        if call.stream:
            return UpstreamResponse(status=200, events=self._events(ident, call.model, words, finish, usage))
        body = {
            "id": ident,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": call.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": usage,
        }
        return UpstreamResponse(status=200, body=_encode(body))

    async def _events(
        self, ident: str, model: str, words: list[str], finish: str, usage: dict[str, int]
    ) -> AsyncIterator[bytes]:
        created = int(time.time())

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            return _encode(
                {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
                | extra
            )

        yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        for i, word in enumerate(words):
            piece = word if i == 0 else " " + word
            yield chunk([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
        yield chunk([{"index": 0, "delta": {}, "finish_reason": finish}])
        # The gateway always asks for usage; it strips this chunk when the client did not.
        yield chunk([], usage=usage)


class EchoFactory:
    """The `adapters` mapping entry: keeps every adapter it built, to count upstream calls."""

    def __init__(self) -> None:
        self.adapters: list[EchoAdapter] = []

    def __call__(self, backend: Backend) -> EchoAdapter:
        adapter = EchoAdapter(backend)
        self.adapters.append(adapter)
        return adapter

    @property
    def calls(self) -> int:
        return sum(len(a.calls) for a in self.adapters)
