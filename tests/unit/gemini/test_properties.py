"""Property tests of the gemini adapter's translators (hypothesis): a Gemini answer translated for an
OpenAI client and sent back on the next turn gives Gemini its function calls back exactly (names,
arguments, thought signatures byte for byte), streamed or not, however the stream is split; and JSON
schemas Gemini can express convert to its Schema, those it cannot are refused by keyword."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.api.openai.decode import decode
from gateway.upstream.sse import DONE, SSEDecoder
from plugins.gemini.request import generate_content_body
from plugins.gemini.response import completion
from plugins.gemini.schema import SchemaNotExpressible, to_gemini
from plugins.gemini.stream import StreamTranslator
from plugins.gemini.wire import decode_response

GEMINI_SCHEMA_KEYS = {
    "type", "format", "title", "description", "nullable", "enum", "maxItems", "minItems", "properties", "required",
    "minProperties", "maxProperties", "minLength", "maxLength", "pattern", "example", "anyOf", "propertyOrdering",
    "default", "items", "minimum", "maximum",
}  # fmt: skip

names = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,20}", fullmatch=True)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
signatures = st.text(min_size=1, max_size=80) | st.binary(min_size=1, max_size=60).map(
    lambda b: __import__("base64").b64encode(b).decode()
)
calls = st.fixed_dictionaries(
    {
        "name": names,
        "args": st.dictionaries(st.text(max_size=8), json_values, max_size=4),
        "sig": st.none() | signatures,
    }
)
text_parts = st.text(min_size=1, max_size=40)
parts_strategy = st.lists(
    st.one_of(
        text_parts.map(lambda t: {"text": t}),
        text_parts.map(lambda t: {"text": t, "thought": True}),
        calls.map(
            lambda c: (
                {"functionCall": {"name": c["name"], "args": c["args"]}}
                | ({"thoughtSignature": c["sig"]} if c["sig"] is not None else {})
            )
        ),
    ),
    min_size=1,
    max_size=6,
)


def gemini_answer(parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "candidates": [{"content": {"parts": parts, "role": "model"}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 4, "totalTokenCount": 7},
        "responseId": "r1",
    }


def next_turn(message: dict[str, Any]) -> list[dict[str, Any]]:
    """What an OpenAI client sends back: its message as received (SDKs keep unknown fields), a tool
    result per call; returns the model turn Gemini is given next."""
    history = [{"role": "user", "content": "go"}, {k: v for k, v in message.items() if k != "reasoning_content"}]
    history += [{"role": "tool", "tool_call_id": c["id"], "content": "ok"} for c in message.get("tool_calls") or []]
    request = decode(json.dumps({"model": "r", "messages": history}).encode(), "chat")
    body = json.loads(generate_content_body(request))
    return body["contents"][1]["parts"]  # type: ignore[no-any-return]


def expected_parts(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    text = "".join(p["text"] for p in parts if "text" in p and not p.get("thought"))
    calls = [p for p in parts if "functionCall" in p]
    return ([{"text": text}] if text else []) + calls


@settings(max_examples=150, deadline=None)
@given(parts_strategy)
def test_function_calls_survive_the_round_trip_through_an_openai_client(parts: list[dict[str, Any]]) -> None:
    body = completion(decode_response(json.dumps(gemini_answer(parts)).encode()), "m", "rq")
    message = json.loads(body)["choices"][0]["message"]
    if not any("functionCall" in p for p in parts) and not expected_parts(parts):
        return  # thoughts only: nothing goes back
    assert next_turn(message) == expected_parts(parts)


@settings(max_examples=150, deadline=None)
@given(parts_strategy, st.data())
def test_a_stream_split_anywhere_says_what_the_whole_answer_says(
    parts: list[dict[str, Any]], data: st.DataObject
) -> None:
    whole = json.loads(completion(decode_response(json.dumps(gemini_answer(parts)).encode()), "m", "rq"))["choices"][0]
    # Each part its own event (Gemini streams parts), the finish on the last; the bytes cut at random.
    events = []
    for i, part in enumerate(parts):
        candidate: dict[str, Any] = {"content": {"parts": [part], "role": "model"}, "index": 0}
        if i == len(parts) - 1:
            candidate["finishReason"] = "STOP"
        events.append(b"data: " + json.dumps({"candidates": [candidate], "responseId": "r1"}).encode() + b"\r\n\r\n")
    raw = b"".join(events)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=8)))
    decoder, translator = SSEDecoder(), StreamTranslator("m", "rq")
    chunks: list[bytes] = []
    for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True):
        for event in decoder.feed(raw[a:b]):
            chunks.extend(translator.feed(event))
    chunks.extend(translator.end())
    assert chunks[-1] == DONE
    deltas = [json.loads(c)["choices"] for c in chunks[:-1]]
    deltas = [d[0] for d in deltas if d]
    content = "".join(d["delta"].get("content") or "" for d in deltas)
    reasoning = "".join(d["delta"].get("reasoning_content") or "" for d in deltas)
    streamed_calls = [c for d in deltas for c in d["delta"].get("tool_calls") or []]
    assert content == (whole["message"]["content"] or "")
    assert reasoning == whole["message"].get("reasoning_content", "")
    assert [c["index"] for c in streamed_calls] == list(range(len(streamed_calls)))
    strip = [{k: v for k, v in c.items() if k not in ("id", "index")} for c in streamed_calls]
    assert strip == [{k: v for k, v in c.items() if k != "id"} for c in whole["message"].get("tool_calls", [])]
    assert [d["finish_reason"] for d in deltas][-1] == whole["finish_reason"]


# ---- schemas ----

primitive = st.sampled_from(["string", "integer", "number", "boolean"])


def _schemas() -> st.SearchStrategy[dict[str, Any]]:
    leaf = st.builds(
        lambda t, nullable, desc: {"type": [t, "null"] if nullable else t} | ({"description": desc} if desc else {}),
        primitive,
        st.booleans(),
        st.none() | st.text(max_size=10),
    ) | st.lists(st.text(max_size=5), min_size=1, max_size=4).map(lambda e: {"type": "string", "enum": e})
    return st.recursive(
        leaf,
        lambda inner: (
            st.builds(lambda items: {"type": "array", "items": items}, inner)
            | st.dictionaries(names, inner, min_size=1, max_size=4).flatmap(
                lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
                    lambda req: {"type": "object", "properties": props, "required": req, "additionalProperties": False}
                )
            )
            | st.lists(inner, min_size=2, max_size=3).map(lambda branches: {"anyOf": branches})
        ),
        max_leaves=10,
    )


def _check(source: dict[str, Any], out: dict[str, Any]) -> None:
    assert set(out) <= GEMINI_SCHEMA_KEYS
    if "anyOf" in source:
        assert len(out["anyOf"]) == len(source["anyOf"])
        for s, o in zip(source["anyOf"], out["anyOf"], strict=True):
            _check(s, o)
        return
    kinds = source["type"] if isinstance(source["type"], list) else [source["type"]]
    assert out["type"] == kinds[0].upper()
    assert out.get("nullable", False) == ("null" in kinds)
    if "enum" in source:
        assert out["enum"] == source["enum"] and out["format"] == "enum"
    if "properties" in source:
        assert list(out["properties"]) == list(source["properties"])
        assert out["required"] == source["required"]
        for name, sub in source["properties"].items():
            _check(sub, out["properties"][name])
    if "items" in source:
        _check(source["items"], out["items"])


@settings(max_examples=200, deadline=None)
@given(_schemas())
def test_expressible_schemas_convert_faithfully(schema: dict[str, Any]) -> None:
    _check(schema, to_gemini(schema, "tool 't'"))


REFUSED = ["allOf", "not", "if", "patternProperties", "prefixItems", "multipleOf", "exclusiveMinimum", "uniqueItems"]


@settings(max_examples=100, deadline=None)
@given(_schemas(), st.sampled_from(REFUSED), st.data())
def test_keywords_gemini_lacks_are_refused_wherever_they_stand(
    schema: dict[str, Any], keyword: str, data: st.DataObject
) -> None:
    # Plant the keyword in a random sub-schema.
    spots: list[dict[str, Any]] = []

    def walk(s: dict[str, Any]) -> None:
        spots.append(s)
        for sub in (s.get("properties") or {}).values():
            walk(sub)
        if "items" in s:
            walk(s["items"])
        for sub in s.get("anyOf") or []:
            walk(sub)

    walk(schema)
    data.draw(st.sampled_from(spots))[keyword] = 1
    with pytest.raises(SchemaNotExpressible, match=keyword):
        to_gemini(schema, "tool 't'")


def test_refs_are_inlined_and_recursion_refused() -> None:
    schema = {
        "type": "object",
        "properties": {"home": {"$ref": "#/$defs/Place"}, "work": {"$ref": "#/$defs/Place", "description": "office"}},
        "$defs": {"Place": {"type": "object", "properties": {"city": {"type": "string"}}}},
    }
    out = to_gemini(schema, "t")
    assert out["properties"]["home"] == {"type": "OBJECT", "properties": {"city": {"type": "STRING"}}}
    assert out["properties"]["work"]["description"] == "office"
    loop = {
        "$ref": "#/$defs/Node",
        "$defs": {"Node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/Node"}}}},
    }
    with pytest.raises(SchemaNotExpressible, match="recursive"):
        to_gemini(loop, "t")
    with pytest.raises(SchemaNotExpressible, match="additionalProperties"):
        to_gemini({"type": "object", "additionalProperties": {"type": "string"}}, "t")
    with pytest.raises(SchemaNotExpressible, match="not strings"):
        to_gemini({"type": "integer", "enum": [1, 2]}, "t")
