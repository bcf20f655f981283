"""Answers for an Anthropic client: a chat completion (what the pipeline holds, OpenAI's wire format)
as a Messages response, and every error in Anthropic's envelope with Anthropic's statuses.

`{"type":"error","error":{"type":...,"message":...},"request_id":...}`; the type follows the status (the
SDK picks its exception class from the status, and some from the pair): 400 invalid_request_error, 401
authentication_error, 403 permission_error, 404 not_found_error, 413 request_too_large, 429
rate_limit_error, 5xx api_error, and an overloaded gateway (503) is Anthropic's 529 overloaded_error.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from gateway.errors import GatewayError

_STOP_REASONS: Final[dict[str, str]] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
_ERROR_TYPES: Final[dict[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
OVERLOADED = 529


def stop_reason(finish_reason: str | None) -> str | None:
    if finish_reason is None:
        return None
    return _STOP_REASONS.get(finish_reason, "end_turn")


def ending(finish_reason: str | None, matched: str | int | None, stops: tuple[str, ...]) -> tuple[str, str | None]:
    """Anthropic's `stop_reason` and `stop_sequence`. `stop_sequence` only when the upstream says which of
    the client's sequences matched (vLLM's `stop_reason`); OpenAI and llama.cpp do not, so `end_turn`."""
    if finish_reason == "stop" and isinstance(matched, str) and matched in stops:
        return "stop_sequence", matched
    return stop_reason(finish_reason) or "end_turn", None


def error_status(status: int) -> int:
    """Anthropic's status for one of ours: an overloaded gateway (503) is its 529."""
    return OVERLOADED if status == 503 else status


def error_body(status: int, message: str, request_id: str) -> bytes:
    kind = _ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
    return msgspec.json.encode({"type": "error", "error": {"type": kind, "message": message}, "request_id": request_id})


def gateway_error(exc: GatewayError, request_id: str) -> tuple[int, bytes]:
    status = error_status(exc.status)
    return status, error_body(status, exc.message, request_id)


class _ErrorInner(msgspec.Struct):
    message: str | None = None


class _OpenAIError(msgspec.Struct):
    error: _ErrorInner | None = None


def translated_error(status: int, body: bytes, request_id: str) -> tuple[int, bytes]:
    """An error answer in OpenAI's envelope (an upstream's, normalized) as Anthropic's."""
    try:
        inner = msgspec.json.decode(body, type=_OpenAIError).error
    except (msgspec.DecodeError, msgspec.ValidationError):
        inner = None
    message = (inner.message if inner is not None else None) or f"The request failed with HTTP {status}."
    status = error_status(status)
    return status, error_body(status, message, request_id)


class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class GoogleCallExtra(msgspec.Struct):
    thought_signature: str | None = None


class CallExtra(msgspec.Struct):
    google: GoogleCallExtra | None = None


class _Call(msgspec.Struct):
    id: str | None = None
    function: _Function | None = None
    # Gemini's thought signature of the call (plugins.gemini): given to an Anthropic client as a signed,
    # empty thinking block before the tool_use block, which it sends back as it got it.
    extra_content: CallExtra | None = None


def call_signature(extra: CallExtra | None) -> str | None:
    """The thought signature a tool call carries (Gemini's, via its OpenAI-format answer), if any."""
    google = extra.google if extra is not None else None
    return google.thought_signature if google is not None else None


def signature_block(signature: str) -> dict[str, Any]:
    """A call's provider state as Anthropic's clients keep it: a thinking block with only a signature."""
    return {"type": "thinking", "thinking": "", "signature": signature}


class ThinkingPiece(msgspec.Struct):
    """An entry of `thinking_blocks`, the extension field in which a chat completion carries Anthropic's
    thinking blocks whole (docs/anthropic.md; LiteLLM's name): a thinking block's signature (its text is
    in `reasoning_content`) or a redacted_thinking block's data."""

    type: str = "thinking"
    thinking: str | None = None
    signature: str | None = None
    data: str | None = None


