"""OpenAI wire Structs to the canonical request: messages and content parts, tools, sampling and output
parameters. Fields the wire Structs do not model stay in `Request.extra` as the client's bytes."""

from __future__ import annotations

from typing import Any, Final

import msgspec

from gateway.api.wire import (
    ChatRequest,
    CompletionRequest,
    ContentPart,
    EmbeddingsRequest,
    Message,
    ResponseFormat,
    ThinkingBlock,
    Tool,
    ToolChoice,
)
from gateway.api.wire import ToolCall as WireToolCall
from gateway.canonical import (
    Image,
    Opaque,
    Operation,
    Part,
    RedactedThinking,
    Request,
    Role,
    Text,
    Thinking,
    ToolCall,
    ToolResult,
)
from gateway.canonical import Message as CMessage
from gateway.canonical import ResponseFormat as CResponseFormat
from gateway.canonical import Tool as CTool
from gateway.canonical import ToolChoice as CToolChoice
from gateway.passthrough import Original

# Top-level fields the canonical request holds, by operation; any other goes to `extra`.
_MODELLED: Final[dict[Operation, frozenset[str]]] = {
    "chat": frozenset(ChatRequest.__struct_fields__)
    | {"strait", "logprobs", "top_logprobs", "parallel_tool_calls", "best_of"},
    "completions": frozenset(CompletionRequest.__struct_fields__) | {"strait", "logprobs", "best_of"},
    "embeddings": frozenset(EmbeddingsRequest.__struct_fields__) | {"strait"},
}
_NULL = b"null"
_ROLES: Final[dict[str, Role]] = {
    "system": "system",
    "developer": "developer",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",
}


def _schema(raw: msgspec.Raw) -> msgspec.Raw | None:
    return raw if len(raw) and bytes(raw) != _NULL else None


def _part(p: ContentPart) -> Part:
    cache = p.cache_control if len(p.cache_control) and bytes(p.cache_control) != _NULL else None
    if p.type == "text" and p.text is not None:
        return Text(text=p.text, cache_control=cache)
    if p.type == "image_url" and p.image_url is not None:
        return Image(url=p.image_url.url, detail=p.image_url.detail, cache_control=cache)
    return Opaque(protocol="openai", kind=p.type)


def _message(m: Message) -> CMessage:
    content = m.content
    parts: tuple[Part, ...]
    if isinstance(content, str):
        parts = (Text(text=content),)
    elif content is None:
        parts = ()
    else:
        parts = tuple(_part(p) for p in content)
    if m.role in ("tool", "function"):
        result = ToolResult(call_id=m.tool_call_id or m.name or "", content=parts)
        return CMessage(role="tool", content=(result,), name=m.name)
    if m.thinking_blocks and m.role == "assistant":
        # An Anthropic upstream's thinking, returned: first in the turn, as Messages wants it, each
        # signature (or redacted block) as it came.
        parts = tuple(_thinking(b) for b in m.thinking_blocks) + parts
    if m.tool_calls:
        parts += tuple(_tool_call(c) for c in m.tool_calls)
    return CMessage(role=_ROLES[m.role], content=parts, name=m.name)


def _thinking(b: ThinkingBlock) -> Part:
    if b.type == "redacted_thinking":
        return RedactedThinking(data=b.data or "")
    return Thinking(text=b.thinking or "", signature=b.signature or None)


def _tool_call(c: WireToolCall) -> ToolCall:
    if c.custom is not None:  # a custom tool's call: its input is text, carried as the arguments
        return ToolCall(id=c.id or "", name=c.custom.name or "", arguments=c.custom.input or "", kind=c.type)
    f = c.function
    google = c.extra_content.google if c.extra_content is not None else None
    return ToolCall(
        id=c.id or "",
        name=(f.name if f else None) or "",
        arguments=(f.arguments if f else None) or "",
        kind=c.type,
        signature=google.thought_signature if google is not None else None,
    )


def _tool(t: Tool) -> CTool:
    f = t.function
    if f is not None and t.type == "function":
        return CTool(
            name=f.name, description=f.description, parameters=_schema(f.parameters), strict=f.strict, kind=t.type
        )
    # A custom tool (its grammar kept as `parameters`, the client's bytes) or a type Strait does not know
    # (named by its type): carried for the upstream, which decides; a translation refuses what it cannot carry.
    c = t.custom
    if c is not None:
        return CTool(name=c.name or t.type, description=c.description, parameters=_schema(c.format), kind=t.type)
    return CTool(name=t.type, kind=t.type)


