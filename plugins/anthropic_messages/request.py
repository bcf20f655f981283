"""The canonical request as an Anthropic Messages body: what an Anthropic upstream gets when the client
spoke another protocol (OpenAI Chat Completions), or when a rescue continues a broken stream.

- `system`/`developer` messages become `system` text blocks (Messages has no system role in the list);
- `tool` messages become `tool_result` blocks of a user turn; consecutive turns of one role are merged
  (a tool's results and the user's next words are one user turn, as Messages wants them);
- content parts become blocks: text, image (base64 or url), tool_use (`input` the call's JSON arguments,
  kept as their bytes), tool_result, thinking with its signature (byte for byte; a thinking part without
  one came from an OpenAI-compatible engine's `reasoning_content` and holds no provider state: left out),
  redacted_thinking; `cache_control` goes back on the block, tool or system block that carried it;
- `max_tokens` is required: the client's, else the backend's `anthropic.default_max_tokens`.

What Messages cannot carry is refused (`Untranslatable`, a 400), never dropped: several choices (`n`),
log probabilities, sampling penalties, `json_object` output, audio and file parts, Responses reasoning
items, parts of another protocol, tool types other than functions.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from gateway.canonical import (
    Image,
    Opaque,
    Part,
    RedactedThinking,
    Request,
    Text,
    Thinking,
    ThinkingConfig,
    ToolCall,
    ToolChoice,
    ToolResult,
)
from gateway.upstream.chat_body import Untranslatable

PROTOCOL: Final = "anthropic"
# `reasoning_effort` (OpenAI) as a thinking budget: Anthropic's minimum is 1024 tokens.
EFFORT_BUDGETS: Final[dict[str, int]] = {"low": 1024, "medium": 4096, "high": 16384}
_EMPTY_SCHEMA: Final = msgspec.Raw(b'{"type":"object","properties":{}}')
_str = msgspec.json.Decoder(str)


def messages_body(
    request: Request,
    model: str,
    *,
    stream: bool,
    default_max_tokens: int,
    prefill: str | None = None,
    prefill_tokens: int = 0,
) -> bytes:
    """The JSON body of `POST /v1/messages` for `request`, asking for `model`."""
    _refuse_unsupported(request)
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for message in request.messages:
        if message.role in ("system", "developer"):
            system.extend(_block(p) for p in message.content)
            continue
        role = "assistant" if message.role == "assistant" else "user"
        blocks = [_block(p) for p in message.content if not _unsigned(p)]
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    limit = request.max_output_tokens if request.max_output_tokens is not None else default_max_tokens
    if prefill is not None:
        # Messages continues a final assistant turn; it refuses one that ends in white space.
        text = prefill.rstrip()
        if text:
            if turns and turns[-1]["role"] == "assistant":
                turns[-1]["content"].append({"type": "text", "text": text})
            else:
                turns.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
        limit = max(1, limit - prefill_tokens)
    body: dict[str, Any] = {"model": model, "max_tokens": limit, "messages": turns}
    if system:
        plain = all(b["type"] == "text" and "cache_control" not in b for b in system)
        body["system"] = "\n\n".join(b["text"] for b in system) if plain else system
    for name in ("temperature", "top_p", "top_k"):
        value = getattr(request, name)
        if value is not None:
            body[name] = value
    if request.stop:
        body["stop_sequences"] = list(request.stop)
    if request.tools:
        body["tools"] = [_tool(t.name, t.description, t.parameters, t.cache_control) for t in request.tools]
    if request.tool_choice is not None and (request.tools or request.tool_choice.mode == "none"):
        body["tool_choice"] = _choice(request.tool_choice)
    thinking = _thinking(request)
    if thinking is not None:
        body["thinking"] = thinking
    fmt = request.response_format
    if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is not None:
        body["output_config"] = {"format": {"type": "json_schema", "schema": _schema_of(fmt.json_schema)}}
    if request.user is not None:
        body["metadata"] = {"user_id": request.user}
    if stream:
        body["stream"] = True
    return msgspec.json.encode(body)


def _refuse_unsupported(request: Request) -> None:
    if request.n is not None and request.n > 1:
        raise Untranslatable("n: Anthropic's Messages API returns one answer per request; send n=1 or leave it out.")
    if request.logprobs or request.top_logprobs:
        raise Untranslatable("logprobs: Anthropic's Messages API does not return log probabilities.")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name):
            raise Untranslatable(f"{name}: Anthropic's Messages API has no sampling penalties.")
    fmt = request.response_format
    if fmt is not None and fmt.type not in ("text", "json_schema"):
        raise Untranslatable(
            f"response_format: type '{fmt.type}' has no equivalent in Anthropic's Messages API; use json_schema."
        )
    foreign = request.tool_outside(frozenset({"function"}))
    if foreign is not None:
        raise Untranslatable(
            f"The tool '{foreign.name}' of type '{foreign.kind}' cannot be given to this route's upstream "
            "(Anthropic's Messages API takes function tools from an OpenAI client)."
        )


def _unsigned(part: Part) -> bool:
    """An OpenAI-compatible engine's reasoning, sent back: no signature, no provider state to return."""
    return isinstance(part, Thinking) and not part.signature


