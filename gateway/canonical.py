"""Protocol-neutral request, response, event and usage types: what stages read and what an adapter that
does not speak the client's protocol translates from.

A codec in `gateway/api/<protocol>/` decodes a client's body once into a `Request` and keeps the client's
bytes beside it (`Request.original`, see gateway/passthrough.py); when the upstream speaks the same
protocol those bytes go up with only the model replaced, so the canonical form never has to round-trip
everything a protocol can say. It holds what Strait reads (routing features, limits, prompt texts) and
what a translation needs. The shapes are chosen so the Anthropic Messages and Responses codecs (issue 11)
land on them without change: content is a list of parts (text, image, audio, file, thinking with its
signature, redacted thinking, tool calls, tool results, reasoning items with encrypted content), and a
part or field Strait does not model is kept verbatim as `msgspec.Raw` with the protocol it came from.

Field names follow no one protocol: `max_output_tokens` is OpenAI's `max_tokens` /
`max_completion_tokens`, Anthropic's `max_tokens`, Responses' `max_output_tokens`; `output_tokens_field`
remembers which one the client used, for error messages.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from gateway.passthrough import Original

Role = Literal["system", "developer", "user", "assistant", "tool"]
Operation = Literal["chat", "completions", "embeddings"]


class _Part(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    pass


class Text(_Part, frozen=True, tag="text"):
    text: str
    # Anthropic's prompt-caching marker (`{"type": "ephemeral", "ttl": ...}`), as the client wrote it. Images,
    # tool calls, tool results and tools carry one too: the native Anthropic adapter (plugins.anthropic_messages)
    # sends each where it was; a Chat Completions body has no place for it and leaves it out (a cache hint,
    # not content: nothing the answer depends on is lost).
    cache_control: msgspec.Raw | None = None


class Image(_Part, frozen=True, tag="image"):
    """A URL (OpenAI's `image_url`, Anthropic's url source) or inline data (`data:` URL or base64 source)."""

    url: str | None = None
    data: str | None = None  # base64, without the `data:` prefix
    media_type: str | None = None
    detail: str | None = None
    cache_control: msgspec.Raw | None = None


class Audio(_Part, frozen=True, tag="audio"):
    data: str  # base64
    format: str


class File(_Part, frozen=True, tag="file"):
    file_id: str | None = None
    filename: str | None = None
    data: str | None = None  # base64


class Thinking(_Part, frozen=True, tag="thinking"):
    """Visible reasoning. `signature` (Anthropic) or `thought_signature` (Gemini) must go back byte for byte."""

    text: str
    signature: str | None = None


class RedactedThinking(_Part, frozen=True, tag="redacted_thinking"):
    data: str  # opaque, encrypted by the provider


class Reasoning(_Part, frozen=True, tag="reasoning"):
    """A Responses reasoning item: summaries and the provider-encrypted state (`encrypted_content`)."""

    id: str | None = None
    summary: tuple[str, ...] = ()
    encrypted_content: str | None = None


class ToolCall(_Part, frozen=True, tag="tool_call"):
    """The model asks for a tool (OpenAI `tool_calls[]`, Anthropic `tool_use`, Responses `function_call`).
    `arguments` is JSON text, as OpenAI sends it; Anthropic's `input` object is its encoding."""

    id: str
    name: str
    arguments: str = "{}"
    kind: str = "function"
    cache_control: msgspec.Raw | None = None
    # Provider state bound to the call that must go back byte for byte (Gemini's `thoughtSignature`, which
    # OpenAI-format answers carry as `extra_content.google.thought_signature` on the tool call).
    signature: str | None = None


class ToolResult(_Part, frozen=True, tag="tool_result"):
    """A tool's answer (OpenAI `role: tool`, Anthropic `tool_result`, Responses `function_call_output`)."""

    call_id: str
    content: tuple[Part, ...] = ()
    is_error: bool = False
    cache_control: msgspec.Raw | None = None


class Opaque(_Part, frozen=True, tag="opaque"):
    """A part Strait does not model, kept as its protocol's JSON: it survives when the upstream speaks
    `protocol`; a translation to another protocol must refuse it rather than drop it silently."""

    protocol: str
    kind: str
    raw: msgspec.Raw | None = None


Part = Text | Image | Audio | File | Thinking | RedactedThinking | Reasoning | ToolCall | ToolResult | Opaque


class Message(msgspec.Struct, frozen=True, kw_only=True):
    role: Role
    content: tuple[Part, ...] = ()
    name: str | None = None


