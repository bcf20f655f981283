"""`streamGenerateContent?alt=sse` decoded incrementally into OpenAI chat completion chunks.

Each SSE `data:` payload is a whole `GenerateContentResponse` holding the new parts of each candidate.
Per candidate: the first chunk carries `role: assistant`; text parts become `delta.content`, thought
parts `delta.reasoning_content`, `functionCall` parts (Gemini sends them whole) a `delta.tool_calls`
entry with its index, id, name, whole arguments and `extra_content.google.thought_signature`; the
candidate's finishReason its `finish_reason` (a safety-type reason mid-answer: `content_filter`).
Gemini repeats `usageMetadata` (cumulative) on its chunks: the last one becomes one usage chunk
(`choices: []`) after every candidate finished, then `[DONE]`. Gemini ends a stream by closing it: a
stream that ends before every candidate had its finishReason was cut (`UpstreamStreamBroken`).
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from gateway.contracts import UpstreamStreamBroken
from gateway.upstream.sse import DONE
from plugins.gemini.response import (
    FILTERED,
    MALFORMED,
    GeminiRefusal,
    content_filter,
    finish_reason,
    tool_call,
    unsupported_part,
    usage_of,
)
from plugins.gemini.wire import DECODE_ERRORS, Candidate, UsageMetadata, decode_response


class _CandidateState:
    __slots__ = ("called", "finished", "started", "tools")

    def __init__(self) -> None:
        self.started = False
        self.finished = False
        self.called = False
        self.tools = 0


class StreamTranslator:
    """One stream's state: feed it each SSE payload, then `end()` when the upstream closed the stream."""

    def __init__(self, model: str, request_id: str, choices: int = 1) -> None:
        self.name = "gemini"
        self.model = model
        self.id = "chatcmpl-" + request_id
        self.created = int(time.time())
        self.expected = max(1, choices)
        self.candidates: dict[int, _CandidateState] = {}
        self.usage: UsageMetadata | None = None
        self.started = False  # a chunk with content went out (a refusal after this is mid-answer)
        self.first = True

    def feed(self, payload: bytes) -> list[bytes]:
        """The OpenAI chunks of one Gemini payload. GeminiRefusal: blocked before any content (the
        adapter answers it as an error); UpstreamStreamBroken: an error or a refusal mid-answer."""
        try:
            response = decode_response(payload)
        except DECODE_ERRORS:
            raise self._broken_payload() from None
        if self.first:
            self.first = False
            if response.response_id:
                self.id = "chatcmpl-" + response.response_id
            if response.model_version:
                self.model = response.model_version
        if response.usage_metadata is not None:
            self.usage = response.usage_metadata
        feedback = response.prompt_feedback
        if feedback is not None and feedback.block_reason:
            if not self.started:
                raise content_filter(feedback.block_reason, prompt=True)
            raise UpstreamStreamBroken(
                f"gemini: prompt blocked mid-stream ({feedback.block_reason})",
                client_message=f"The provider's content filter stopped the answer (Gemini: {feedback.block_reason}).",
                code="content_filter",
            )
        if response.error is not None:
            raise self._error_event(response.error.status or str(response.error.code or "an error"))
        if not self.started:
            # Blocked before anything was said: the adapter turns it into an error answer.
            for candidate in response.candidates:
                if candidate.finish_reason in FILTERED and self._empty(candidate):
                    raise content_filter(candidate.finish_reason or "", prompt=False)
        out: list[bytes] = []
        for candidate in response.candidates:
            chunk = self._chunk(candidate)
            if chunk is not None:
                out.append(msgspec.json.encode(chunk))
        if out:
            self.started = True  # the client has been told something: a refusal now is mid-answer
        return out

    def end(self) -> list[bytes]:
        """The stream closed: the usage chunk and `[DONE]`, or UpstreamStreamBroken if it was cut."""
        finished = [i for i, c in self.candidates.items() if c.finished]
        if len(finished) < self.expected:
            raise UpstreamStreamBroken("gemini: stream ended before a finishReason", clean_end=False)
        usage = self.usage_chunk()
        return [DONE] if usage is None else [usage, DONE]

    def usage_chunk(self) -> bytes | None:
        """Gemini's last usage (cumulative) as OpenAI's usage chunk, or None if it sent none."""
        if self.usage is None:
            return None
        chunk = self._envelope([])
        chunk["usage"] = usage_of(self.usage)
        return msgspec.json.encode(chunk)

    @staticmethod
    def _empty(candidate: Candidate) -> bool:
        return candidate.content is None or not candidate.content.parts

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def _chunk(self, candidate: Candidate) -> dict[str, Any] | None:
        state = self.candidates.get(candidate.index)
        if state is None:
            state = self.candidates[candidate.index] = _CandidateState()
        if state.finished:
            return None  # nothing may follow a finished choice
        delta: dict[str, Any] = {}
        if not state.started:
            delta["role"] = "assistant"
        texts: list[str] = []
        thoughts: list[str] = []
        calls: list[dict[str, Any]] = []
        for part in candidate.content.parts if candidate.content is not None else ():
            if part.function_call is not None:
                calls.append(tool_call(part, state.tools))
                state.tools += 1
            elif unsupported_part(part):
                raise UpstreamStreamBroken(
                    "gemini: an answer part the gateway cannot relay",
                    client_message="The model produced a part the gateway cannot relay (inline data or code).",
                    code="upstream_bad_response",
                )
            elif part.text:
                (thoughts if part.thought else texts).append(part.text)
        if texts:
            delta["content"] = "".join(texts)
        if thoughts:
            delta["reasoning_content"] = "".join(thoughts)
        if calls:
            delta["tool_calls"] = calls
            state.called = True
        reason = candidate.finish_reason
        if reason in MALFORMED:
            raise UpstreamStreamBroken(
                f"gemini: {reason}",
                client_message=f"The model produced an unusable answer (Gemini: {reason}).",
                code="upstream_bad_response",
            )
        finish = finish_reason(reason, state.called)
        if len(delta) == (0 if state.started else 1) and finish is None:
            return None  # a usage-only or empty payload: nothing to say yet
        state.started = True
        if finish is not None:
            state.finished = True
        return self._envelope([{"index": candidate.index, "delta": delta, "finish_reason": finish}])

    @staticmethod
    def _error_event(status: str) -> UpstreamStreamBroken:
        # Only Google's status name reaches the client: its message may name internals.
        return UpstreamStreamBroken(
            f"gemini: error event mid-stream ({status})",
            client_message=f"The upstream reported an error mid-stream ({status}).",
            code="upstream_error",
        )

    @staticmethod
    def _broken_payload() -> UpstreamStreamBroken:
        return UpstreamStreamBroken(
            "gemini: a stream event that is not a GenerateContentResponse",
            client_message="The upstream sent a malformed stream event.",
            code="upstream_bad_response",
        )


__all__ = ["GeminiRefusal", "StreamTranslator"]
