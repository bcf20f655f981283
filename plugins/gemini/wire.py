"""Gemini's wire types of what it answers (`GenerateContentResponse` and Google's error envelope), decoded
with msgspec: only what Strait translates is modelled; other fields (safetyRatings, citationMetadata,
avgLogprobs, ...) are ignored."""

from __future__ import annotations

from typing import Any

import msgspec


class _Wire(msgspec.Struct, kw_only=True):
    pass


class FunctionCall(_Wire, kw_only=True):
    name: str = ""
    args: dict[str, Any] | None = None
    id: str | None = None


class Part(_Wire, kw_only=True, rename="camel"):
    text: str | None = None
    thought: bool = False
    thought_signature: str | None = None
    function_call: FunctionCall | None = None
    # Kept raw only to be refused clearly (an answer part Strait cannot give an OpenAI client).
    inline_data: msgspec.Raw | None = None
    executable_code: msgspec.Raw | None = None
    code_execution_result: msgspec.Raw | None = None


class Content(_Wire, kw_only=True):
    parts: list[Part] = []
    role: str | None = None


class Candidate(_Wire, kw_only=True, rename="camel"):
    content: Content | None = None
    finish_reason: str | None = None
    index: int = 0
    finish_message: str | None = None


class PromptFeedback(_Wire, kw_only=True, rename="camel"):
    block_reason: str | None = None
    block_reason_message: str | None = None


class UsageMetadata(_Wire, kw_only=True, rename="camel"):
    prompt_token_count: int = 0
    candidates_token_count: int = 0
    cached_content_token_count: int = 0
    thoughts_token_count: int = 0
    tool_use_prompt_token_count: int = 0
    total_token_count: int = 0


class ErrorDetail(_Wire, kw_only=True):
    type: str | None = msgspec.field(default=None, name="@type")
    retryDelay: str | None = None  # google.rpc.RetryInfo
    reason: str | None = None  # google.rpc.ErrorInfo


class GoogleError(_Wire, kw_only=True):
    code: int | None = None
    message: str | None = None
    status: str | None = None
    details: list[ErrorDetail] = []


class GenerateContentResponse(_Wire, kw_only=True, rename="camel"):
    candidates: list[Candidate] = []
    prompt_feedback: PromptFeedback | None = None
    usage_metadata: UsageMetadata | None = None
    model_version: str | None = None
    response_id: str | None = None
    # An error event in a stream (Google sends its error envelope as an SSE payload).
    error: GoogleError | None = None


class GoogleErrorEnvelope(_Wire, kw_only=True):
    error: GoogleError | None = None


decode_response = msgspec.json.Decoder(GenerateContentResponse).decode
decode_error = msgspec.json.Decoder(GoogleErrorEnvelope).decode
# A streamed answer is sometimes framed as a JSON array of responses (without alt=sse): never asked for.
DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError)
