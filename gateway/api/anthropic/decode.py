"""Anthropic Messages request bodies, decoded once into the canonical request, with the input bounds of
the OpenAI codec (the same skim: JSON object, UTF-8, container count, depth, no upstream-redirecting field;
the same number ranges). The client's bytes are kept beside it (`Request.original`, protocol `anthropic`):
an Anthropic upstream gets them with only the model replaced (plugins.anthropic_messages); an
OpenAI-compatible one a chat body translated from the canonical request (gateway.upstream.chat_body).

Every failure is a GatewayError (400 naming the field); the edge renders it in Anthropic's envelope.
"""

from __future__ import annotations

from typing import Final

import msgspec

from gateway.api.anthropic.wire import (
    Block,
    ImageBlock,
    MessageParam,
    MessagesRequest,
    OutputConfigParam,
    RedactedThinkingBlock,
    TextBlock,
    ThinkingBlock,
    ToolChoiceParam,
    ToolParam,
    ToolResultBlock,
    ToolUseBlock,
)
from gateway.api.inbound import DEFAULT_LIMITS, NUMBER_FIELDS, InboundLimits, check_numbers
from gateway.api.openai.decode import invalid, skim, value_of
from gateway.canonical import (
    Image,
    Message,
    Part,
    RedactedThinking,
    Request,
    ResponseFormat,
    Text,
    Thinking,
    ThinkingConfig,
    Tool,
    ToolCall,
    ToolChoice,
    ToolResult,
)
from gateway.errors import InvalidRequest
from gateway.passthrough import RepeatedField, original_of

PROTOCOL: Final = "anthropic"
_decoder = msgspec.json.Decoder(MessagesRequest)
_NULL = b"null"


def decode_messages(body: bytes, limits: InboundLimits = DEFAULT_LIMITS, *, count_only: bool = False) -> Request:
    """A Messages body as the canonical chat request. `count_only`: for count_tokens (no max_tokens)."""
    top = skim(body, limits)
    try:
        wire = _decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise invalid(str(exc)) from None
    if not wire.messages:
        raise InvalidRequest("messages: at least one message is required.", param="messages")
    if wire.max_tokens is None and not count_only:
        raise InvalidRequest("max_tokens: Field required.", param="max_tokens")
    numbers = {name: value_of(top, name) for name in NUMBER_FIELDS if name in top}
    check_numbers(numbers, limits)
    if wire.top_p is not None and not 0 <= wire.top_p <= 1:
        raise InvalidRequest("top_p: must be between 0 and 1.", param="top_p")
    try:
        original = original_of(PROTOCOL, body, top)
    except RepeatedField as exc:
        raise InvalidRequest(
            f"The field '{exc.name}' appears more than once in the request body; send each field once.",
            param=exc.name,
        ) from None
    messages = [out for i, m in enumerate(wire.messages) for out in _messages(m, i)]
    system = _system(wire.system)
    if system is not None:
        messages.insert(0, system)
    thinking = wire.thinking
    return Request(
        operation="chat",
        model=wire.model,
        messages=tuple(messages),
        tools=tuple(_tool(t, i) for i, t in enumerate(wire.tools or ())),
        tool_choice=_tool_choice(wire.tool_choice),
        thinking=None
        if thinking is None
        else ThinkingConfig(enabled=thinking.type != "disabled", budget_tokens=thinking.budget_tokens),
        max_output_tokens=wire.max_tokens,
        output_tokens_field="max_tokens",
        temperature=wire.temperature,
        top_p=wire.top_p,
        top_k=wire.top_k,
        stop=tuple(wire.stop_sequences or ()),
        stream=bool(wire.stream),
        # The relay keeps the usage chunk for the edge: Anthropic's message_delta always reports usage.
        include_usage=True,
        user=wire.metadata.user_id if wire.metadata is not None else None,
        response_format=_output_format(wire.output_config),
        original=original,
    )


def _output_format(config: OutputConfigParam | None) -> ResponseFormat | None:
    """`output_config.format` as the canonical JSON-schema format, shaped as Chat Completions' `json_schema`
    (`name`, `strict`, `schema`), which the chat body passes on and the simulated backend honours: never
    dropped, or the SDK's parser would be handed free text."""
    if config is None or config.format is None:
        return None
    schema = bytes(config.format.schema)
    if schema[:1] != b"{":
        raise InvalidRequest(
            "output_config.format.schema: a JSON schema must be an object.", param="output_config.format.schema"
        )
    return ResponseFormat(
        type="json_schema", json_schema=msgspec.Raw(b'{"name":"output","strict":true,"schema":' + schema + b"}")
    )


