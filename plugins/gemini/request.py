"""The canonical request as Gemini's `GenerateContentRequest` (the body of `models/{model}:generateContent`
and `:streamGenerateContent`).

- system and developer messages -> `systemInstruction` (their text, in order: Gemini has one);
- user -> `role: user`, assistant -> `role: model`; tool results -> `functionResponse` parts of a user
  turn (Gemini wants the function's name: it is found from the call of the same id in the history);
  consecutive turns of one role are merged (several tool results answer one model turn);
- parts: text; images and audio as base64 `inlineData` (a `data:` URL too; a remote URL is refused:
  Gemini fetches no arbitrary URLs); tool calls as `functionCall` with their `thoughtSignature` (the
  canonical `ToolCall.signature`) byte for byte; a thinking block with a signature is sent back as a
  thought part (`thought: true`), an empty one (how an Anthropic client holds a call's signature,
  gateway.api.anthropic.encode) as the signature of the part after it, an unsigned one (another
  upstream's reasoning) is left out;
- tools -> `tools[].functionDeclarations` (the JSON schema as Gemini's Schema: plugins.gemini.schema);
  tool_choice -> `toolConfig.functionCallingConfig` (auto AUTO, none NONE, required ANY, a named tool ANY
  with `allowedFunctionNames`);
- `generationConfig`: temperature, topP, topK, maxOutputTokens, stopSequences, candidateCount (n), seed,
  presence/frequency penalties, responseMimeType/responseSchema (response_format), thinkingConfig (the
  canonical thinking config, or an OpenAI client's `reasoning_effort`).

What Gemini cannot be given faithfully is refused with `Untranslatable` (a 400 naming it), never
dropped: redacted thinking, encrypted reasoning items, parts Strait keeps opaque, tool types other than
functions, logprobs, remote image URLs, a tool result for a call not in the history.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Final

import msgspec

from gateway.canonical import (
    Audio,
    File,
    Image,
    Message,
    Part,
    RedactedThinking,
    Request,
    Text,
    Thinking,
    ToolCall,
    ToolResult,
)
from gateway.upstream.chat_body import Untranslatable
from plugins.gemini.schema import SchemaNotExpressible, to_gemini

# OpenAI's `reasoning_effort` as a thinking budget (the mapping of Google's own OpenAI-compatible API).
EFFORT_BUDGETS: Final = {"none": 0, "minimal": 512, "low": 1024, "medium": 8192, "high": 24576}
_CHOICE_MODES: Final = {"auto": "AUTO", "none": "NONE", "required": "ANY", "tool": "ANY"}
_ROLES: Final = {"user": "user", "assistant": "model", "tool": "user"}


def generate_content_body(request: Request) -> bytes:
    """The JSON body for `request` (Untranslatable for what Gemini cannot be given)."""
    foreign = request.tool_outside(frozenset({"function"}))
    if foreign is not None:
        raise Untranslatable(
            f"The tool '{foreign.name}' of type '{foreign.kind}' cannot be given to this route's upstream "
            "(Gemini takes function tools only)."
        )
    if request.logprobs or request.top_logprobs:
        raise Untranslatable("logprobs cannot be asked of this route's upstream (Gemini) through the gateway.")
    body: dict[str, Any] = {"contents": _contents(request.messages)}
    system = [{"text": _system_text(m)} for m in request.messages if m.role in ("system", "developer") and m.content]
    if system:
        body["systemInstruction"] = {"parts": system}
    if request.tools:
        body["tools"] = [
            {"functionDeclarations": [_declaration(t.name, t.description, t.parameters) for t in request.tools]}
        ]
    choice = request.tool_choice
    if choice is not None and (request.tools or choice.mode == "none"):
        config: dict[str, Any] = {"mode": _CHOICE_MODES[choice.mode]}
        if choice.mode == "tool" and choice.name:
            config["allowedFunctionNames"] = [choice.name]
        body["toolConfig"] = {"functionCallingConfig": config}
    generation = _generation_config(request)
    if generation:
        body["generationConfig"] = generation
    return msgspec.json.encode(body)


def _system_text(message: Message) -> str:
    texts = []
    for part in message.content:
        if not isinstance(part, Text):
            raise Untranslatable(f"A system message holds a '{_tag(part)}' part; Gemini's system instruction is text.")
        texts.append(part.text)
    return "".join(texts)


def _tag(part: Part) -> str:
    return str(part.__struct_config__.tag)


def _contents(messages: tuple[Message, ...]) -> list[dict[str, Any]]:
    names = {p.id: p.name for m in messages for p in m.content if isinstance(p, ToolCall)}
    contents: list[dict[str, Any]] = []
    for message in messages:
        if message.role in ("system", "developer"):
            continue
        role = _ROLES[message.role]
        parts = _parts(message, names)
        if not parts:
            continue
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)  # one turn per role change, as Gemini expects
        else:
            contents.append({"role": role, "parts": parts})
    return contents


def _parts(message: Message, names: dict[str, str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    # A thinking block with a signature and no text is how an Anthropic client holds a call's thought
    # signature (gateway.api.anthropic.encode): it goes back on the part that follows it.
    pending: str | None = None
    for part in message.content:
        if isinstance(part, Thinking) and part.signature and not part.text:
            pending = part.signature
            continue
        size = len(out)
        _add(part, names, out)
        if pending is not None and len(out) > size:
            out[size].setdefault("thoughtSignature", pending)
            pending = None
    if pending is not None:  # nothing followed it: sent as an empty thought, never dropped
        out.append({"text": "", "thought": True, "thoughtSignature": pending})
    return out


def _add(part: Part, names: dict[str, str], out: list[dict[str, Any]]) -> None:
    if isinstance(part, Text):
        if part.text:
            out.append({"text": part.text})
    elif isinstance(part, ToolCall):
        out.append(_function_call(part))
    elif isinstance(part, ToolResult):
        out.append(_function_response(part, names))
    elif isinstance(part, Thinking):
        if part.signature:
            out.append({"text": part.text, "thought": True, "thoughtSignature": part.signature})
        # Unsigned: reasoning another upstream showed, no provider state; left out (as chat_body does).
    elif isinstance(part, Image | Audio | File):
        out.append(_inline(part))
    elif isinstance(part, RedactedThinking):
        raise Untranslatable(
            "A redacted_thinking block cannot be given to this route's upstream (Gemini): its provider "
            "state would be lost. Leave it out or route to the upstream that produced it."
        )
    else:
        raise Untranslatable(f"A '{_tag(part)}' part cannot be given to this route's upstream (Gemini).")


def _function_call(call: ToolCall) -> dict[str, Any]:
    try:
        args = msgspec.json.decode(call.arguments) if call.arguments.strip() else {}
    except msgspec.DecodeError:
        raise Untranslatable(f"The arguments of tool call '{call.id}' are not JSON; Gemini takes an object.") from None
    if not isinstance(args, dict):
        raise Untranslatable(f"The arguments of tool call '{call.id}' are not a JSON object; Gemini takes an object.")
    part: dict[str, Any] = {"functionCall": {"name": call.name, "args": args}}
    if call.signature is not None:
        part["thoughtSignature"] = call.signature
    return part


def _function_response(result: ToolResult, names: dict[str, str]) -> dict[str, Any]:
    name = names.get(result.call_id)
    if name is None:
        raise Untranslatable(
            f"The tool result for call '{result.call_id}' answers no tool call in the conversation; Gemini needs "
            "the function's name, taken from that call."
        )
    texts = []
    for part in result.content:
        if not isinstance(part, Text):
            raise Untranslatable(
                f"The result of tool call '{result.call_id}' holds a '{_tag(part)}' part; the gateway gives Gemini "
                "text tool results only."
            )
        texts.append(part.text)
    text = "\n".join(texts)
    # A JSON object result is the response itself; any other text is wrapped (Gemini's response is an object).
    try:
        decoded = msgspec.json.decode(text)
    except msgspec.DecodeError:
        decoded = None
    response = decoded if isinstance(decoded, dict) else {"error" if result.is_error else "result": text}
    return {"functionResponse": {"name": name, "response": response}}


def _inline(part: Image | Audio | File) -> dict[str, Any]:
    if isinstance(part, Audio):
        return {"inlineData": {"mimeType": f"audio/{part.format}", "data": _base64(part.data)}}
    if isinstance(part, File):
        raise Untranslatable("A file part cannot be given to this route's upstream (Gemini) through the gateway.")
    if part.data is not None:
        return {"inlineData": {"mimeType": part.media_type or "image/png", "data": _base64(part.data)}}
    url = part.url or ""
    if url.startswith("data:") and ";base64," in url:
        head, data = url[5:].split(";base64,", 1)
        return {"inlineData": {"mimeType": head or "image/png", "data": _base64(data)}}
    raise Untranslatable(
        "An image given by URL cannot be sent to this route's upstream (Gemini takes images inline): "
        "send it as a base64 data: URL."
    )


def _base64(data: str) -> str:
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise Untranslatable("An inline image or audio part is not valid base64.") from None
    return data


def _declaration(name: str, description: str | None, parameters: msgspec.Raw | None) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name}
    if description is not None:
        out["description"] = description
    if parameters is not None:
        schema = msgspec.json.decode(parameters)
        # An object without properties (a tool without arguments) is sent without parameters.
        if not (isinstance(schema, dict) and schema.get("type") == "object" and not schema.get("properties")):
            out["parameters"] = _schema(schema, f"tool '{name}'")
    return out


def _schema(schema: Any, where: str) -> dict[str, Any]:
    try:
        return to_gemini(schema, where)
    except SchemaNotExpressible as exc:
        raise Untranslatable(str(exc)) from None


def _generation_config(request: Request) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, key in (
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("top_k", "topK"),
        ("max_output_tokens", "maxOutputTokens"),
        ("seed", "seed"),
        ("presence_penalty", "presencePenalty"),
        ("frequency_penalty", "frequencyPenalty"),
        ("n", "candidateCount"),
    ):
        value = getattr(request, name)
        if value is not None:
            out[key] = value
    if request.stop:
        out["stopSequences"] = list(request.stop)
    fmt = request.response_format
    if fmt is not None and fmt.type != "text":
        if fmt.type not in ("json_object", "json_schema"):
            raise Untranslatable(
                f"The response_format type '{fmt.type}' cannot be given to this route's upstream (Gemini)."
            )
        out["responseMimeType"] = "application/json"
        if fmt.type == "json_schema" and fmt.json_schema is not None:
            spec = msgspec.json.decode(fmt.json_schema)
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if schema is not None:
                out["responseSchema"] = _schema(schema, "response_format")
    thinking = _thinking(request)
    if thinking is not None:
        out["thinkingConfig"] = thinking
    return out


def _thinking(request: Request) -> dict[str, Any] | None:
    config = request.thinking
    if config is not None:
        if not config.enabled:
            return {"thinkingBudget": 0}
        budget = config.budget_tokens
        if budget is None and config.effort is not None:
            budget = _effort_budget(config.effort)
        out: dict[str, Any] = {"includeThoughts": True}
        if budget is not None:
            out["thinkingBudget"] = budget
        return out
    raw = request.extra.get("reasoning_effort")
    if raw is None:
        return None
    effort = msgspec.json.decode(raw)
    if not isinstance(effort, str):
        raise Untranslatable("reasoning_effort must be a string.")
    budget = _effort_budget(effort)
    return {"thinkingBudget": 0} if budget == 0 else {"includeThoughts": True, "thinkingBudget": budget}


def _effort_budget(effort: str) -> int:
    if effort not in EFFORT_BUDGETS:
        raise Untranslatable(
            f"reasoning_effort '{effort}' is not one of {', '.join(EFFORT_BUDGETS)} (this route's upstream is Gemini)."
        )
    return EFFORT_BUDGETS[effort]