class _ChatMessage(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None  # llama.cpp, vLLM, DeepSeek: the model's visible reasoning
    # The native Anthropic adapter's thinking blocks, signatures included (plugins.anthropic_messages).
    thinking_blocks: list[ThinkingPiece] | None = None
    tool_calls: list[_Call] | None = None


class _Choice(msgspec.Struct):
    message: _ChatMessage | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # vLLM: the stop string (or token id) that ended the answer


class _Details(msgspec.Struct):
    cached_tokens: int | None = None
    cache_write_tokens: int | None = None  # Anthropic's cache_creation_input_tokens


class ChatUsage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: _Details | None = None


class _Completion(msgspec.Struct):
    id: str = ""
    choices: list[_Choice] = []
    usage: ChatUsage | None = None


def message_id(upstream_id: str, request_id: str) -> str:
    """`msg_...`: the upstream's completion id behind Anthropic's prefix (ours when it sent none); an
    Anthropic upstream's own id as it is."""
    if upstream_id.startswith("msg_"):
        return upstream_id
    return "msg_" + (upstream_id.removeprefix("chatcmpl-") or request_id)


def tool_input(arguments: str | None) -> Any:
    """A tool call's JSON arguments as Anthropic's `input` object; text that is not an object is kept
    under `arguments` rather than lost (a small model's malformed call stays visible)."""
    if not arguments:
        return {}
    try:
        value = msgspec.json.decode(arguments)
    except msgspec.DecodeError:
        return {"arguments": arguments}
    return value if isinstance(value, dict) else {"arguments": value}


def usage_of(usage: ChatUsage | None) -> dict[str, int]:
    if usage is None:
        return {"input_tokens": 0, "output_tokens": 0}
    details = usage.prompt_tokens_details
    cached = (details.cached_tokens or 0) if details is not None else 0
    written = (details.cache_write_tokens or 0) if details is not None else 0
    # Anthropic's input_tokens are the prompt tokens neither read from nor written to the cache.
    out = {"input_tokens": max(0, usage.prompt_tokens - cached - written), "output_tokens": usage.completion_tokens}
    if written:
        out["cache_creation_input_tokens"] = written
    if cached:
        out["cache_read_input_tokens"] = cached
    return out


def thinking_block(piece: ThinkingPiece) -> dict[str, Any]:
    if piece.type == "redacted_thinking":
        return {"type": "redacted_thinking", "data": piece.data or ""}
    return {"type": "thinking", "thinking": piece.thinking or "", "signature": piece.signature or ""}


def messages_response(body: bytes, model: str, request_id: str, stops: tuple[str, ...] = ()) -> bytes:
    """A chat completion's JSON as a Messages response (the first choice: Messages has one)."""
    completion = msgspec.json.decode(body, type=_Completion)
    choice = completion.choices[0] if completion.choices else _Choice()
    message = choice.message or _ChatMessage()
    content: list[dict[str, Any]] = []
    if message.thinking_blocks:
        # An Anthropic upstream's blocks, whole: each signature and redacted block byte for byte.
        content.extend(thinking_block(piece) for piece in message.thinking_blocks)
    elif message.reasoning_content:
        # Unsigned: no provider state to keep (gateway.upstream.chat_body drops it when it comes back).
        content.append({"type": "thinking", "thinking": message.reasoning_content, "signature": ""})
    if message.content:
        content.append({"type": "text", "text": message.content})
    for call in message.tool_calls or ():
        f = call.function or _Function()
        signature = call_signature(call.extra_content)
        if signature is not None:
            content.append(signature_block(signature))
        content.append(
            {"type": "tool_use", "id": call.id or "", "name": f.name or "", "input": tool_input(f.arguments)}
        )
    reason, sequence = ending(choice.finish_reason, choice.stop_reason, stops)
    return msgspec.json.encode(
        {
            "id": message_id(completion.id, request_id),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": reason,
            "stop_sequence": sequence,
            "usage": usage_of(completion.usage),
        }
    )
