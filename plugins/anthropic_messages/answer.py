"""A Messages answer as the pipeline reads answers (OpenAI's chat completion wire format).

- text blocks -> `message.content` (joined); tool_use -> `tool_calls` (the id kept, `input` as the
  `arguments` JSON text, its bytes as Anthropic sent them);
- thinking -> `reasoning_content` (the texts joined) and, whole, `thinking_blocks`: every thinking block
  with its `signature` and every redacted_thinking block with its `data`, in order (LiteLLM's extension
  field, which its users' code already reads): what an Anthropic client needs back byte for byte, and
  what an OpenAI client sends back in the assistant message of its next turn (gateway.api.openai);
- stop_reason -> finish_reason: end_turn, stop_sequence, pause_turn -> stop; max_tokens -> length;
  tool_use -> tool_calls; refusal -> content_filter. The sequence that matched goes in the choice's
  `stop_reason` (vLLM's field), so the Messages edge says `stop_sequence` again;
- usage: prompt_tokens = input_tokens + cache_read_input_tokens + cache_creation_input_tokens (OpenAI
  counts the cached prompt in the prompt), `prompt_tokens_details.cached_tokens` the cache reads,
  `cache_write_tokens` the cache writes, completion_tokens = output_tokens, and `inference_geo` (where
  Anthropic says inference ran) as it came, when it came.
"""

from __future__ import annotations

import time
from typing import Any, Final

import msgspec

FINISH_REASONS: Final[dict[str, str]] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


class MessagesUsage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    # Where inference ran ("us", "global"): kept in the chat usage for the usage record and the
    # compliance evidence check (gateway.policy.evidence).
    inference_geo: str | None = None


class _Block(msgspec.Struct):
    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: msgspec.Raw = msgspec.Raw()  # absent: empty (msgspec takes no union with Raw)
    thinking: str | None = None
    signature: str | None = None
    data: str | None = None


class _Message(msgspec.Struct):
    id: str = ""
    model: str = ""
    content: list[_Block] = []
    stop_reason: str | None = None
    stop_sequence: str | None = None
    usage: MessagesUsage | None = None


_decode_message = msgspec.json.Decoder(_Message).decode


def finish_reason(stop_reason: str | None) -> str | None:
    if stop_reason is None:
        return None
    return FINISH_REASONS.get(stop_reason, "stop")


def chat_usage(usage: MessagesUsage) -> dict[str, Any]:
    """Anthropic's usage as OpenAI's: the cached prompt counted in the prompt, reads and writes apart."""
    read = usage.cache_read_input_tokens or 0
    write = usage.cache_creation_input_tokens or 0
    prompt = (usage.input_tokens or 0) + read + write
    completion = usage.output_tokens or 0
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if read or write:
        out["prompt_tokens_details"] = {"cached_tokens": read, "cache_write_tokens": write}
    if usage.inference_geo:
        out["inference_geo"] = usage.inference_geo
    return out


def thinking_block(block: _Block) -> dict[str, Any] | None:
    if block.type == "thinking":
        return {"type": "thinking", "thinking": block.thinking or "", "signature": block.signature or ""}
    if block.type == "redacted_thinking":
        return {"type": "redacted_thinking", "data": block.data or ""}
    return None


def chat_completion(body: bytes) -> bytes:
    """A Messages response's JSON as a chat completion's. Raises msgspec errors for a body that is not one."""
    message = _decode_message(body)
    texts: list[str] = []
    reasoning: list[str] = []
    blocks: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for block in message.content:
        if block.type == "text":
            texts.append(block.text or "")
        elif block.type == "tool_use":
            arguments = bytes(block.input).decode() if len(block.input) else "{}"
            calls.append(
                {
                    "id": block.id or "",
                    "type": "function",
                    "function": {"name": block.name or "", "arguments": arguments},
                }
            )
        else:
            kept = thinking_block(block)
            if kept is not None:
                blocks.append(kept)
                if block.type == "thinking" and block.thinking:
                    reasoning.append(block.thinking)
        # Server tool blocks (server_tool_use, web_search_tool_result...) come only with server tools, which
        # only an Anthropic client sends: it gets the upstream's own answer (NativeAnswer), not this.
    chat_message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if reasoning:
        chat_message["reasoning_content"] = "".join(reasoning)
    if blocks:
        chat_message["thinking_blocks"] = blocks
    if calls:
        chat_message["tool_calls"] = calls
    choice: dict[str, Any] = {"index": 0, "message": chat_message, "finish_reason": finish_reason(message.stop_reason)}
    if message.stop_reason == "stop_sequence" and message.stop_sequence is not None:
        choice["stop_reason"] = message.stop_sequence
    out: dict[str, Any] = {
        "id": message.id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": message.model,
        "choices": [choice],
    }
    if message.usage is not None:
        out["usage"] = chat_usage(message.usage)
    return msgspec.json.encode(out)