def _with_cache(block: dict[str, Any], cache_control: msgspec.Raw | None) -> dict[str, Any]:
    if cache_control is not None:
        block["cache_control"] = cache_control
    return block


def _block(part: Part) -> dict[str, Any]:
    if isinstance(part, Text):
        return _with_cache({"type": "text", "text": part.text}, part.cache_control)
    if isinstance(part, Image):
        return _with_cache({"type": "image", "source": _image_source(part)}, part.cache_control)
    if isinstance(part, ToolCall):
        if part.kind != "function":
            raise Untranslatable(f"The call '{part.id}' of a '{part.kind}' tool cannot be given to this upstream.")
        return _with_cache(
            {"type": "tool_use", "id": part.id, "name": part.name, "input": _tool_input(part.arguments)},
            part.cache_control,
        )
    if isinstance(part, ToolResult):
        block: dict[str, Any] = {"type": "tool_result", "tool_use_id": part.call_id}
        if part.content:
            block["content"] = [_result_block(p, part.call_id) for p in part.content]
        if part.is_error:
            block["is_error"] = True
        return _with_cache(block, part.cache_control)
    if isinstance(part, Thinking):
        return {"type": "thinking", "thinking": part.text, "signature": part.signature}
    if isinstance(part, RedactedThinking):
        return {"type": "redacted_thinking", "data": part.data}
    tag = part.kind if isinstance(part, Opaque) else part.__struct_config__.tag
    raise Untranslatable(f"A '{tag}' part cannot be given to this route's upstream (Anthropic's Messages API).")


def _result_block(part: Part, call_id: str) -> dict[str, Any]:
    if not isinstance(part, Text | Image):
        raise Untranslatable(
            f"The result of tool call '{call_id}' holds a {part.__struct_config__.tag} part; "
            "Anthropic tool results carry text and images."
        )
    return _block(part)


def _image_source(image: Image) -> dict[str, Any]:
    if image.data is not None and image.media_type is not None:
        return {"type": "base64", "media_type": image.media_type, "data": image.data}
    url = image.url or ""
    if url.startswith("data:"):
        # OpenAI's inline image: `data:<media type>;base64,<data>`.
        head, _, data = url.partition(",")
        media_type = head[5:].split(";", 1)[0]
        if not data or not head.endswith(";base64") or not media_type:
            raise Untranslatable("An inline image must be a base64 data URL (data:<media type>;base64,...).")
        return {"type": "base64", "media_type": media_type, "data": data}
    return {"type": "url", "url": url}


def _tool_input(arguments: str) -> msgspec.Raw | dict[str, Any]:
    """A call's JSON arguments as the `input` object, their bytes kept; text that is not a JSON object (a
    small model's malformed call, sent back) is kept under `arguments` rather than lost."""
    text = arguments.strip()
    if not text:
        return {}
    try:
        value = msgspec.json.decode(text)
    except msgspec.DecodeError:
        return {"arguments": arguments}
    return msgspec.Raw(text.encode()) if isinstance(value, dict) else {"arguments": value}


def _tool(
    name: str, description: str | None, parameters: msgspec.Raw | None, cache_control: msgspec.Raw | None
) -> dict[str, Any]:
    tool: dict[str, Any] = {"name": name}
    if description is not None:
        tool["description"] = description
    tool["input_schema"] = parameters if parameters is not None else _EMPTY_SCHEMA
    return _with_cache(tool, cache_control)


def _choice(choice: ToolChoice) -> dict[str, Any]:
    out: dict[str, Any]
    if choice.mode == "tool":
        out = {"type": "tool", "name": choice.name or ""}
    elif choice.mode == "required":
        out = {"type": "any"}
    else:
        out = {"type": choice.mode}
    if choice.parallel is False and choice.mode != "none":
        out["disable_parallel_tool_use"] = True
    return out


def _thinking(request: Request) -> dict[str, Any] | None:
    config = request.thinking
    if config is None:
        effort_raw = request.extra.get("reasoning_effort")
        if effort_raw is None:
            return None
        try:
            effort = _str.decode(effort_raw)
        except msgspec.DecodeError:
            raise Untranslatable("reasoning_effort: must be a string.") from None
        config = ThinkingConfig(enabled=effort not in ("none", "minimal"), effort=effort)
    if not config.enabled:
        return {"type": "disabled"}
    budget = config.budget_tokens
    if budget is None:
        if config.effort is not None and config.effort not in EFFORT_BUDGETS:
            raise Untranslatable(f"reasoning_effort: '{config.effort}' is not one of low, medium, high.")
        budget = EFFORT_BUDGETS[config.effort or "medium"]
    return {"type": "enabled", "budget_tokens": budget}


class _NamedSchema(msgspec.Struct):
    schema: msgspec.Raw = msgspec.Raw()  # absent: empty


def _schema_of(json_schema: msgspec.Raw) -> msgspec.Raw:
    """Chat Completions' `json_schema` (`{name, strict, schema}`) holds the schema Messages wants."""
    try:
        inner = msgspec.json.decode(json_schema, type=_NamedSchema).schema
    except (msgspec.DecodeError, msgspec.ValidationError):
        inner = msgspec.Raw()
    if not bytes(inner).startswith(b"{"):
        raise Untranslatable("response_format.json_schema.schema: a JSON schema object is required.")
    return inner
