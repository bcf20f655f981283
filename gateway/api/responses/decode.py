"""Responses request bodies, decoded once into the canonical chat request, with the input bounds of the
OpenAI codec (the same skim: JSON object, UTF-8, container count, depth, no upstream-redirecting field;
`max_output_tokens` within the server's range). A chat upstream gets a chat body translated from the
canonical request (gateway.upstream.chat_body); an upstream that speaks Responses itself (an `openai`
backend with the `responses` capability) gets the client's own bytes (`Request.original`), model
replaced. Strait keeps the stored responses, so a `previous_response_id` is resolved here: that
upstream's body is then re-assembled from the client's top-level values (each byte for byte) with
`input` replaced by the whole conversation and `previous_response_id` left out.

Two steps, because `previous_response_id` names a stored conversation that only the tenant can read:
`parse` checks the body (before any store is asked), `build` turns it, after the stored items, into the
canonical request and the `Exchange` the encoder needs (what the response object echoes, and the
resolved input items a stored response keeps).

Every failure is a GatewayError (400 naming the field), in OpenAI's envelope like the rest of /v1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from gateway.api.inbound import DEFAULT_LIMITS, InboundLimits
from gateway.api.openai.decode import invalid, skim
from gateway.api.responses.wire import (
    ContentPart,
    FormatParam,
    FunctionCallItem,
    FunctionCallOutputItem,
    InputFile,
    InputImage,
    InputText,
    ItemHead,
    MessageItem,
    OutputText,
    ReasoningItem,
    RefusalPart,
    ResponsesRequest,
    ToolChoiceParam,
    ToolParam,
)
from gateway.canonical import (
    Image,
    Message,
    Part,
    Reasoning,
    Request,
    ResponseFormat,
    Role,
    Text,
    ThinkingConfig,
    Tool,
    ToolCall,
    ToolChoice,
    ToolResult,
)
from gateway.errors import InvalidRequest
from gateway.passthrough import Original, RepeatedField, original_of

PROTOCOL: Final = "responses"
_decoder = msgspec.json.Decoder(ResponsesRequest)
_head = msgspec.json.Decoder(ItemHead)
_items: Final[dict[str, msgspec.json.Decoder[Any]]] = {
    "message": msgspec.json.Decoder(MessageItem),
    "function_call": msgspec.json.Decoder(FunctionCallItem),
    "function_call_output": msgspec.json.Decoder(FunctionCallOutputItem),
    "reasoning": msgspec.json.Decoder(ReasoningItem),
}
_encode = msgspec.json.encode
_NULL = b"null"
# `developer` is OpenAI's newer name for `system` (its own models treat them alike); chat engines such as
# llama.cpp know `system` only, so a developer message reaches a chat upstream as a system message.
_ROLES: Final[dict[str, Role]] = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_TRANSLATED = "this gateway translates Responses requests for Chat Completions upstreams"


@dataclass(slots=True)
class Exchange:
    """One Responses request as its encoder needs it (written by `build`, read by the edge's encoder):
    the fields the response object echoes and the conversation a stored response keeps."""

    model: str
    store: bool
    created_at: int
    # The request's settings as the response object shows them (`instructions`, `tools`, `text`, ...).
    echo: dict[str, Any]
    # Every input item that led to this response, as JSON: the stored conversation's items first (its
    # input, then its output), then this request's (a string input as one user message item).
    input_items: list[msgspec.Raw] = field(default_factory=list)


def _present(raw: msgspec.Raw) -> bool:
    return bool(len(raw)) and bytes(raw) != _NULL


def parse(body: bytes, limits: InboundLimits = DEFAULT_LIMITS) -> tuple[ResponsesRequest, dict[str, msgspec.Raw]]:
    """The body checked and decoded (nothing resolved yet), with its top level as raw JSON values."""
    top = skim(body, limits)
    try:
        wire = _decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise invalid(str(exc)) from None
    if wire.input is None and wire.previous_response_id is None:
        raise InvalidRequest("input: Field required (or give previous_response_id).", param="input")
    if isinstance(wire.input, list) and not wire.input and wire.previous_response_id is None:
        raise InvalidRequest("input: at least one item is required.", param="input")
    limit = limits.max_output_tokens
    if wire.max_output_tokens is not None and not 1 <= wire.max_output_tokens <= limit:
        raise InvalidRequest(f"'max_output_tokens' must be between 1 and {limit}.", param="max_output_tokens")
    if wire.temperature is not None and not 0 <= wire.temperature <= 2:
        raise InvalidRequest("temperature: must be between 0 and 2.", param="temperature")
    if wire.top_p is not None and not 0 <= wire.top_p <= 1:
        raise InvalidRequest("top_p: must be between 0 and 1.", param="top_p")
    if wire.background:
        raise InvalidRequest("background: background responses are not supported; omit it.", param="background")
    for name in ("conversation", "prompt"):
        if _present(getattr(wire, name)):
            raise InvalidRequest(
                f"{name}: server-side {'conversations' if name == 'conversation' else 'prompt templates'} are not "
                "supported by this gateway; send the input items (or previous_response_id) instead.",
                param=name,
            )
    return wire, top


def build(
    wire: ResponsesRequest,
    top: dict[str, msgspec.Raw],
    previous: list[msgspec.Raw] | None = None,
    body: bytes | None = None,
) -> tuple[Request, Exchange]:
    """The canonical request for `wire`, after `previous` (the stored conversation's items, resolved);
    `body`, the client's bytes, is kept for an upstream that speaks Responses (passthrough)."""
    own = _own_items(wire.input)
    items = [*(previous or ()), *own]
    messages = _messages(items, len(previous or ()))
    if wire.instructions:
        messages.insert(0, Message(role="system", content=(Text(text=wire.instructions),)))
    if not messages:
        raise InvalidRequest("input: at least one item is required.", param="input")
    tools = [_tool(t, i) for i, t in enumerate(wire.tools or ())]
    choice, tools = _tool_choice(wire.tool_choice, wire.parallel_tool_calls, tools)
    effort = wire.reasoning.effort if wire.reasoning is not None else None
    request = Request(
        operation="chat",
        model=wire.model,
        messages=tuple(messages),
        tools=tuple(tools),
        tool_choice=choice,
        response_format=_format(wire.text.format if wire.text is not None else None),
        thinking=None if effort is None else ThinkingConfig(enabled=effort != "none", effort=effort),
        max_output_tokens=wire.max_output_tokens,
        output_tokens_field="max_output_tokens",
        temperature=wire.temperature,
        top_p=wire.top_p,
        stream=bool(wire.stream),
        # The relay keeps the usage chunk for the edge: a response object always reports usage.
        include_usage=True,
        user=wire.user,
        metadata=dict(wire.metadata) if wire.metadata else None,
        original=_original(body, top, items if previous is not None else None),
    )
    store = True if wire.store is None else wire.store  # OpenAI's default
    exchange = Exchange(
        model=wire.model, store=store, created_at=int(time.time()), echo=_echo(wire, top, store), input_items=items
    )
    return request, exchange


def _original(
    body: bytes | None, top: dict[str, msgspec.Raw], conversation: list[msgspec.Raw] | None
) -> Original | None:
    """What a Responses upstream gets: the client's `body` as it came, or with a resolved conversation its
    members in order, each value as it came, `input` all of the conversation. None: no body given."""
    if body is None:
        return None
    if conversation is not None:
        values = {name: value for name, value in top.items() if name != "previous_response_id"}
        values["input"] = msgspec.Raw(_encode(conversation))
        body, top = _encode(values), values
    try:
        return original_of(PROTOCOL, body, top)
    except RepeatedField as exc:
        raise InvalidRequest(
            f"The field '{exc.name}' appears more than once in the request body; send each field once.",
            param=exc.name,
        ) from None


def _echo(wire: ResponsesRequest, top: dict[str, msgspec.Raw], store: bool) -> dict[str, Any]:
    """The request's settings as OpenAI's response object repeats them (the client's JSON where it gave some)."""
    effort = wire.reasoning.effort if wire.reasoning is not None else None
    text = top.get("text")
    return {
        "instructions": wire.instructions,
        "max_output_tokens": wire.max_output_tokens,
        "metadata": wire.metadata or {},
        "parallel_tool_calls": True if wire.parallel_tool_calls is None else wire.parallel_tool_calls,
        "previous_response_id": wire.previous_response_id,
        "reasoning": {"effort": effort, "summary": None},
        "store": store,
        "temperature": 1.0 if wire.temperature is None else wire.temperature,
        "text": text if text is not None and _present(text) else {"format": {"type": "text"}},
        "tool_choice": top["tool_choice"] if _present(top.get("tool_choice", msgspec.Raw())) else "auto",
        "tools": top["tools"] if _present(top.get("tools", msgspec.Raw())) else [],
        "top_p": 1.0 if wire.top_p is None else wire.top_p,
        "truncation": "disabled",
        "user": wire.user,
    }


def _own_items(value: str | list[msgspec.Raw] | None) -> list[msgspec.Raw]:
    if value is None:
        return []
    if isinstance(value, str):
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": value}]}
        return [msgspec.Raw(_encode(item))]
    return value


def _item_error(exc: msgspec.ValidationError, where: str) -> InvalidRequest:
    """A validation error inside one item, named from the body's root (`input[2].content[0].type`)."""
    message = str(exc)
    message = message.replace("`$", f"`$.{where}", 1) if " - at `$" in message else f"{message} - at `$.{where}`"
    return invalid(message)


def _where(index: int, stored: int) -> str:
    """An item's name in error messages: the client's `input[i]`, or the stored conversation's."""
    return f"input[{index - stored}]" if index >= stored else "previous_response_id"


def _messages(items: list[msgspec.Raw], stored: int) -> list[Message]:
    """The items as canonical messages. An assistant's turn arrives as several items (reasoning, its
    message, its function calls); they become one assistant message, as Chat Completions wants a turn's
    text and tool calls together. A function call's output is a `role: tool` message, the canonical shape
    whatever the protocol."""
    out: list[Message] = []
    turn: list[Part] | None = None  # the assistant turn being gathered

    def close() -> None:
        nonlocal turn
        if turn:
            out.append(Message(role="assistant", content=tuple(turn)))
        turn = None

    for i, raw in enumerate(items):
        where = _where(i, stored)
        try:
            head = _head.decode(raw)
        except msgspec.ValidationError as exc:
            raise _item_error(exc, where) from None
        kind = head.type or "message"
        decoder = _items.get(kind)
        if decoder is None:
            raise _unsupported_item(kind, where)
        try:
            item = decoder.decode(raw)
        except msgspec.ValidationError as exc:
            raise _item_error(exc, where) from None
        if isinstance(item, MessageItem) and item.role != "assistant":
            close()
            out.append(Message(role=_ROLES[item.role], content=_content(item.content, where)))
        elif isinstance(item, FunctionCallOutputItem):
            close()
            result = ToolResult(call_id=item.call_id, content=_content(item.output, f"{where}.output"))
            out.append(Message(role="tool", content=(result,)))
        else:
            if turn is None:
                turn = []
            if isinstance(item, MessageItem):
                if any(isinstance(p, Text | ToolCall) for p in turn):
                    close()  # a second assistant message is a turn of its own, never glued to the first
                    turn = []
                turn.extend(_content(item.content, where))
            elif isinstance(item, FunctionCallItem):
                google = item.extra_content.google if item.extra_content is not None else None
                signature = google.thought_signature if google is not None else None
                turn.append(ToolCall(id=item.call_id, name=item.name, arguments=item.arguments, signature=signature))
            else:
                assert isinstance(item, ReasoningItem)
                if any(isinstance(p, Text | ToolCall) for p in turn):
                    close()
                    turn = []
                summary = tuple(s.text for s in item.summary)
                turn.append(Reasoning(id=item.id, summary=summary, encrypted_content=item.encrypted_content))
    close()
    return out


def _unsupported_item(kind: str, where: str) -> InvalidRequest:
    if kind == "item_reference":
        reason = "item references are not supported; send the item itself, or use previous_response_id"
    else:
        reason = (
            f"items of type '{kind}' are not supported ({_TRANSLATED}: messages, function_call, "
            "function_call_output and reasoning items)"
        )
    return InvalidRequest(f"{where}: {reason}.", param=f"{where}.type")


def _content(content: str | list[ContentPart], where: str) -> tuple[Part, ...]:
    if isinstance(content, str):
        return (Text(text=content),)
    return tuple(_part(p, f"{where}.content[{j}]") for j, p in enumerate(content))


def _part(p: ContentPart, where: str) -> Part:
    if isinstance(p, InputText | OutputText):
        return Text(text=p.text)
    if isinstance(p, RefusalPart):
        return Text(text=p.refusal)
    if isinstance(p, InputImage):
        if not p.image_url:
            raise InvalidRequest(
                f"{where}: an input_image needs 'image_url' (a URL or a data: URL); uploaded files are not supported.",
                param=f"{where}.image_url",
            )
        return Image(url=p.image_url, detail=p.detail)
    assert isinstance(p, InputFile)
    raise InvalidRequest(f"{where}: input_file parts are not supported ({_TRANSLATED}).", param=f"{where}.type")


def _tool(t: ToolParam, i: int) -> Tool:
    where = f"tools[{i}]"
    if t.type != "function":
        raise InvalidRequest(
            f"{where}: the tool '{t.type}' is not supported: {_TRANSLATED}, which take function tools only "
            "(built-in tools such as web_search, file_search or code_interpreter run on OpenAI's servers).",
            param=f"{where}.type",
        )
    if not t.name:
        raise InvalidRequest(f"{where}.name: Field required.", param=f"{where}.name")
    parameters = t.parameters if _present(t.parameters) else None
    if parameters is not None and not bytes(parameters).lstrip().startswith(b"{"):
        raise InvalidRequest(f"{where}.parameters: must be a JSON object.", param=f"{where}.parameters")
    return Tool(name=t.name, description=t.description, parameters=parameters, strict=t.strict)


def _tool_choice(
    choice: str | ToolChoiceParam | None, parallel: bool | None, tools: list[Tool]
) -> tuple[ToolChoice | None, list[Tool]]:
    """The canonical tool choice, and the tools left on offer (`allowed_tools` narrows them)."""
    if choice is None:
        return (None if parallel is None else ToolChoice(mode="auto", parallel=parallel)), tools
    if isinstance(choice, str):
        return ToolChoice(mode=choice, parallel=parallel), tools  # type: ignore[arg-type]  # the wire Literal
    if choice.type == "function":
        if not choice.name:
            raise InvalidRequest("tool_choice.name: Field required.", param="tool_choice.name")
        return ToolChoice(mode="tool", name=choice.name, parallel=parallel), tools
    if choice.type == "allowed_tools":
        allowed = choice.tools or []
        for j, a in enumerate(allowed):
            if a.type != "function":
                raise InvalidRequest(
                    f"tool_choice.tools[{j}]: the tool '{a.type}' is not supported: {_TRANSLATED}.",
                    param=f"tool_choice.tools[{j}].type",
                )
        names = {a.name for a in allowed}
        return ToolChoice(mode=choice.mode or "auto", parallel=parallel), [t for t in tools if t.name in names]
    raise InvalidRequest(
        f"tool_choice: the tool '{choice.type}' is not supported: {_TRANSLATED}, which take function tools only.",
        param="tool_choice.type",
    )


def _format(fmt: FormatParam | None) -> ResponseFormat | None:
    """`text.format` as the canonical response format, shaped as Chat Completions' `json_schema` (`name`,
    `strict`, `schema`, `description`), which the chat body passes on and the simulated backend honours."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ResponseFormat(type="json_object")
    if not _present(fmt.schema) or not bytes(fmt.schema).lstrip().startswith(b"{"):
        raise InvalidRequest("text.format.schema: a JSON schema object is required.", param="text.format.schema")
    spec: dict[str, Any] = {"name": fmt.name or "output", "schema": fmt.schema}
    if fmt.strict is not None:
        spec["strict"] = fmt.strict
    if fmt.description is not None:
        spec["description"] = fmt.description
    return ResponseFormat(type="json_schema", json_schema=msgspec.Raw(_encode(spec)))
