"""OpenAI Responses request bodies as msgspec Structs: what `POST /v1/responses` accepts. A wrong type is a
400 naming the field; fields not listed are tolerated and ignored (OpenAI adds fields often: `include`,
`truncation`, `service_tier`, `prompt_cache_key`, `text.verbosity` change nothing a translation can carry).

`input` items are kept as raw JSON here and decoded one by one (gateway.api.responses.items): an item may
lack its `type` (a bare `{"role", "content"}` message), which a tagged union cannot express, and a stored
conversation (`previous_response_id`) holds the same items as the client's bytes.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

# Item ids, call ids and response ids: bounded like any other input (OpenAI's are ~50 characters).
Ident = Annotated[str, msgspec.Meta(max_length=512)]


class _Part(msgspec.Struct, kw_only=True, tag_field="type"):
    pass


class InputText(_Part, tag="input_text"):
    text: str


class OutputText(_Part, tag="output_text"):
    """An earlier answer's text, sent back in an assistant message (annotations and logprobs ignored)."""

    text: str


class RefusalPart(_Part, tag="refusal"):
    refusal: str


class InputImage(_Part, tag="input_image"):
    image_url: str | None = None
    file_id: str | None = None
    detail: str | None = None


class InputFile(_Part, tag="input_file"):
    file_id: str | None = None
    file_url: str | None = None
    filename: str | None = None


ContentPart = InputText | OutputText | RefusalPart | InputImage | InputFile


class MessageItem(msgspec.Struct, kw_only=True):
    """`{"type": "message"}` or the bare `{"role", "content"}` form (EasyInputMessage)."""

    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]
    id: Ident | None = None


class FunctionCallItem(msgspec.Struct, kw_only=True):
    call_id: Ident
    name: str
    arguments: str
    id: Ident | None = None


class FunctionCallOutputItem(msgspec.Struct, kw_only=True):
    call_id: Ident
    output: str | list[ContentPart]


class SummaryText(msgspec.Struct, kw_only=True):
    text: str
    type: str = "summary_text"


class ReasoningItem(msgspec.Struct, kw_only=True):
    """Kept opaque: its summary and encrypted state ride in the canonical `Reasoning` part."""

    id: Ident | None = None
    summary: list[SummaryText] = []
    encrypted_content: str | None = None


class ItemHead(msgspec.Struct, kw_only=True):
    """What an item is, read before the item itself: `type` (absent for a bare message) and `role`."""

    type: str | None = None
    role: str | None = None


class ToolParam(msgspec.Struct, kw_only=True):
    type: str
    name: str | None = None
    description: str | None = None
    parameters: msgspec.Raw = msgspec.Raw()  # a JSON schema object, kept as the client's bytes; absent: empty
    strict: bool | None = None


class AllowedTool(msgspec.Struct, kw_only=True):
    type: str
    name: str | None = None


class ToolChoiceParam(msgspec.Struct, kw_only=True):
    """`{"type": "function", "name"}`, `{"type": "allowed_tools", "mode", "tools"}`, or a built-in's type."""

    type: str
    name: str | None = None
    mode: Literal["auto", "required"] | None = None
    tools: list[AllowedTool] | None = None


class FormatParam(msgspec.Struct, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema: msgspec.Raw = msgspec.Raw()
    strict: bool | None = None
    description: str | None = None


class TextParam(msgspec.Struct, kw_only=True):
    format: FormatParam | None = None


class ReasoningParam(msgspec.Struct, kw_only=True):
    effort: Annotated[str, msgspec.Meta(max_length=32)] | None = None


# OpenAI's own bounds on metadata (16 pairs, keys of 64 characters, values of 512): it is stored and echoed.
MetadataKey = Annotated[str, msgspec.Meta(max_length=64)]
MetadataValue = Annotated[str, msgspec.Meta(max_length=512)]


class ResponsesRequest(msgspec.Struct, kw_only=True):
    model: str
    input: str | list[msgspec.Raw] | None = None
    instructions: str | None = None
    tools: list[ToolParam] | None = None
    tool_choice: Literal["auto", "none", "required"] | ToolChoiceParam | None = None
    text: TextParam | None = None
    reasoning: ReasoningParam | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    metadata: Annotated[dict[MetadataKey, MetadataValue], msgspec.Meta(max_length=16)] | None = None
    parallel_tool_calls: bool | None = None
    stream: bool | None = None
    store: bool | None = None
    previous_response_id: Ident | None = None
    user: str | None = None
    # Refused when set: nothing here can honour them (background polling, server-side conversations,
    # stored prompt templates).
    background: bool | None = None
    conversation: msgspec.Raw = msgspec.Raw()
    prompt: msgspec.Raw = msgspec.Raw()