def _tool_choice(choice: str | ToolChoice | None, parallel_raw: msgspec.Raw | None) -> CToolChoice | None:
    parallel = _parallel(parallel_raw)
    if choice is None:
        return CToolChoice(parallel=parallel) if parallel is not None else None
    p = parallel
    if isinstance(choice, str):
        return CToolChoice(mode=choice, parallel=p)  # type: ignore[arg-type]  # the wire Literal is a subset
    named = choice.function or choice.custom
    return CToolChoice(mode="tool", name=named.name if named else None, parallel=p)


def _format(f: ResponseFormat | None) -> CResponseFormat | None:
    return None if f is None else CResponseFormat(type=f.type, json_schema=_schema(f.json_schema))


def _inputs(raw: str | list[str | int | list[int]]) -> tuple[str | tuple[int, ...], ...]:
    """Every input as a text or a token array: a single string or token array is a list of one."""
    if isinstance(raw, str):
        return (raw,)
    if raw and all(isinstance(i, int) for i in raw):
        return (tuple(raw),)  # type: ignore[arg-type]  # all ints: one token array
    return tuple(i if isinstance(i, str) else tuple(i) if isinstance(i, list) else (i,) for i in raw)


def canonical_request(
    operation: Operation,
    wire: ChatRequest | CompletionRequest | EmbeddingsRequest,
    top: dict[str, msgspec.Raw],
    numbers: dict[str, Any],
    original: Original,
) -> Request:
    """The canonical request of a validated wire request. `top` is the body's top level as Raw values,
    `numbers` the range-checked integers decoded from it (best_of, logprobs...)."""
    modelled = _MODELLED[operation]
    extra = {k: v for k, v in top.items() if k not in modelled}
    preferences = top.get("strait")
    if isinstance(wire, EmbeddingsRequest):
        return Request(
            operation=operation,
            model=wire.model,
            inputs=_inputs(wire.input),
            encoding_format=wire.encoding_format,
            dimensions=wire.dimensions,
            user=wire.user,
            preferences=preferences,
            extra=extra,
            original=original,
        )
    stop = (wire.stop,) if isinstance(wire.stop, str) else tuple(wire.stop or ())
    options = wire.stream_options
    logprobs = numbers.get("logprobs")
    best_of = numbers.get("best_of")
    if isinstance(wire, CompletionRequest):
        return Request(
            operation=operation,
            model=wire.model,
            inputs=_inputs(wire.prompt),
            max_output_tokens=wire.max_tokens,
            n=wire.n,
            best_of=best_of if isinstance(best_of, int) else None,
            temperature=wire.temperature,
            top_p=wire.top_p,
            seed=wire.seed,
            stop=stop,
            logprobs=logprobs if isinstance(logprobs, bool | int) else None,
            stream=bool(wire.stream),
            include_usage=bool(options is not None and options.include_usage),
            user=wire.user,
            preferences=preferences,
            extra=extra,
            original=original,
        )
    top_logprobs = numbers.get("top_logprobs")
    parallel = top.get("parallel_tool_calls")
    return Request(
        operation=operation,
        model=wire.model,
        messages=tuple([_message(m) for m in wire.messages]),
        tools=tuple([_tool(t) for t in wire.tools]) if wire.tools else (),
        tool_choice=_tool_choice(wire.tool_choice, parallel) if wire.tool_choice or parallel else None,
        response_format=_format(wire.response_format),
        max_output_tokens=wire.max_completion_tokens or wire.max_tokens,
        output_tokens_field="max_completion_tokens" if "max_completion_tokens" in top else "max_tokens",
        n=wire.n,
        best_of=best_of if isinstance(best_of, int) else None,
        temperature=wire.temperature,
        top_p=wire.top_p,
        seed=wire.seed,
        presence_penalty=wire.presence_penalty,
        frequency_penalty=wire.frequency_penalty,
        stop=stop,
        logprobs=logprobs if isinstance(logprobs, bool | int) else None,
        top_logprobs=top_logprobs if isinstance(top_logprobs, int) else None,
        stream=bool(wire.stream),
        include_usage=bool(options is not None and options.include_usage),
        user=wire.user,
        # The string entries (OpenAI's kind); any others reach an upstream in the client's bytes.
        metadata={k: v for k, v in wire.metadata.items() if isinstance(v, str)} if wire.metadata is not None else None,
        preferences=preferences,
        extra=extra,
        original=original,
    )


def _parallel(raw: msgspec.Raw | None) -> bool | None:
    if raw is None:
        return None
    value = bytes(raw)
    return True if value == b"true" else False if value == b"false" else None
