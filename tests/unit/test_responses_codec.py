"""The Responses codec in process: decoding (bounds, refusals), the translation to a chat body and back
(hypothesis round trips over generated conversations: Responses items -> canonical -> chat body -> the
OpenAI codec's canonical again), and the answer's encoding whole and streamed in arbitrary pieces, each
checked against the `openai` SDK's own pydantic types (validated, not just constructed) and its stream
accumulator."""

from __future__ import annotations

import itertools
import json
from typing import Any

import msgspec
import openai
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent

from gateway.api.inbound import InboundLimits
from gateway.api.openai.decode import decode
from gateway.api.responses.decode import Exchange, build, parse
from gateway.api.responses.encode import responses_object
from gateway.api.responses.sse_encode import ResponsesStream
from gateway.canonical import Message, Part, Reasoning, Request, Text, ToolCall
from gateway.context import RequestContext
from gateway.contracts import End
from gateway.errors import ErrorBody, InvalidRequest
from gateway.tokens import PromptTokens
from gateway.upstream.chat_body import Untranslatable, chat_body

_events = pydantic.TypeAdapter(ResponseStreamEvent)
TOOL = {"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}


def body(**fields: Any) -> bytes:
    return json.dumps({"model": "m", **fields}).encode()


def translate(raw: bytes, previous: list[msgspec.Raw] | None = None) -> tuple[Request, Exchange, dict[str, Any]]:
    wire, top = parse(raw)
    request, exchange = build(wire, top, previous)
    sent: dict[str, Any] = json.loads(chat_body(request, "up", stream=request.stream))
    return request, exchange, sent


# ---- decoding ----


def test_a_full_request_translates_to_a_chat_body() -> None:
    request, exchange, sent = translate(
        body(
            instructions="Be brief.",
            input=[
                {"role": "user", "content": "hi"},
                {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "thought"}]},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hello"}]},
                {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": '{"q":"x"}'},
                {"type": "function_call_output", "call_id": "c1", "output": "found"},
            ],
            tools=[TOOL],
            tool_choice="required",
            parallel_tool_calls=False,
            text={"format": {"type": "json_schema", "name": "out", "schema": {"type": "object"}, "strict": True}},
            reasoning={"effort": "high"},
            max_output_tokens=100,
            temperature=0.5,
            top_p=0.9,
            user="u-1",
            metadata={"k": "v"},
            stream=True,
            store=False,
            include=["reasoning.encrypted_content"],  # tolerated
        )
    )
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": "hello",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"q":"x"}'}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "found"},
    ]
    assert sent["tools"] == [{"type": "function", "function": {"name": "lookup", "parameters": TOOL["parameters"]}}]
    assert (sent["tool_choice"], sent["parallel_tool_calls"]) == ("required", False)
    assert sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "out", "schema": {"type": "object"}, "strict": True},
    }
    assert (sent["reasoning_effort"], sent["max_tokens"], sent["temperature"], sent["top_p"]) == ("high", 100, 0.5, 0.9)
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert request.output_tokens_field == "max_output_tokens" and request.include_usage
    assert request.metadata == {"k": "v"} and request.user == "u-1"
    assert exchange.store is False and len(exchange.input_items) == 5


def test_a_string_input_is_one_user_message_item() -> None:
    _, exchange, sent = translate(body(input="hello"))
    assert sent["messages"] == [{"role": "user", "content": "hello"}]
    assert json.loads(bytes(exchange.input_items[0])) == {
        "type": "message",
        "role": "user",
        "content": [{"type": "input_text", "text": "hello"}],
    }
    assert exchange.store is True  # OpenAI's default


def test_previous_items_come_first() -> None:
    previous = [msgspec.Raw(json.dumps({"role": "user", "content": "first"}).encode())]
    _, exchange, sent = translate(body(input="second", previous_response_id="resp_x"), previous)
    assert [m["content"] for m in sent["messages"]] == ["first", "second"]
    assert len(exchange.input_items) == 2 and exchange.echo["previous_response_id"] == "resp_x"


