"""From what a request carried to what is captured: the canonical request and the answer (a JSON body, or
a stream's chunks assembled) as capture Structs, every text through the tenant's redactor, only what its
`capture.include` lets in. Run by the capture writer, a few records per turn, never on a request's time."""

from __future__ import annotations

import msgspec

from gateway.canonical import Audio, File, Image, Message, Opaque, Request, Text, ToolCall, ToolResult
from gateway.capture.records import CapturedAnswer, CapturedMessage, CapturedRequest, CapturedTool, CapturedToolCall
from gateway.contracts import TextRedactor

_MARKERS = {Image: "[image]", Audio: "[audio]", File: "[file]", Opaque: "[opaque]"}


def _text_of(parts: tuple[object, ...], redact: TextRedactor) -> str | None:
    texts: list[str] = []
    for p in parts:
        if isinstance(p, Text):
            texts.append(redact.redact(p.text))
        elif isinstance(p, ToolResult):
            inner = _text_of(p.content, redact)
            if inner:
                texts.append(inner)
        else:
            marker = _MARKERS.get(type(p))  # type: ignore[call-overload]
            if marker is not None:
                texts.append(marker)
    return "\n".join(texts) if texts else None


def _calls(parts: tuple[object, ...], redact: TextRedactor) -> tuple[CapturedToolCall, ...]:
    return tuple(
        CapturedToolCall(id=p.id, name=p.name, arguments=redact.redact(p.arguments))
        for p in parts
        if isinstance(p, ToolCall)
    )


def _messages(messages: tuple[Message, ...], redact: TextRedactor, tools: bool) -> tuple[CapturedMessage, ...]:
    out: list[CapturedMessage] = []
    for m in messages:
        results = [p for p in m.content if isinstance(p, ToolResult)]
        if results:
            # OpenAI `role: tool`, or Anthropic's tool_result parts in a user turn: one tool message each.
            if tools:
                out += [
                    CapturedMessage(role="tool", tool_call_id=r.call_id, content=_text_of(r.content, redact))
                    for r in results
                ]
            rest = tuple(p for p in m.content if not isinstance(p, ToolResult))
            if not rest:
                continue
            m = msgspec.structs.replace(m, content=rest)
        calls = _calls(m.content, redact) if tools else ()
        content = _text_of(m.content, redact)
        if content is None and not calls:
            continue
        out.append(CapturedMessage(role=m.role, content=content, name=m.name, tool_calls=calls))
    return tuple(out)


def captured_request(request: Request, redact: TextRedactor, include: tuple[str, ...]) -> CapturedRequest | None:
    prompts = "prompts" in include
    tools = "tool_calls" in include
    if not prompts and not tools:
        return None
    messages = _messages(request.messages, redact, tools) if prompts else ()
    return CapturedRequest(
        messages=messages,
        prompts=tuple(redact.redact(i) for i in request.inputs if isinstance(i, str)) if prompts else (),
        tools=tuple(
            CapturedTool(
                name=t.name,
                description=t.description,
                parameters=bytes(t.parameters).decode() if t.parameters is not None else None,
            )
            for t in request.tools
        )
        if tools
        else (),
        temperature=request.temperature,
        top_p=request.top_p,
        max_output_tokens=request.max_output_tokens,
        stream=request.stream,
    )


def conversation_key(request: Request) -> bytes | None:
    """What a regenerate re-sends: the messages before the turn the model is asked for (a trailing
    assistant prefill left out), as bytes to hash; None for a request without messages."""
    messages = request.messages
    while messages and messages[-1].role == "assistant":
        messages = messages[:-1]
    if not messages:
        return None
    return msgspec.json.encode(messages)


# ---- the answer ----


class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _CallDelta(msgspec.Struct):
    index: int = 0
    id: str | None = None
    function: _Function | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    tool_calls: list[_CallDelta] | None = None


class _ChunkChoice(msgspec.Struct):
    index: int = 0
    delta: _Delta | None = None
    text: str | None = None
    finish_reason: str | None = None


class _Chunk(msgspec.Struct):
    id: str | None = None
    choices: list[_ChunkChoice] = []


class _Message(msgspec.Struct):
    content: str | None = None
    tool_calls: list[_CallDelta] | None = None


class _Choice(msgspec.Struct):
    index: int = 0
    message: _Message | None = None
    text: str | None = None
    finish_reason: str | None = None


class _Body(msgspec.Struct):
    id: str | None = None
    choices: list[_Choice] = []


_chunk = msgspec.json.Decoder(_Chunk).decode
_body = msgspec.json.Decoder(_Body).decode


def _answer(
    content: str | None,
    calls: list[CapturedToolCall],
    finish: str | None,
    redact: TextRedactor,
    include: tuple[str, ...],
    truncated: bool = False,
) -> CapturedAnswer | None:
    completions = "completions" in include
    tools = "tool_calls" in include
    if not completions and not tools:
        return None
    return CapturedAnswer(
        content=redact.redact(content) if completions and content is not None else None,
        tool_calls=tuple(msgspec.structs.replace(c, arguments=redact.redact(c.arguments)) for c in calls)
        if tools
        else (),
        finish_reason=finish,
        truncated=truncated,
    )


def answer_of_body(
    body: bytes, redact: TextRedactor, include: tuple[str, ...]
) -> tuple[CapturedAnswer | None, str | None]:
    """A whole answer (chat.completion or text_completion) and its id; None when it is not one (an
    error body)."""
    try:
        decoded = _body(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None, None
    choice = next((c for c in decoded.choices if c.index == 0), None)
    if choice is None:
        return None, decoded.id
    message = choice.message
    content = message.content if message is not None else choice.text
    calls = [
        CapturedToolCall(id=c.id or "", name=c.function.name or "", arguments=c.function.arguments or "")
        for c in (message.tool_calls or [] if message is not None else [])
        if c.function is not None
    ]
    return _answer(content, calls, choice.finish_reason, redact, include), decoded.id


def answer_of_stream(
    events: list[bytes], redact: TextRedactor, include: tuple[str, ...], truncated: bool
) -> tuple[CapturedAnswer | None, str | None]:
    """A stream's chunks (OpenAI chunk JSON) assembled into its first choice: content, tool calls (their
    argument pieces joined), finish reason; and the stream's id. Undecodable chunks are skipped."""
    response_id: str | None = None
    text: list[str] = []
    calls: dict[int, list[str]] = {}
    heads: dict[int, CapturedToolCall] = {}
    finish: str | None = None
    for event in events:
        if event.strip() == b"[DONE]":
            continue
        try:
            chunk = _chunk(event)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        if response_id is None:
            response_id = chunk.id
        for choice in chunk.choices:
            if choice.index != 0:
                continue
            if choice.finish_reason:
                finish = choice.finish_reason
            if choice.text:
                text.append(choice.text)
            delta = choice.delta
            if delta is None:
                continue
            if delta.content:
                text.append(delta.content)
            for call in delta.tool_calls or ():
                head = heads.get(call.index)
                function = call.function or _Function()
                if head is None:
                    heads[call.index] = CapturedToolCall(id=call.id or "", name=function.name or "")
                    calls[call.index] = []
                elif (call.id and not head.id) or (function.name and not head.name):
                    heads[call.index] = CapturedToolCall(
                        id=head.id or call.id or "", name=head.name or function.name or ""
                    )
                if function.arguments:
                    calls[call.index].append(function.arguments)
    assembled = [msgspec.structs.replace(heads[i], arguments="".join(calls[i])) for i in sorted(heads)]
    return _answer("".join(text) if text else None, assembled, finish, redact, include, truncated), response_id
