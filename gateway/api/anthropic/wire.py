"""Anthropic Messages request bodies as msgspec Structs: what `POST /v1/messages` (and its count_tokens)
accepts. A wrong type is a 400 naming the field; fields not listed are ignored here (Anthropic adds fields
often): they reach an Anthropic upstream in the client's own bytes (passthrough), and a translation to
another protocol has no place for them. `cache_control` is kept on every block and tool that takes one, for
the native adapter's own translation (an OpenAI client's request, or a rescue)."""

from __future__ import annotations

from typing import Literal

import msgspec


class _Block(msgspec.Struct, kw_only=True, tag_field="type"):
    pass


class TextBlock(_Block, tag="text"):
    text: str
    cache_control: msgspec.Raw = msgspec.Raw()  # absent: empty


class ImageSource(msgspec.Struct, kw_only=True):
    type: Literal["base64", "url"]
    media_type: str | None = None
    data: str | None = None
    url: str | None = None


class ImageBlock(_Block, tag="image"):
    source: ImageSource
    cache_control: msgspec.Raw = msgspec.Raw()


class ToolUseBlock(_Block, tag="tool_use"):
    id: str
    name: str
    input: msgspec.Raw  # a JSON object, kept as the client's bytes
    cache_control: msgspec.Raw = msgspec.Raw()


class ToolResultBlock(_Block, tag="tool_result"):
    tool_use_id: str
    content: str | list[TextBlock | ImageBlock] | None = None
    is_error: bool = False
    cache_control: msgspec.Raw = msgspec.Raw()


class ThinkingBlock(_Block, tag="thinking"):
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Block, tag="redacted_thinking"):
    data: str


Block = TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock


class MessageParam(msgspec.Struct, kw_only=True):
    # `system` in the list: a system message where it stands (SDK 2.17's SystemMessageParam), text only.
    role: Literal["user", "assistant", "system"]
    content: str | list[Block]


class ToolParam(msgspec.Struct, kw_only=True):
    name: str
    description: str | None = None
    input_schema: msgspec.Raw = msgspec.Raw()  # absent: empty
    # Absent (or "custom") for a client tool; Anthropic's server tools (`bash_20250124`, `web_search_...`) by name.
    type: str | None = None
    cache_control: msgspec.Raw = msgspec.Raw()


class ToolChoiceParam(msgspec.Struct, kw_only=True):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class ThinkingParam(msgspec.Struct, kw_only=True):
    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: int | None = None


class MetadataParam(msgspec.Struct, kw_only=True):
    user_id: str | None = None


class OutputFormatParam(msgspec.Struct, kw_only=True):
    type: Literal["json_schema"]
    schema: msgspec.Raw  # a JSON schema object, kept as the client's bytes


class OutputConfigParam(msgspec.Struct, kw_only=True):
    """Structured output (`format`; the SDK's `messages.parse(output_format=...)` sends it). `effort` is
    not listed: ignored, as reasoning effort is elsewhere a hint."""

    format: OutputFormatParam | None = None


class MessagesRequest(msgspec.Struct, kw_only=True):
    model: str
    messages: list[MessageParam]
    # Required by Anthropic for a message; count_tokens takes none (checked by the codec).
    max_tokens: int | None = None
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    metadata: MetadataParam | None = None
    stream: bool | None = None
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoiceParam | None = None
    thinking: ThinkingParam | None = None
    output_config: OutputConfigParam | None = None
