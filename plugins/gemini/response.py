"""Gemini's answers in the pipeline's format (OpenAI's chat completion wire format): a whole
`GenerateContentResponse`, its usage, its refusals, and Google's error envelope.

- candidates -> choices; text parts -> `content`, thought parts -> `reasoning_content`, `functionCall`
  parts -> `tool_calls` (ids generated when Gemini gives none; arguments as JSON text) with the part's
  `thoughtSignature` as `extra_content.google.thought_signature` (where Google's own OpenAI-compatible API
  puts it: clients that keep it, like the openai SDK's message dicts, send it back, and the request
  translation puts it back on the call byte for byte);
- finishReason: STOP -> stop (tool_calls when the candidate called functions), MAX_TOKENS -> length;
  a safety-type reason (SAFETY, RECITATION, BLOCKLIST, PROHIBITED_CONTENT, SPII, the IMAGE_ ones) or
  `promptFeedback.blockReason` is a 400 `content_filter` error (as Azure's content filter answers), never
  an empty success; a malformed function call is a 502;
- usageMetadata -> usage: prompt_tokens = promptTokenCount + toolUsePromptTokenCount, cached_tokens =
  cachedContentTokenCount, completion_tokens = candidatesTokenCount + thoughtsTokenCount (Gemini bills
  thoughts as output), reasoning_tokens = thoughtsTokenCount;
- Google's `{"error": {"code", "message", "status", "details"}}` -> OpenAI's envelope with the same
  HTTP status (a 429's `RetryInfo.retryDelay` as `retry-after`; a bad key, which Google answers 400
  API_KEY_INVALID, as 401 so the gateway treats it as its own credentials' failure; a prompt over the
  context window as `context_length_exceeded`). The message is redacted later, like any upstream's
  (gateway.upstream.normalize); Google's `details` (service names, metadata) are never passed on.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import Any, Final

import msgspec

from gateway.errors import InvalidRequest, UpstreamError
from plugins.gemini.wire import (
    DECODE_ERRORS,
    Candidate,
    GenerateContentResponse,
    Part,
    UsageMetadata,
    decode_error,
)

FILTERED: Final = frozenset(
    {
        "SAFETY",
        "RECITATION",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_RECITATION",
    }
)
MALFORMED: Final = frozenset({"MALFORMED_FUNCTION_CALL", "UNEXPECTED_TOOL_CALL", "TOO_MANY_TOOL_CALLS"})
_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_denied",
    404: "not_found_error",
    429: "rate_limit_error",
}
_CONTEXT = re.compile(r"exceeds the maximum number of tokens|input token count", re.IGNORECASE)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?)s\s*$")


class GeminiRefusal(Exception):
    """Gemini answered without a usable result (a safety block, a malformed call): `status` and `body`
    (OpenAI's envelope) are the client's error."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(body.decode(errors="replace"))
        self.status = status
        self.body = body


def content_filter(reason: str, *, prompt: bool) -> GeminiRefusal:
    what = "The prompt was blocked" if prompt else "The answer was stopped"
    error = InvalidRequest(
        f"{what} by the provider's content filter (Gemini: {reason}).",
        code="content_filter",
        param="messages" if prompt else None,
    )
    return GeminiRefusal(400, error.body())


def malformed(reason: str) -> GeminiRefusal:
    error = UpstreamError(
        f"The model produced an unusable answer (Gemini: {reason}).",
        status=502,
        code="upstream_bad_response",
        type_="server_error",
    )
    return GeminiRefusal(502, error.body())


def refusal_of(response: GenerateContentResponse) -> GeminiRefusal | None:
    """The error for a response Gemini blocked (the prompt or a candidate), or None."""
    feedback = response.prompt_feedback
    if feedback is not None and feedback.block_reason:
        return content_filter(feedback.block_reason, prompt=True)
    if not response.candidates:
        return malformed("no candidates")
    for candidate in response.candidates:
        reason = candidate.finish_reason
        if reason in FILTERED:
            return content_filter(reason, prompt=False)
        if reason in MALFORMED:
            return malformed(reason)
    return None


def finish_reason(reason: str | None, called: bool) -> str | None:
    if reason is None:
        return None
    if reason in FILTERED:
        return "content_filter"
    if reason == "MAX_TOKENS":
        return "length"
    return "tool_calls" if called else "stop"


def usage_of(meta: UsageMetadata) -> dict[str, Any]:
    prompt = meta.prompt_token_count + meta.tool_use_prompt_token_count
    completion = meta.candidates_token_count + meta.thoughts_token_count
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if meta.cached_content_token_count:
        usage["prompt_tokens_details"] = {"cached_tokens": meta.cached_content_token_count}
    if meta.thoughts_token_count:
        usage["completion_tokens_details"] = {"reasoning_tokens": meta.thoughts_token_count}
    return usage


def tool_call(part: Part, index: int | None = None) -> dict[str, Any]:
    """One `functionCall` part as an OpenAI tool call (a stream's delta carries its `index`)."""
    call = part.function_call
    assert call is not None
    out: dict[str, Any] = {} if index is None else {"index": index}
    out["id"] = call.id or f"call_{secrets.token_hex(12)}"
    out["type"] = "function"
    out["function"] = {"name": call.name, "arguments": msgspec.json.encode(call.args or {}).decode()}
    if part.thought_signature is not None:
        out["extra_content"] = {"google": {"thought_signature": part.thought_signature}}
    return out


def unsupported_part(part: Part) -> bool:
    """A part the OpenAI format cannot carry (generated images, code execution)."""
    return part.inline_data is not None or part.executable_code is not None or part.code_execution_result is not None


def _message(candidate: Candidate) -> tuple[dict[str, Any], bool]:
    texts: list[str] = []
    thoughts: list[str] = []
    calls: list[dict[str, Any]] = []
    for part in candidate.content.parts if candidate.content is not None else ():
        if part.function_call is not None:
            calls.append(tool_call(part))
        elif unsupported_part(part):
            raise malformed("an answer part the gateway cannot relay (inline data or code execution)")
        elif part.text is not None:
            (thoughts if part.thought else texts).append(part.text)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if thoughts:
        message["reasoning_content"] = "".join(thoughts)
    if calls:
        message["tool_calls"] = calls
    return message, bool(calls)


def completion_id(response: GenerateContentResponse, request_id: str) -> str:
    return "chatcmpl-" + (response.response_id or request_id)


def completion(response: GenerateContentResponse, model: str, request_id: str) -> bytes:
    """A whole response as a chat completion (GeminiRefusal for a blocked or unusable one)."""
    refused = refusal_of(response)
    if refused is not None:
        raise refused
    choices = []
    for candidate in sorted(response.candidates, key=lambda c: c.index):
        message, called = _message(candidate)
        choices.append(
            {
                "index": candidate.index,
                "message": message,
                "finish_reason": finish_reason(candidate.finish_reason or "STOP", called),
            }
        )
    out: dict[str, Any] = {
        "id": completion_id(response, request_id),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": response.model_version or model,
        "choices": choices,
    }
    if response.usage_metadata is not None:
        out["usage"] = usage_of(response.usage_metadata)
    return msgspec.json.encode(out)


def error_answer(status: int, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
    """Google's error answer as OpenAI's envelope: (status, body, headers with retry hints)."""
    try:
        error = decode_error(body).error
    except DECODE_ERRORS:
        error = None  # not Google's JSON (a proxy's page): normalize drops what it cannot read
    if error is None:
        return status, body, headers
    out_headers = dict(headers)
    code = (error.status or "").lower() or None
    message = error.message or f"The upstream returned HTTP {status}."
    reasons = {d.reason for d in error.details if d.reason}
    if status == 400 and ("API_KEY_INVALID" in reasons or "API key not valid" in message):
        status = 401  # the gateway's own key: gateway.upstream.normalize answers upstream_auth_failed
    if status == 400 and _CONTEXT.search(message):
        code = "context_length_exceeded"
    for detail in error.details:
        match = _DURATION.match(detail.retryDelay or "")
        if match and "retry-after" not in out_headers:
            out_headers["retry-after"] = str(max(1, int(float(match.group(1)) + 0.999)))
    envelope = {
        "error": {
            "message": message,
            "type": _ERROR_TYPES.get(status, "upstream_error" if status < 500 else "server_error"),
            "param": None,
            "code": code,
        }
    }
    return status, msgspec.json.encode(envelope), out_headers