def _system(system: str | list[TextBlock] | None) -> Message | None:
    if system is None:
        return None
    if isinstance(system, str):
        return Message(role="system", content=(Text(text=system),)) if system else None
    parts = tuple(Text(text=b.text, cache_control=_cache(b.cache_control)) for b in system)
    return Message(role="system", content=parts) if parts else None


def _messages(m: MessageParam, i: int) -> list[Message]:
    """One Messages turn as canonical messages. A user turn's tool results become `role: tool` messages
    (first, as Anthropic requires them first in the turn), the canonical shape whatever the protocol
    (the OpenAI codec's too): what the stages and the simulated backend read as a tool's answer."""
    if isinstance(m.content, str):
        return [Message(role=m.role, content=(Text(text=m.content),))]
    parts = [_part(b, f"messages[{i}].content[{j}]") for j, b in enumerate(m.content)]
    if m.role == "system":
        for j, part in enumerate(parts):
            if not isinstance(part, Text):
                where = f"messages[{i}].content[{j}]"
                raise InvalidRequest(f"{where}: a system message holds text blocks only.", param=where)
    out = [Message(role="tool", content=(p,)) for p in parts if isinstance(p, ToolResult)]
    rest = tuple(p for p in parts if not isinstance(p, ToolResult))
    if rest or not out:
        out.append(Message(role=m.role, content=rest))
    return out


def _cache(raw: msgspec.Raw) -> msgspec.Raw | None:
    """A block's `cache_control` as the client wrote it (None when absent or null)."""
    return raw if len(raw) and bytes(raw) != _NULL else None


def _part(b: Block, where: str) -> Part:
    if isinstance(b, TextBlock):
        return Text(text=b.text, cache_control=_cache(b.cache_control))
    if isinstance(b, ImageBlock):
        return _image(b, where)
    if isinstance(b, ToolUseBlock):
        raw = bytes(b.input)
        if not raw.startswith(b"{"):
            raise InvalidRequest(f"{where}.input: must be a JSON object.", param=f"{where}.input")
        return ToolCall(id=b.id, name=b.name, arguments=raw.decode(), cache_control=_cache(b.cache_control))
    if isinstance(b, ToolResultBlock):
        content: tuple[Part, ...]
        if b.content is None:
            content = ()
        elif isinstance(b.content, str):
            content = (Text(text=b.content),)
        else:
            content = tuple(_part(c, f"{where}.content[{k}]") for k, c in enumerate(b.content))
        return ToolResult(
            call_id=b.tool_use_id, content=content, is_error=b.is_error, cache_control=_cache(b.cache_control)
        )
    if isinstance(b, ThinkingBlock):
        return Thinking(text=b.thinking, signature=b.signature)
    assert isinstance(b, RedactedThinkingBlock)
    return RedactedThinking(data=b.data)


def _image(b: ImageBlock, where: str) -> Image:
    source = b.source
    if source.type == "url":
        if not source.url:
            raise InvalidRequest(f"{where}.source.url: Field required.", param=f"{where}.source.url")
        return Image(url=source.url, cache_control=_cache(b.cache_control))
    if not source.data or not source.media_type:
        raise InvalidRequest(f"{where}.source: a base64 image needs 'media_type' and 'data'.", param=f"{where}.source")
    return Image(data=source.data, media_type=source.media_type, cache_control=_cache(b.cache_control))


def _tool(t: ToolParam, i: int) -> Tool:
    kind = "function" if t.type in (None, "custom") else t.type
    schema = t.input_schema
    if kind == "function":
        if not len(schema) or bytes(schema) == _NULL:
            raise InvalidRequest(f"tools.{i}.input_schema: Field required.", param=f"tools[{i}].input_schema")
        if not bytes(schema).lstrip().startswith(b"{"):
            raise InvalidRequest(f"tools.{i}.input_schema: must be a JSON object.", param=f"tools[{i}].input_schema")
    return Tool(
        name=t.name,
        description=t.description,
        parameters=schema if len(schema) else None,
        kind=kind,
        cache_control=_cache(t.cache_control),
    )


def _tool_choice(choice: ToolChoiceParam | None) -> ToolChoice | None:
    if choice is None:
        return None
    parallel = None if choice.disable_parallel_tool_use is None else not choice.disable_parallel_tool_use
    if choice.type == "tool":
        if not choice.name:
            raise InvalidRequest("tool_choice.name: Field required.", param="tool_choice.name")
        return ToolChoice(mode="tool", name=choice.name, parallel=parallel)
    mode = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
    return ToolChoice(mode=mode, parallel=parallel)  # type: ignore[arg-type]  # the literal map above