def test_allowed_tools_narrow_the_tools_on_offer() -> None:
    other = {**TOOL, "name": "other"}
    _, _, sent = translate(
        body(
            input="x",
            tools=[TOOL, other],
            tool_choice={"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "other"}]},
        )
    )
    assert [t["function"]["name"] for t in sent["tools"]] == ["other"] and sent["tool_choice"] == "required"


def test_an_image_and_a_data_url() -> None:
    parts = [
        {"type": "input_text", "text": "what is it?"},
        {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"},
    ]
    _, _, sent = translate(body(input=[{"role": "user", "content": parts}]))
    assert sent["messages"][0]["content"][1] == {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"},
    }


def test_encrypted_reasoning_is_refused_by_a_chat_translation_not_dropped() -> None:
    wire, top = parse(body(input=[{"type": "reasoning", "summary": [], "encrypted_content": "opaque"}]))
    request, _ = build(wire, top)
    (part,) = request.messages[0].content
    assert part == Reasoning(summary=(), encrypted_content="opaque")  # kept opaque in the canonical form
    with pytest.raises(Untranslatable, match="encrypted"):
        chat_body(request, "up", stream=False)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"input": 5}, "input"),
        ({}, "input"),
        ({"input": []}, "input"),
        ({"input": [{"role": "user"}]}, "input[0].content"),
        ({"input": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "input[0].content[0].type"),
        ({"input": ["x"]}, "input[0]"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
        ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, "input[0].type"),
        ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input[0].content[0].type",
        ),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]}, None),
        ({"input": "x", "tools": [{"type": "code_interpreter", "container": "auto"}]}, "tools[0].type"),
        ({"input": "x", "tools": [{"type": "function", "name": "f", "parameters": [1]}]}, "tools[0].parameters"),
        ({"input": "x", "tool_choice": "sometimes"}, "tool_choice"),
        ({"input": "x", "tool_choice": {"type": "function"}}, "tool_choice.name"),
        ({"input": "x", "max_output_tokens": 2_000_000}, "max_output_tokens"),
        ({"input": "x", "top_p": 1.5}, "top_p"),
        ({"input": "x", "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"input": "x", "metadata": {"k": "v" * 513}}, None),
        ({"input": "x", "conversation": "conv_1"}, "conversation"),
        ({"input": "x", "prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"input": "x", "text": {"format": {"type": "json_schema", "schema": [1]}}}, "text.format.schema"),
        ({"input": "x", "previous_response_id": "r" * 600}, "previous_response_id"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(fields: dict[str, Any], param: str | None) -> None:
    with pytest.raises(InvalidRequest) as caught:
        translate(body(**fields))
    assert caught.value.status == 400
    if param is not None:
        assert caught.value.param == param, caught.value.message


def test_the_inbound_bounds_of_the_openai_codec_apply() -> None:
    deep: Any = "x"
    for _ in range(70):
        deep = [deep]
    with pytest.raises(InvalidRequest, match="deeper"):
        parse(body(input=deep))
    with pytest.raises(InvalidRequest, match="max_output_tokens"):
        parse(body(input="x", max_output_tokens=50), InboundLimits(max_output_tokens=10))


# ---- round trips: Responses items -> canonical -> chat body -> canonical ----

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
_ids = st.text("abcdefghijklmnopqrstuvwxyz0123456789_", min_size=1, max_size=12)
_arguments = st.dictionaries(st.sampled_from(["q", "city", "n"]), st.integers() | _text, max_size=3).map(json.dumps)


@st.composite
def _user_item(draw: st.DrawFn) -> dict[str, Any]:
    role = draw(st.sampled_from(["user", "system", "developer"]))
    if draw(st.booleans()):
        return {"role": role, "content": draw(_text)}
    parts = draw(st.lists(_text.map(lambda t: {"type": "input_text", "text": t}), min_size=1, max_size=3))
    return {"type": "message", "role": role, "content": parts}


@st.composite
def _assistant_turn(draw: st.DrawFn) -> list[dict[str, Any]]:
    """What an earlier response's output looks like sent back: reasoning?, message?, calls, their outputs."""
    items: list[dict[str, Any]] = []
    if draw(st.booleans()):
        items.append({"type": "reasoning", "id": "rs_" + draw(_ids), "summary": []})
    if draw(st.booleans()):
        text = draw(_text)
        items.append({"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]})
    calls = draw(st.lists(st.tuples(_ids, _ids, _arguments), max_size=3, unique_by=lambda c: c[0]))
    items += [{"type": "function_call", "call_id": c, "name": n, "arguments": a} for c, n, a in calls]
    items += [{"type": "function_call_output", "call_id": c, "output": draw(_text)} for c, _, _ in calls]
    return items


_conversation = (
    st.lists(st.one_of(_user_item().map(lambda i: [i]), _assistant_turn()), min_size=1, max_size=6)
    .map(lambda turns: [item for turn in turns for item in turn])
    .filter(bool)
)


def _through_chat(m: Message) -> Message | None:
    """What a canonical message becomes through a chat body and the OpenAI codec: reasoning without
    provider state left out, an all-text content joined into one text, tool calls after it."""
    if m.role == "tool":
        return m
    parts = [p for p in m.content if not (isinstance(p, Reasoning) and not p.encrypted_content)]
    if m.content and not parts:
        return None
    calls: list[Part] = [p for p in parts if isinstance(p, ToolCall)]
    rest = [p for p in parts if not isinstance(p, ToolCall)]
    text = "".join(p.text for p in rest if isinstance(p, Text))
    joined: list[Part] = [Text(text=text)] if text or not calls else []
    return Message(role=m.role, content=tuple(joined + calls))


@settings(max_examples=150, deadline=None)
@given(items=_conversation, instructions=st.none() | _text.filter(bool))
def test_a_conversation_round_trips_through_a_chat_body(items: list[dict[str, Any]], instructions: str | None) -> None:
    request, exchange, sent = translate(body(input=items, instructions=instructions))
    if not sent["messages"]:  # reasoning alone: nothing a chat upstream can be given
        assert all(i["type"] == "reasoning" for i in items) and not instructions
        return
    back = decode(json.dumps(sent).encode(), "chat")
    expected = [m for m in map(_through_chat, request.messages) if m is not None]
    assert list(back.messages) == expected
    # Nothing lost on the way: every call and every output, in order, with the client's exact JSON text.
    calls = [(i["call_id"], i["name"], i["arguments"]) for i in items if i.get("type") == "function_call"]
    sent_calls = [
        (c["id"], c["function"]["name"], c["function"]["arguments"])
        for m in sent["messages"]
        for c in m.get("tool_calls", ())
    ]
    assert sent_calls == calls
    outputs = [(i["call_id"], i["output"]) for i in items if i.get("type") == "function_call_output"]
    assert [(m["tool_call_id"], m["content"]) for m in sent["messages"] if m["role"] == "tool"] == outputs
    roles = {"user": "user", "system": "system", "developer": "system"}
    users = [roles[i["role"]] for i in items if i.get("role") in roles]
    assert [m["role"] for m in sent["messages"] if m["role"] in ("user", "system")][bool(instructions) :] == users
    assert [json.loads(bytes(i)) for i in exchange.input_items] == items


# ---- the answer, whole ----


def _exchange(**fields: Any) -> Exchange:
    wire, top = parse(body(input="hi", **fields))
    return build(wire, top)[1]


def _completion(content: str | None, reasoning: str | None, calls: list[tuple[str, str, str]], finish: str) -> bytes:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = [
            {"id": c, "type": "function", "function": {"name": n, "arguments": a}} for c, n, a in calls
        ]
    usage = {
        "prompt_tokens": 11,
        "completion_tokens": 7,
        "total_tokens": 18,
        "prompt_tokens_details": {"cached_tokens": 3},
        "completion_tokens_details": {"reasoning_tokens": 2},
    }
    choice = {"index": 0, "message": message, "finish_reason": finish}
    return json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "choices": [choice], "usage": usage}).encode()


def _validated(completion: bytes) -> Response:
    """The response object for `completion`, as its JSON, validated by the SDK's pydantic model."""
    response = responses_object(completion, _exchange(tools=[TOOL]), "req_1")
    return Response.model_validate_json(msgspec.json.encode(response))


_answers = st.tuples(
    st.none() | _text.filter(bool),
    st.none() | _text.filter(bool),
    st.lists(st.tuples(_ids, _ids, _arguments), max_size=3, unique_by=lambda c: c[0]),
    st.sampled_from(["stop", "length", "tool_calls", "content_filter"]),
)


@settings(max_examples=100, deadline=None)
@given(answer=_answers)
def test_a_completion_is_a_response_the_sdk_validates(answer: tuple[Any, ...]) -> None:
    content, reasoning, calls, finish = answer
    response = _validated(_completion(content, reasoning, calls, finish))
    assert response.id == "resp_req_1" and response.output_text == (content or "")
    assert [(c.call_id, c.name, c.arguments) for c in response.output if c.type == "function_call"] == calls
    reasoning_items = [i for i in response.output if i.type == "reasoning"]
    assert [i.content[0].text for i in reasoning_items if i.content] == ([reasoning] if reasoning else [])
    assert response.status == ("incomplete" if finish in ("length", "content_filter") else "completed")
    usage = response.usage
    assert usage is not None and (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (11, 7, 18)
    assert usage.input_tokens_details.cached_tokens == 3 and usage.output_tokens_details.reasoning_tokens == 2


# ---- the answer, streamed ----


def _ctx() -> RequestContext:
    ctx = RequestContext(request_id="req_1", operation="chat", started=0.0, headers={})
    ctx.prompt_tokens = PromptTokens.of(11)
    return ctx


def _chunks(
    content: str | None, reasoning: str | None, calls: list[tuple[str, str, str]], finish: str, cuts: list[int]
) -> list[bytes]:
    """A chat stream of the answer, its texts split at `cuts` (as an engine's tokens would split them)."""

    def pieces(text: str) -> list[str]:
        points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
        return [text[a:b] for a, b in itertools.pairwise(points) if b > a]

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [choice]}).encode()

    out = [chunk({"role": "assistant"})]
    out += [chunk({"reasoning_content": p}) for p in pieces(reasoning or "")]
    out += [chunk({"content": p}) for p in pieces(content or "")]
    for i, (cid, name, arguments) in enumerate(calls):
        out.append(
            chunk(
                {
                    "tool_calls": [
                        {"index": i, "id": cid, "type": "function", "function": {"name": name, "arguments": ""}}
                    ]
                }
            )
        )
        out += [chunk({"tool_calls": [{"index": i, "function": {"arguments": p}}]}) for p in pieces(arguments)]
    out.append(chunk({}, finish))
    usage = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
    out.append(
        json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [], "usage": usage}).encode()
    )
    return out


def _parse(raw: bytes) -> list[Any]:
    """The SSE bytes as the SDK's validated event objects, each `event:` line matching its data's type."""
    events = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        name, data = block.split("\n")
        payload = json.loads(data.removeprefix("data: "))
        assert name == "event: " + payload["type"]
        events.append(_events.validate_python(payload) if payload["type"] != "error" else payload)
    return events


@settings(max_examples=40, deadline=None)
@given(answer=_answers, cuts=st.lists(st.integers(0, 40), max_size=6), split=st.integers(1, 5))
def test_a_stream_in_any_pieces_is_events_the_sdk_accumulates(
    answer: tuple[Any, ...], cuts: list[int], split: int
) -> None:
    content, reasoning, calls, finish = answer
    chunks = _chunks(content, reasoning, calls, finish, cuts)
    saved: list[dict[str, Any]] = []

    async def save(response: dict[str, Any]) -> None:
        saved.append(response)

    stream = ResponsesStream(_ctx(), _exchange(tools=[TOOL]), save)
    raw = b"".join(stream.batch(chunks[i : i + split]) for i in range(0, len(chunks), split))
    raw += stream.end(_ctx(), End(outcome="completed", status=200))
    events = _parse(raw)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=openai.omit, text_format=openai.omit)
    for event in events:
        state.handle_event(event)
    final = events[-1].response
    assert events[-1].type == (
        "response.incomplete" if finish in ("length", "content_filter") else "response.completed"
    )
    whole = _validated(_completion(content, reasoning, calls, finish))
    # The same output as the whole answer's, item for item (ids, texts, calls, statuses).
    assert final.model_dump()["output"] == whole.model_dump()["output"]
    assert final.output_text == (content or "")
    assert stream.final is not None and stream.final["id"] == "resp_req_1"


async def test_settle_stores_the_final_response_only_when_complete() -> None:
    saved: list[dict[str, Any]] = []

    async def save(response: dict[str, Any]) -> None:
        saved.append(response)

    chunks = _chunks("hello", None, [], "stop", [2])
    broken = ResponsesStream(_ctx(), _exchange(), save)
    broken.batch(chunks[:2])  # the role chunk and "he"
    error = ErrorBody(message="upstream broke", type="upstream_error", code="upstream_error")
    tail = _parse(broken.end(_ctx(), End(outcome="upstream_failed", status=502, error=error)))
    await broken.settle(_ctx())
    assert saved == []
    failed, last = tail
    assert failed.type == "response.failed" and failed.response.error.message == "upstream broke"
    assert [i.status for i in failed.response.output] == ["incomplete"] and failed.response.output_text == "he"
    # The SDK raises on an event whose data has an `error` object (OpenAI's own fields beside it).
    assert last["type"] == "error" and last["error"]["message"] == "upstream broke" and last["code"] == "upstream_error"
    whole = ResponsesStream(_ctx(), _exchange(), save)
    whole.batch(chunks)
    whole.end(_ctx(), End(outcome="completed", status=200))
    await whole.settle(_ctx())
    assert [r["output"][0]["content"][0]["text"] for r in saved] == ["hello"]
