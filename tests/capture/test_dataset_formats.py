"""The export's line formats, property-tested: any captured conversation (system/developer turns, tool calls
and their results, a text or tool-call answer) becomes a line of the documented shape: OpenAI's chat
fine-tuning format (roles, tool_calls, tool_call_id, tools), Anthropic's Messages shape (alternating turns
starting with user, text / tool_use / tool_result blocks), OpenAI's preference (DPO) format; every line a
JSON round trip, and no text lost or reordered. Also the CLI's dates."""

from __future__ import annotations

import datetime as dt
import itertools
import json
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.capture.datasets_cli import parse_date
from gateway.capture.formats import Answer, Unencodable, anthropic, openai_chat, preference
from gateway.capture.records import CapturedMessage, CapturedTool, CapturedToolCall

text = st.text(min_size=1, max_size=30)
names = st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True)
json_args = st.dictionaries(names, st.one_of(st.integers(), text, st.booleans()), max_size=3).map(
    lambda d: json.dumps(d)
)
calls = st.lists(
    st.builds(CapturedToolCall, id=st.from_regex(r"call_[a-z0-9]{4}", fullmatch=True), name=names, arguments=json_args),
    min_size=1,
    max_size=2,
)
tools = st.lists(
    st.builds(
        CapturedTool,
        name=names,
        description=st.one_of(st.none(), text),
        parameters=st.sampled_from([None, '{"type": "object", "properties": {}}']),
    ),
    max_size=2,
).map(tuple)


@st.composite
def conversations(draw: st.DrawFn) -> tuple[CapturedMessage, ...]:
    out: list[CapturedMessage] = []
    if draw(st.booleans()):
        out.append(CapturedMessage(role=draw(st.sampled_from(["system", "developer"])), content=draw(text)))
    for _ in range(draw(st.integers(0, 3))):
        out.append(CapturedMessage(role="user", content=draw(text)))
        if draw(st.booleans()):
            made = draw(calls)
            out.append(
                CapturedMessage(role="assistant", content=draw(st.one_of(st.none(), text)), tool_calls=tuple(made))
            )
            out += [CapturedMessage(role="tool", tool_call_id=c.id, content=draw(text)) for c in made]
            out.append(CapturedMessage(role="assistant", content=draw(text)))
        else:
            out.append(CapturedMessage(role="assistant", content=draw(text)))
    out.append(CapturedMessage(role="user", content=draw(text)))
    return tuple(out)


answers = st.one_of(st.builds(Answer, content=text), calls.map(lambda c: Answer(tool_calls=tuple(c))))


def round_trip(line: dict[str, Any]) -> None:
    assert json.loads(msgspec.json.encode(line)) == line


def check_openai_message(m: dict[str, Any], called: set[str]) -> None:
    assert set(m) <= {"role", "content", "tool_calls", "tool_call_id"}
    assert m["role"] in {"system", "user", "assistant", "tool"}
    if m["role"] == "assistant" and "tool_calls" in m:
        for call in m["tool_calls"]:
            assert set(call) == {"id", "type", "function"} and call["type"] == "function"
            assert set(call["function"]) == {"name", "arguments"}
            assert isinstance(call["function"]["name"], str) and call["function"]["name"]
            assert isinstance(json.loads(call["function"]["arguments"]), dict)
            called.add(call["id"])
        assert isinstance(m.get("content", ""), str)
    else:
        assert isinstance(m["content"], str)
    if m["role"] == "tool":
        assert m["tool_call_id"] in called  # answers a call made earlier in the conversation


def check_openai_tools(line: dict[str, Any]) -> None:
    for t in line.get("tools", []):
        assert t["type"] == "function" and set(t) == {"type", "function"}
        assert set(t["function"]) <= {"name", "description", "parameters"} and t["function"]["name"]
        assert isinstance(t["function"].get("parameters", {}), dict)


def texts(messages: tuple[CapturedMessage, ...]) -> list[str]:
    return [m.content for m in messages if m.content]


