"""A chat-completions body built from the canonical request: what an OpenAI-compatible upstream gets when
the client spoke another protocol (Anthropic Messages, OpenAI Responses). The OpenAI client's own bytes never come here
(they pass through, gateway.passthrough).

What Chat Completions cannot carry is refused, never dropped (the fidelity rule of issue 11): thinking
blocks with their signatures (an unsigned one, which Strait made from an upstream's reasoning, is left
out: it holds no provider state), redacted thinking, Responses reasoning items with encrypted content (one
without is left out like an unsigned thinking block), tool types other than functions, images inside a tool
result. `Untranslatable` names the part; the adapter answers it as a 400.
"""

from __future__ import annotations

from typing import Any

import msgspec

from gateway.canonical import (
    Image,
    Message,
    Part,
    Reasoning,
    RedactedThinking,
    Request,
    Text,
    Thinking,
    ToolCall,
    ToolChoice,
    ToolResult,
)
from gateway.passthrough import with_prefill


class Untranslatable(Exception):
    """The request holds something an OpenAI-compatible upstream cannot be given faithfully."""


def chat_body(
    request: Request, model: str, *, stream: bool, prefill: str | None = None, prefill_tokens: int = 0
) -> bytes:
    """The JSON body of `POST /chat/completions` for `request`, asking for `model` (a stream asks for usage)."""
    foreign = request.tool_outside(frozenset({"function"}))
    if foreign is not None:
        raise Untranslatable(
            f"The tool '{foreign.name}' of type '{foreign.kind}' cannot be given to this route's upstream "
            "(it speaks OpenAI's Chat Completions, which has function tools only)."
        )
    body: dict[str, Any] = {"model": model, "messages": [m for msg in request.messages for m in _messages(msg)]}
    if request.max_output_tokens is not None:
        body["max_tokens"] = request.max_output_tokens
    for name in ("temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty", "n", "user"):
        value = getattr(request, name)
        if value is not None:
            body[name] = value
    if request.stop:
        body["stop"] = list(request.stop)
    if request.tools:
        body["tools"] = [_tool(t.name, t.description, t.parameters) for t in request.tools]
    if request.tool_choice is not None:
        _choice(body, request.tool_choice)
    thinking = request.thinking
    if thinking is not None and thinking.effort is not None:
        # Responses' `reasoning.effort`: Chat Completions' own field for it (engines that do not reason ignore it).
        body["reasoning_effort"] = thinking.effort
    fmt = request.response_format
    if fmt is not None and fmt.type != "text":
        body["response_format"] = (
            {"type": fmt.type}
            if fmt.json_schema is None
            else {
                "type": fmt.type,
                "json_schema": fmt.json_schema,
            }
        )
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    encoded = msgspec.json.encode(body)
    if prefill is not None:
        return with_prefill(encoded, prefill, prefill_tokens) or encoded
    return encoded


def _tool(name: str, description: str | None, parameters: msgspec.Raw | None) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name}
    if description is not None:
        function["description"] = description
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


def _choice(body: dict[str, Any], choice: ToolChoice) -> None:
    if choice.mode == "tool":
        body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    else:
        body["tool_choice"] = choice.mode
    if choice.parallel is not None and body.get("tools"):
        body["parallel_tool_calls"] = choice.parallel


def _messages(message: Message) -> list[dict[str, Any]]:
    """One canonical message as chat messages: each tool result its own `role: tool` message (first, as
    Chat Completions wants them right after the assistant's calls), then the rest of the content."""
    out: list[dict[str, Any]] = []
    rest: list[Part] = []
    for part in message.content:
        if isinstance(part, ToolResult):
            out.append({"role": "tool", "tool_call_id": part.call_id, "content": _result_text(part)})
        else:
            rest.append(part)
    if rest or not out:
        chat = _message(message.role, rest)
        if chat is not None:
            out.append(chat)
    return out


def _result_text(result: ToolResult) -> str:
    texts = []
    for part in result.content:
        if not isinstance(part, Text):
            raise Untranslatable(
                f"The result of tool call '{result.call_id}' holds a {part.__struct_config__.tag} part; "
                "Chat Completions tool results carry text only."
            )
        texts.append(part.text)
    text = "\n".join(texts)
    # Chat Completions has no error flag on a tool result: said in the text, not lost.
    return f"Error: {text}" if result.is_error else text


def _unsigned(part: Part) -> bool:
    """A thinking block without a signature, or a Responses reasoning item without encrypted content: an
    OpenAI-compatible upstream's `reasoning_content`, which the Messages or Responses edge gave the client
    as one. It carries no provider state; Chat Completions takes no reasoning back, so it is left out, as
    an OpenAI client leaves it out."""
    if isinstance(part, Reasoning):
        return not part.encrypted_content
    return isinstance(part, Thinking) and not part.signature


def _message(role: str, parts: list[Part]) -> dict[str, Any] | None:
    """The chat message for `parts`; None for an assistant turn that held only reasoning left out."""
    calls = [p for p in parts if isinstance(p, ToolCall)]
    content = [p for p in parts if not isinstance(p, ToolCall) and not _unsigned(p)]
    if parts and not calls and not content:
        return None
    out: dict[str, Any] = {"role": role}
    if all(isinstance(p, Text) for p in content):
        text = "".join(p.text for p in content if isinstance(p, Text))
        out["content"] = text if text or not calls else None
    else:
        out["content"] = [_content_part(p) for p in content]
    if calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls
        ]
    return out


def _content_part(part: Part) -> dict[str, Any]:
    if isinstance(part, Text):
        return {"type": "text", "text": part.text}
    if isinstance(part, Image):
        url = part.url if part.url is not None else f"data:{part.media_type};base64,{part.data}"
        image: dict[str, Any] = {"url": url}
        if part.detail is not None:
            image["detail"] = part.detail
        return {"type": "image_url", "image_url": image}
    if isinstance(part, Reasoning):
        raise Untranslatable(
            "A reasoning item with encrypted content cannot be given to this route's upstream (it speaks OpenAI's "
            "Chat Completions, which would lose that provider state); leave it out or route to an upstream that "
            "speaks Responses."
        )
    if isinstance(part, Thinking | RedactedThinking):
        raise Untranslatable(
            "A thinking block cannot be given to this route's upstream (it speaks OpenAI's Chat Completions, "
            "which would lose its signature); leave earlier turns' thinking blocks out or route to an "
            "Anthropic upstream."
        )
    raise Untranslatable(f"A '{part.__struct_config__.tag}' part cannot be given to this route's upstream.")
