"""Answers for a Responses client: a chat completion (what the pipeline holds, OpenAI's chat wire format) as a
Responses object, the `output` items, usage and status they share with the stream encoder (sse_encode.py).

Errors need no translation: Responses uses OpenAI's envelope, like the rest of /v1.

- `id`: "resp_" + the gateway's request id (unique, unguessable); items: "rs_", "msg_", "fc_" + the same.
- `output`: a `reasoning` item when the upstream gave `reasoning_content` (llama.cpp, vLLM, DeepSeek; its
  text as `reasoning_text` content, no encrypted state), a `message` item with `output_text` (and a
  `refusal` part when the upstream refused), one `function_call` item per tool call.
- `status`: `completed`, or `incomplete` with `incomplete_details.reason` `max_output_tokens` (finish
  `length`) or `content_filter`. `output_text` is not a server field: the SDK computes it.
- `usage`: input (cached, cache write) and output (reasoning) tokens, as the upstream reported them.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from gateway.api.responses.decode import Exchange

_INCOMPLETE: Final[dict[str, str]] = {"length": "max_output_tokens", "content_filter": "content_filter"}


class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _Call(msgspec.Struct):
    id: str | None = None
    function: _Function | None = None


class _ChatMessage(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    refusal: str | None = None
    tool_calls: list[_Call] | None = None


class _Choice(msgspec.Struct):
    index: int = 0
    message: _ChatMessage | None = None
    finish_reason: str | None = None


class _PromptDetails(msgspec.Struct):
    cached_tokens: int | None = None
    cache_write_tokens: int | None = None  # Strait's name for a provider's cache writes


class _CompletionDetails(msgspec.Struct):
    reasoning_tokens: int | None = None


class ChatUsage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: _PromptDetails | None = None
    completion_tokens_details: _CompletionDetails | None = None


class _Completion(msgspec.Struct):
    choices: list[_Choice] = []
    usage: ChatUsage | None = None


_decode_completion = msgspec.json.Decoder(_Completion).decode


def response_id(request_id: str) -> str:
    return "resp_" + request_id


def item_id(prefix: str, request_id: str, index: int | None = None) -> str:
    return f"{prefix}_{request_id}" if index is None else f"{prefix}_{request_id}_{index}"


def usage_of(usage: ChatUsage | None, estimate: tuple[int, int] = (0, 0)) -> dict[str, Any]:
    """Responses' usage from the chat usage (`estimate`: input and output tokens when the upstream sent none)."""
    if usage is None:
        prompt, completion, cached, written, reasoning = *estimate, 0, 0, 0
    else:
        prompt, completion = usage.prompt_tokens, usage.completion_tokens
        details = usage.prompt_tokens_details or _PromptDetails()
        cached, written = details.cached_tokens or 0, details.cache_write_tokens or 0
        reasoning = (usage.completion_tokens_details or _CompletionDetails()).reasoning_tokens or 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": written},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + completion,
    }


def status_of(finish_reason: str | None) -> tuple[str, dict[str, str] | None]:
    """The response's `status` and `incomplete_details` for the upstream's finish reason."""
    reason = _INCOMPLETE.get(finish_reason or "")
    return ("incomplete", {"reason": reason}) if reason else ("completed", None)


def output_text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def reasoning_item(request_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [{"type": "reasoning_text", "text": text}]
    return {"id": item_id("rs", request_id), "type": "reasoning", "summary": [], "content": content, "status": status}


def message_item(request_id: str, parts: list[dict[str, Any]], status: str = "completed") -> dict[str, Any]:
    return {
        "id": item_id("msg", request_id),
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": parts,
    }


def call_item(request_id: str, index: int, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "id": item_id("fc", request_id, index),
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def response_object(
    exchange: Exchange,
    request_id: str,
    *,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
    incomplete: dict[str, str] | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": response_id(request_id),
        "object": "response",
        "created_at": exchange.created_at,
        "status": status,
        "background": False,
        "error": error,
        "incomplete_details": incomplete,
        "model": exchange.model,
        "output": output,
        "usage": usage,
        **exchange.echo,
    }


def responses_object(body: bytes, exchange: Exchange, request_id: str) -> dict[str, Any]:
    """A chat completion's JSON as a Responses object (the first choice: a response has one answer).
    Raises msgspec.DecodeError/ValidationError when the body is not a chat completion."""
    completion = _decode_completion(body)
    choice = next((c for c in completion.choices if c.index == 0), None) or _Choice()
    message = choice.message or _ChatMessage()
    status, incomplete = status_of(choice.finish_reason)
    output: list[dict[str, Any]] = []
    if message.reasoning_content:
        output.append(reasoning_item(request_id, message.reasoning_content))
    parts = [output_text_part(message.content)] if message.content else []
    if message.refusal:
        parts.append({"type": "refusal", "refusal": message.refusal})
    if parts:
        output.append(message_item(request_id, parts))
    for i, call in enumerate(message.tool_calls or ()):
        f = call.function or _Function()
        call_id = call.id or item_id("call", request_id, i)
        output.append(call_item(request_id, i, call_id, f.name or "", f.arguments or "", "completed"))
    if incomplete and output:
        output[-1]["status"] = "incomplete"  # the item the answer stopped in (as the stream's last item)
    return response_object(
        exchange, request_id, status=status, output=output, usage=usage_of(completion.usage), incomplete=incomplete
    )