@settings(max_examples=150, deadline=None)
@given(conversations(), tools, answers)
def test_openai_chat_lines_have_the_fine_tuning_shape(
    messages: tuple[CapturedMessage, ...], given_tools: tuple[CapturedTool, ...], answer: Answer
) -> None:
    line = openai_chat(messages, given_tools, answer)
    round_trip(line)
    assert set(line) <= {"messages", "tools"}
    called: set[str] = set()
    for m in line["messages"]:
        check_openai_message(m, called)
    check_openai_tools(line)
    assert line["messages"][-1]["role"] == "assistant"
    assert bool(line.get("tools")) == bool(given_tools)
    # Nothing lost or reordered: every text, then the answer's.
    got = [m["content"] for m in line["messages"] if m.get("content")]
    assert got == texts(messages) + ([answer.content] if answer.content else [])
    assert [m["role"] for m in line["messages"][:-1]] == [
        "system" if m.role == "developer" else m.role for m in messages
    ]


@settings(max_examples=150, deadline=None)
@given(conversations(), tools, answers, answers)
def test_preference_lines_have_the_dpo_shape(
    messages: tuple[CapturedMessage, ...], given_tools: tuple[CapturedTool, ...], chosen: Answer, rejected: Answer
) -> None:
    line = preference(messages, given_tools, chosen, rejected)
    round_trip(line)
    assert set(line) == {"input", "preferred_output", "non_preferred_output"}
    assert set(line["input"]) <= {"messages", "tools"}
    called: set[str] = set()
    for m in line["input"]["messages"]:
        check_openai_message(m, called)
    check_openai_tools(line["input"])
    assert line["input"]["messages"][-1]["role"] == "user"
    for side, want in (("preferred_output", chosen), ("non_preferred_output", rejected)):
        (out,) = line[side]
        assert out["role"] == "assistant"
        check_openai_message(out, set())
        assert out.get("content") == want.content
        assert len(out.get("tool_calls", [])) == len(want.tool_calls)


@settings(max_examples=150, deadline=None)
@given(conversations(), tools, answers)
def test_anthropic_lines_alternate_and_hold_every_block(
    messages: tuple[CapturedMessage, ...], given_tools: tuple[CapturedTool, ...], answer: Answer
) -> None:
    line = anthropic(messages, given_tools, answer)
    round_trip(line)
    assert set(line) <= {"system", "messages", "tools"}
    turns = line["messages"]
    assert turns[0]["role"] == "user" and turns[-1]["role"] == "assistant"
    assert all(a["role"] != b["role"] for a, b in itertools.pairwise(turns))
    used: set[str] = set()
    for turn in turns:
        for block in turn["content"]:
            kind = block["type"]
            if kind == "text":
                assert isinstance(block["text"], str) and block["text"]
            elif kind == "tool_use":
                assert turn["role"] == "assistant" and isinstance(block["input"], dict) and block["name"]
                used.add(block["id"])
            else:
                assert kind == "tool_result" and turn["role"] == "user" and block["tool_use_id"] in used
    system = [m.content for m in messages if m.role in ("system", "developer") and m.content]
    assert line.get("system") == ("\n\n".join(system) if system else None)
    for t in line.get("tools", []):
        assert set(t) <= {"name", "description", "input_schema"} and isinstance(t["input_schema"], dict)


def test_anthropic_refuses_tool_arguments_that_are_not_an_object() -> None:
    call = CapturedToolCall(id="c1", name="f", arguments="[1, 2]")
    with pytest.raises(Unencodable, match="tool_arguments_not_object"):
        anthropic((CapturedMessage(role="user", content="hi"),), (), Answer(tool_calls=(call,)))
    with pytest.raises(Unencodable, match="not_user_first"):
        anthropic((CapturedMessage(role="assistant", content="hi"),), (), Answer(content="x"))


@given(st.dates(min_value=dt.date(1971, 1, 1), max_value=dt.date(9998, 12, 31)))
def test_a_date_is_utc_midnight_and_until_is_inclusive(day: dt.date) -> None:
    midnight = int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp() * 1000)
    assert parse_date(day.isoformat()) == midnight
    assert parse_date(day.isoformat(), end=True) == midnight + 86_400_000
    assert parse_date(f"{day.isoformat()}T00:00:00Z") == midnight
    assert parse_date(f"{day.isoformat()}T01:00:00+01:00") == midnight


@pytest.mark.parametrize("bad", ["", "yesterday", "2026-13-01", "2026-12-07T25:00"])
def test_a_bad_date_is_refused(bad: str) -> None:
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        parse_date(bad)