class Tool(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    description: str | None = None
    # The JSON schema of the arguments, kept as the client wrote it: data, never interpreted.
    parameters: msgspec.Raw | None = None
    strict: bool | None = None
    kind: str = "function"  # "function"; other kinds (custom, built-in) by their protocol's name
    cache_control: msgspec.Raw | None = None


class ToolChoice(msgspec.Struct, frozen=True, kw_only=True):
    mode: Literal["auto", "none", "required", "tool"] = "auto"
    name: str | None = None  # when mode == "tool"
    parallel: bool | None = None


class ResponseFormat(msgspec.Struct, frozen=True, kw_only=True):
    type: str = "text"  # "text", "json_object", "json_schema", or an engine's own (vLLM's "structural_tag")
    json_schema: msgspec.Raw | None = None


class ThinkingConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Anthropic `thinking`, OpenAI `reasoning_effort`, Responses `reasoning`."""

    enabled: bool = True
    budget_tokens: int | None = None
    effort: str | None = None


def _flat(parts: tuple[Part, ...]) -> tuple[Part, ...]:
    """The parts, a tool result's own parts in its place."""
    if not any(isinstance(p, ToolResult) for p in parts):
        return parts
    return tuple(q for p in parts for q in (p.content if isinstance(p, ToolResult) else (p,)))


class Request(msgspec.Struct, kw_only=True):
    """One client request, whatever its protocol. `model` is the route name the client asked for."""

    operation: Operation
    model: str
    # chat
    messages: tuple[Message, ...] = ()
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice | None = None
    response_format: ResponseFormat | None = None
    thinking: ThinkingConfig | None = None
    # completions and embeddings: each input a text or a token array (a single one is a list of one)
    inputs: tuple[str | tuple[int, ...], ...] = ()
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = None
    # sampling and output
    max_output_tokens: int | None = None
    output_tokens_field: str = "max_tokens"
    n: int | None = None
    best_of: int | None = None  # legacy completions: generated, `n` of them returned
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # Anthropic's; llama.cpp, vLLM and SGLang take it in a chat body too
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    stream: bool = False
    include_usage: bool = False  # the client asked for the usage chunk of a stream
    user: str | None = None
    metadata: dict[str, str] | None = None
    # Strait's own per-request preferences (body field `strait`), decoded by the route stage.
    preferences: msgspec.Raw | None = None
    # Top-level fields the codec does not model, as the client wrote them.
    extra: dict[str, msgspec.Raw] = {}
    # The client's bytes and where Strait may edit them (byte-faithful passthrough); None when built in-process.
    original: Original | None = None

    def prompt_texts(self) -> list[str]:
        """The texts prompt tokens are counted over: one per message (its text parts joined) for chat, one
        per text input otherwise (token arrays are not counted)."""
        if self.operation == "chat":
            out = []
            for m in self.messages:
                content = m.content
                if len(content) == 1 and type(content[0]) is Text:  # the common case, without a list
                    out.append(content[0].text)
                    continue
                texts = [p.text for p in _flat(content) if isinstance(p, Text | Thinking)]
                out.append(texts[0] if len(texts) == 1 else " ".join(texts))
            return out
        return [i for i in self.inputs if isinstance(i, str)]

    def tool_outside(self, kinds: frozenset[str]) -> Tool | None:
        """The first tool whose kind is not in `kinds`: what a translation that carries only those must
        refuse (never drop: the model would answer without the tool the client offered)."""
        return next((t for t in self.tools if t.kind not in kinds), None)

    def uses_images(self) -> bool:
        return any(isinstance(p, Image) for m in self.messages for p in m.content)


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    """Tokens as the provider's invoice counts them. `input_tokens` includes the cached ones (OpenAI's
    convention; Anthropic's `input_tokens` + `cache_read_input_tokens` + `cache_creation_input_tokens`)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_read_tokens: int = 0
    cached_write_tokens: int = 0
    reasoning_tokens: int = 0  # included in output_tokens


FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "error"]


class Choice(msgspec.Struct, frozen=True, kw_only=True):
    index: int = 0
    message: Message
    finish_reason: FinishReason | None = None


class Response(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    model: str
    choices: tuple[Choice, ...] = ()
    usage: Usage | None = None
    created: int = 0
    # Embeddings: one vector per input.
    embeddings: tuple[tuple[float, ...], ...] = ()
    extra: dict[str, msgspec.Raw] = {}


class ToolCallDelta(msgspec.Struct, frozen=True, kw_only=True):
    """A fragment of a tool call in a stream: id and name come first, arguments in pieces."""

    index: int = 0
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """One step of a stream (an OpenAI chunk's choice delta, an Anthropic content_block_delta, a Responses
    output_text.delta): at most one kind of delta is set."""

    index: int = 0  # the choice
    role: Role | None = None
    text: str | None = None
    thinking: str | None = None
    signature: str | None = None  # arrives whole, at the end of a thinking block
    tool_call: ToolCallDelta | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None  # the last event of a stream that reports it
