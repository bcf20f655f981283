"""OpenAI wire types, decoded once at the edge (gateway.api.openai.decode).

A request body is validated into these Structs (a wrong type is a 400 naming the field) and turned into
the canonical request (gateway.canonical); fields Strait does not model are not here: they reach an
OpenAI-compatible upstream in the client's own bytes (byte-faithful passthrough). JSON schemas (tool
parameters, response formats) are kept as the client's bytes (`Raw`), never decoded.
"""

from __future__ import annotations

import datetime
from typing import Any, Literal

import msgspec

from gateway.upstream.wire import ChoiceProbe as ChoiceProbe
from gateway.upstream.wire import ChunkProbe as ChunkProbe
from gateway.upstream.wire import CompletionTokensDetails as CompletionTokensDetails
from gateway.upstream.wire import PromptTokensDetails as PromptTokensDetails
from gateway.upstream.wire import UpstreamErrorBody as UpstreamErrorBody
from gateway.upstream.wire import UpstreamErrorProbe as UpstreamErrorProbe
from gateway.upstream.wire import Usage as Usage
from gateway.upstream.wire import UsageProbe as UsageProbe

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class _Wire(msgspec.Struct, kw_only=True):
    pass


class ImageUrl(_Wire, kw_only=True):
    url: str
    detail: str | None = None


class ContentPart(_Wire, kw_only=True):
    """A multi-part content entry; part types Strait does not interpret are passed through."""

    type: str
    text: str | None = None
    image_url: ImageUrl | None = None
    # Anthropic's prompt-caching marker on a part (as LiteLLM takes it in OpenAI messages): kept for an
    # Anthropic upstream (plugins.anthropic_messages); an OpenAI-compatible one gets the client's bytes.
    cache_control: msgspec.Raw = msgspec.Raw()


class FunctionCall(_Wire, kw_only=True):
    name: str | None = None
    arguments: str | None = None


class CustomCall(_Wire, kw_only=True):
    """A call of a custom (freeform) tool: its input is text, not JSON arguments."""

    name: str | None = None
    input: str | None = None


class GoogleExtra(_Wire, kw_only=True):
    thought_signature: str | None = None


class ExtraContent(_Wire, kw_only=True):
    """Google's extension of a tool call (its OpenAI-compatible API and Strait's `gemini` adapter): the
    call's `thought_signature`, which Gemini requires back byte for byte on the next turn."""

    google: GoogleExtra | None = None


class ToolCall(_Wire, kw_only=True):
    id: str | None = None
    type: str = "function"
    function: FunctionCall | None = None
    custom: CustomCall | None = None
    extra_content: ExtraContent | None = None


class ThinkingBlock(_Wire, kw_only=True):
    """An entry of an assistant message's `thinking_blocks` (the extension field in which Strait's answers
    from an Anthropic upstream carry its thinking blocks: docs/anthropic.md), sent back on the next turn."""

    type: Literal["thinking", "redacted_thinking"]
    thinking: str | None = None
    signature: str | None = None
    data: str | None = None


class Message(_Wire, kw_only=True):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    thinking_blocks: list[ThinkingBlock] | None = None


# A JSON value the client did not send (an empty Raw: `len(NOT_SENT) == 0`); `null` is Raw(b"null").
NOT_SENT = msgspec.Raw(b"")


class FunctionDef(_Wire, kw_only=True):
    name: str
    description: str | None = None
    parameters: msgspec.Raw = NOT_SENT
    strict: bool | None = None


class CustomDef(_Wire, kw_only=True):
    """A custom (freeform) tool: text in, optionally constrained by a grammar (`format`, kept as bytes)."""

    name: str | None = None
    description: str | None = None
    format: msgspec.Raw = NOT_SENT


class Tool(_Wire, kw_only=True):
    """A tool of any type: `function` (which must carry its `function`), `custom`, or one Strait does not
    know (an upstream's built-in tool), passed through to OpenAI-compatible upstreams as the client's bytes."""

    type: str = "function"
    function: FunctionDef | None = None
    custom: CustomDef | None = None


class ToolChoiceFunction(_Wire, kw_only=True):
    name: str


class ToolChoice(_Wire, kw_only=True):
    type: str = "function"
    function: ToolChoiceFunction | None = None
    custom: ToolChoiceFunction | None = None


class StreamOptions(_Wire, kw_only=True):
    include_usage: bool | None = None


class ResponseFormat(_Wire, kw_only=True):
    # Any type: vLLM's `structural_tag`, an engine's own kinds; OpenAI refuses the ones it does not know.
    type: str
    json_schema: msgspec.Raw = NOT_SENT


class ChatRequest(_Wire, kw_only=True):
    model: str
    messages: list[Message]
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoice | None = None
    user: str | None = None
    # OpenAI takes string values only (and answers its own 400 otherwise); other upstreams take any JSON.
    metadata: dict[str, Any] | None = None


class CompletionRequest(_Wire, kw_only=True):
    model: str
    prompt: str | list[str | int | list[int]]
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    user: str | None = None


class EmbeddingsRequest(_Wire, kw_only=True):
    model: str
    input: str | list[str | int | list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = None
    user: str | None = None


# ---- responses Strait itself produces (models list); usage and upstream probes: gateway.upstream.wire ----


class ModelCard(_Wire, kw_only=True):
    """One route as a model, in both OpenAI's shape (`object`, `created`, `owned_by`) and Anthropic's
    (`type`, `display_name`, `created_at`): each SDK reads its own fields and ignores the others."""

    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "strait"
    type: str = "model"
    display_name: str = ""
    created_at: str = ""  # RFC 3339


def model_card(name: str, created: int) -> ModelCard:
    when = datetime.datetime.fromtimestamp(created, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return ModelCard(id=name, created=created, display_name=name, created_at=when)


class ModelList(_Wire, kw_only=True):
    """OpenAI's list (`object`, `data`) with Anthropic's paging fields (one page: everything)."""

    data: list[ModelCard]
    object: str = "list"
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


def model_list(cards: list[ModelCard]) -> ModelList:
    first = cards[0].id if cards else None
    last = cards[-1].id if cards else None
    return ModelList(data=cards, first_id=first, last_id=last)
