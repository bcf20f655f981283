"""OpenAI wire types, decoded once at the edge.

Requests are decoded twice from the same bytes: into these Structs to validate them (a wrong type
is a 400 naming the field) and into a plain mapping that is forwarded upstream, so fields Strait does
not know yet are passed through to OpenAI-compatible upstreams instead of being dropped.
"""

from __future__ import annotations

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


class FunctionCall(_Wire, kw_only=True):
    name: str | None = None
    arguments: str | None = None


class ToolCall(_Wire, kw_only=True):
    id: str | None = None
    type: str = "function"
    function: FunctionCall | None = None


class Message(_Wire, kw_only=True):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDef(_Wire, kw_only=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Wire, kw_only=True):
    function: FunctionDef
    type: str = "function"


class ToolChoiceFunction(_Wire, kw_only=True):
    name: str


class ToolChoice(_Wire, kw_only=True):
    type: str = "function"
    function: ToolChoiceFunction | None = None


class StreamOptions(_Wire, kw_only=True):
    include_usage: bool | None = None


class ResponseFormat(_Wire, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


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
    metadata: dict[str, str] | None = None


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
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "strait"


class ModelList(_Wire, kw_only=True):
    data: list[ModelCard]
    object: str = "list"
