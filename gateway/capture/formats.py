"""Fine-tuning file lines from captured conversations: one JSON object per line (gateway.capture.export).

- `openai-chat-jsonl`: OpenAI's chat fine-tuning shape, `{"messages": [...], "tools": [...]}`: roles
  system, user, assistant, tool; an assistant turn's `tool_calls` as `[{"id", "type": "function",
  "function": {"name", "arguments"}}]` (arguments JSON text), a tool turn's `tool_call_id`; `tools` as
  `[{"type": "function", "function": {"name", "description", "parameters"}}]`, only when there are any.
  The last message is the assistant's answer (or its correction).
- `anthropic-jsonl`: the Messages API shape, `{"system": "...", "messages": [...], "tools": [...]}`:
  `system` joined from the system turns, content as blocks (`text`, `tool_use` with `input` an object,
  `tool_result` in a user turn), consecutive turns of one role merged so user and assistant alternate,
  starting with user (a conversation that cannot is left out: `Unencodable`).
- `preference-jsonl`: OpenAI's preference (DPO) shape, `{"input": {"messages": [...], "tools": [...]},
  "preferred_output": [assistant message], "non_preferred_output": [assistant message]}`.

A `developer` turn is written as `system` (fine-tuning files know no `developer` role).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from gateway.capture.records import CapturedMessage, CapturedTool, CapturedToolCall

Format = Literal["openai-chat-jsonl", "anthropic-jsonl", "preference-jsonl"]
FORMATS: tuple[Format, ...] = ("openai-chat-jsonl", "anthropic-jsonl", "preference-jsonl")
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


class Unencodable(ValueError):
    """A conversation the format cannot hold; its message is the exclusion reason."""


class Answer(msgspec.Struct, frozen=True, kw_only=True):
    """The assistant turn a line ends with: the model's answer or a person's correction of it."""

    content: str | None = None
    tool_calls: tuple[CapturedToolCall, ...] = ()


def _json(text: str | None) -> Any:
    if not text:
        return None
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError:
        return None


def _openai_call(c: CapturedToolCall) -> dict[str, Any]:
    return {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments or "{}"}}


def _openai_message(m: CapturedMessage) -> dict[str, Any] | None:
    role = _ROLES.get(m.role)
    if role is None:
        return None
    out: dict[str, Any] = {"role": role}
    if m.content is not None or not m.tool_calls:
        out["content"] = m.content or ""
    if role == "assistant" and m.tool_calls:
        out["tool_calls"] = [_openai_call(c) for c in m.tool_calls]
    if role == "tool":
        out["tool_call_id"] = m.tool_call_id or ""
    return out


def _openai_answer(a: Answer) -> dict[str, Any]:
    out: dict[str, Any] = {"role": "assistant"}
    if a.content is not None or not a.tool_calls:
        out["content"] = a.content or ""
    if a.tool_calls:
        out["tool_calls"] = [_openai_call(c) for c in a.tool_calls]
    return out


def _openai_tools(tools: tuple[CapturedTool, ...]) -> list[dict[str, Any]]:
    out = []
    for t in tools:
        function: dict[str, Any] = {"name": t.name}
        if t.description:
            function["description"] = t.description
        parameters = _json(t.parameters)
        if isinstance(parameters, dict):
            function["parameters"] = parameters
        out.append({"type": "function", "function": function})
    return out


def _openai_messages(messages: tuple[CapturedMessage, ...]) -> list[dict[str, Any]]:
    return [m for m in map(_openai_message, messages) if m is not None]


def openai_chat(
    messages: tuple[CapturedMessage, ...], tools: tuple[CapturedTool, ...], answer: Answer
) -> dict[str, Any]:
    line: dict[str, Any] = {"messages": [*_openai_messages(messages), _openai_answer(answer)]}
    if tools:
        line["tools"] = _openai_tools(tools)
    return line


def preference(
    messages: tuple[CapturedMessage, ...], tools: tuple[CapturedTool, ...], chosen: Answer, rejected: Answer
) -> dict[str, Any]:
    given: dict[str, Any] = {"messages": _openai_messages(messages)}
    if tools:
        given["tools"] = _openai_tools(tools)
    return {
        "input": given,
        "preferred_output": [_openai_answer(chosen)],
        "non_preferred_output": [_openai_answer(rejected)],
    }


def _tool_use(c: CapturedToolCall) -> dict[str, Any]:
    arguments = _json(c.arguments) if c.arguments else {}
    if not isinstance(arguments, dict):
        raise Unencodable("tool_arguments_not_object")
    return {"type": "tool_use", "id": c.id, "name": c.name, "input": arguments}


def anthropic(messages: tuple[CapturedMessage, ...], tools: tuple[CapturedTool, ...], answer: Answer) -> dict[str, Any]:
    system: list[str] = []
    turns: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:
            return
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})

    def text(content: str | None) -> list[dict[str, Any]]:
        return [{"type": "text", "text": content}] if content else []

    for m in messages:
        role = _ROLES.get(m.role)
        if role == "system":
            if m.content:
                system.append(m.content)
        elif role == "user":
            add("user", text(m.content))
        elif role == "assistant":
            add("assistant", text(m.content) + [_tool_use(c) for c in m.tool_calls])
        elif role == "tool":
            add("user", [{"type": "tool_result", "tool_use_id": m.tool_call_id or "", "content": m.content or ""}])
    add("assistant", text(answer.content) + [_tool_use(c) for c in answer.tool_calls])
    if not turns or turns[0]["role"] != "user" or turns[-1]["role"] != "assistant":
        raise Unencodable("not_user_first")
    line: dict[str, Any] = {"messages": turns}
    if system:
        line["system"] = "\n\n".join(system)
    if tools:
        line["tools"] = [
            {
                "name": t.name,
                **({"description": t.description} if t.description else {}),
                "input_schema": p if isinstance(p := _json(t.parameters), dict) else {"type": "object"},
            }
            for t in tools
        ]
    return line
