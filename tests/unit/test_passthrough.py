"""Byte-faithful passthrough: the splicer replaces `model` (removes `strait`, asks a stream for usage) in
the client's bytes and leaves every other byte as it was, whatever the JSON object's spelling."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.api.decode import decode
from gateway.errors import InvalidRequest
from gateway.passthrough import Original, RepeatedField, _compact, _walk, original_of, splice

_skim = msgspec.json.Decoder(dict[str, msgspec.Raw])

# ---- any JSON object, spelled in any valid way ----

ws = st.sampled_from(["", " ", "\n", "\t", " \r\n  "])
keys = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=8)


def spell_string(draw: st.DrawFn, s: str) -> str:
    """`s` as a JSON string, each character plain or \\u-escaped (surrogate pairs for astral ones)."""
    out = []
    for ch in s:
        if ch in '"\\' or ord(ch) < 0x20 or draw(st.booleans()):
            code = ord(ch)
            if code > 0xFFFF:
                code -= 0x10000
                out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04X}")
            else:
                out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def spell_number(draw: st.DrawFn, n: int | float) -> str:
    if isinstance(n, int):
        return draw(st.sampled_from([str(n), f"{n}.0", f"{n}e0", f"{n}.00E+0"]))
    return draw(st.sampled_from([repr(n), f"{n:.17e}", f"{n:.17G}"]))


@st.composite
def spelled(draw: st.DrawFn, value: Any) -> str:
    if isinstance(value, dict):
        members = [
            f"{draw(ws)}{spell_string(draw, k)}{draw(ws)}:{draw(ws)}{draw(spelled(v))}{draw(ws)}"
            for k, v in value.items()
        ]
        return "{" + ",".join(members) + draw(ws) + "}"
    if isinstance(value, list):
        return "[" + ",".join(f"{draw(ws)}{draw(spelled(v))}{draw(ws)}" for v in value) + draw(ws) + "]"
    if isinstance(value, str):
        return spell_string(draw, value)
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return spell_number(draw, value)


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**6), max_value=10**6)
    | st.floats(allow_nan=False, allow_infinity=False, width=32)
    | st.sampled_from([-0.0, 100.0, 1e-7])
    | keys
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3), max_leaves=12
)


@st.composite
def bodies(draw: st.DrawFn) -> tuple[bytes, dict[str, Any]]:
    """A JSON object with a `model` (and maybe `strait` and `stream_options`), spelled at random."""
    doc: dict[str, Any] = draw(
        st.dictionaries(keys.filter(lambda k: k not in ("model", "strait", "stream_options")), values, max_size=5)
    )
    doc["model"] = draw(keys)
    if draw(st.booleans()):
        doc["strait"] = draw(values)
    if draw(st.booleans()):
        doc["stream_options"] = draw(
            st.none() | st.dictionaries(st.sampled_from(["include_usage", "x"]), st.booleans())
        )
    items = list(doc.items())
    order = draw(st.permutations(range(len(items))))
    ordered = dict(items[i] for i in order)
    text = draw(ws) + draw(spelled(ordered)) + draw(ws)
    return text.encode(), ordered


def _located(body: bytes) -> Original:
    return original_of("openai", body, _skim.decode(body))


@settings(max_examples=400, deadline=None)
@given(case=bodies(), model=keys)
def test_only_the_model_value_changes(case: tuple[bytes, dict[str, Any]], model: str) -> None:
    body, doc = case
    source = _located(body)
    source = msgspec.structs.replace(source, cut=None)  # model only
    out = splice(source, model)
    assert json.loads(out) == {**doc, "model": model}
    start, end = source.model
    new = msgspec.json.encode(model)
    assert out[:start] == body[:start]
    assert out[start : start + len(new)] == new
    assert out[start + len(new) :] == body[end:]


@settings(max_examples=400, deadline=None)
@given(case=bodies(), model=keys, stream=st.booleans())
def test_strait_goes_and_a_stream_asks_for_usage(case: tuple[bytes, dict[str, Any]], model: str, stream: bool) -> None:
    body, doc = case
    out = splice(_located(body), model, stream_usage=stream)
    expected = {k: v for k, v in doc.items() if k != "strait"} | {"model": model}
    if stream:
        options = doc.get("stream_options")
        expected["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    assert json.loads(out) == expected


def test_bytes_survive_exactly_even_odd_ones() -> None:
    body = (
        b'{ "temperature" : 1.0e0,"model":"route-a", "x_unknown": {"n": [1.0e2, -0.0, 1E-7], '
        b'"s": "caf\\u00e9 \\ud83d\\ude00 \\/"},\n"messages":[{"role":"user","content":"hi","extra_part":{"k":null}}],'
        b'"strait": {"objective": "cost"} }'
    )
    source = decode(body, "chat").original
    assert source is not None
    out = splice(source, "upstream-model-1")
    assert out == body.replace(b'"route-a"', b'"upstream-model-1"').replace(b',"strait": {"objective": "cost"}', b"")
    streamed = splice(source, "m", stream_usage=True)
    assert streamed.endswith(b'}],"stream_options":{"include_usage":true} }')


@pytest.mark.parametrize(
    ("body", "name"),
    [
        (b'{"model": "a", "messages": [{"role": "user", "content": "x"}], "model": "b"}', "model"),
        (b'{"model": "a", "messages": [{"role": "user", "content": "x"}], "mod\\u0065l": "a"}', "model"),
        (b'{"n": 12, "model": "a", "messages": [{"role": "user", "content": "x"}], "n": 1}', "n"),
        # The kept (last) value a prefix of the first, nothing after it: the walk stops inside the first.
        (
            b'{"model": "a", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000, "max_tokens": 1}',
            "max_tokens",
        ),
        (b'{"model": "a", "messages": [{"role": "user", "content": "x"}], "n": 12,"n":1}', "n"),
        (
            b'{"model": "a", "messages": [{"role": "user", "content": "x"}], "temperature": 1.5, "temperature": 1}',
            "temperature",
        ),
    ],
)
def test_a_repeated_top_level_field_is_refused(body: bytes, name: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        decode(body, "chat")
    assert info.value.status == 400 and "more than once" in info.value.message
    assert info.value.param == name
    with pytest.raises(RepeatedField):
        original_of("openai", body, _skim.decode(body))


@settings(max_examples=300, deadline=None)
@given(case=bodies(), data=st.data())
def test_any_repeated_top_level_name_is_refused(case: tuple[bytes, dict[str, Any]], data: st.DataObject) -> None:
    """Whatever the two values (a number whose later spelling prefixes the earlier one included) and
    wherever the two stand, the upstream could read the other value: refused."""
    _, doc = case
    name = data.draw(st.sampled_from(sorted(doc)))
    second = data.draw(st.integers(min_value=1, max_value=10**6) | values)
    # (Not 0: a digit after a leading 0 is no JSON number.)
    if isinstance(second, int) and not isinstance(second, bool) and second != 0 and data.draw(st.booleans()):
        first = f"{second}{data.draw(st.integers(min_value=0, max_value=9))}"  # the kept value prefixes it
    else:
        first = json.dumps(data.draw(values))
    members = [(k, json.dumps(v)) for k, v in doc.items() if k != name]
    at = data.draw(st.integers(min_value=0, max_value=len(members)))
    later = data.draw(st.integers(min_value=at, max_value=len(members)))
    members.insert(later, (name, json.dumps(second)))
    members.insert(at, (name, first))
    body = ("{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in members) + "}").encode()
    with pytest.raises(RepeatedField) as info:
        original_of("openai", body, _skim.decode(body))
    assert info.value.name == name


def test_stream_options_that_already_ask_for_usage_stay_unless_a_false_could_hide_in_them() -> None:
    plain = b'{"model":"a","stream_options": {"include_usage": true}}'
    assert splice(original_of("openai", plain, _skim.decode(plain)), "b", stream_usage=True) == plain.replace(
        b'"a"', b'"b"'
    )
    hidden = b'{"model":"a","stream_options": {"include_usage": false, "include_usage": true}}'
    out = splice(original_of("openai", hidden, _skim.decode(hidden)), "b", stream_usage=True)
    assert out == b'{"model":"b","stream_options": {"include_usage":true}}'
    escaped = b'{"model":"a","stream_options": {"include\\u005fusage": false, "include_usage": true}}'
    out = splice(original_of("openai", escaped, _skim.decode(escaped)), "b", stream_usage=True)
    assert out == b'{"model":"b","stream_options": {"include_usage":true}}'


def _walked(body: bytes, top: dict[str, msgspec.Raw]) -> object:
    try:
        return _walk(body, top)
    except RepeatedField as exc:
        return exc


@settings(max_examples=400, deadline=None)
@given(case=bodies(), repeat=st.none() | st.integers(0, 10), compact=st.booleans())
def test_the_compact_reading_finds_what_the_walk_finds(
    case: tuple[bytes, dict[str, Any]], repeat: int | None, compact: bool
) -> None:
    """A compactly spelled body (`{"a":1,"b":2}`) is read without the regex walk: the same spans, and a
    repeated name is never let through (the walk then refuses it)."""
    body, doc = case
    if compact:
        body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    if repeat is not None:
        # A member written twice (its first spelling, or the one before it), compactly or not.
        names = list(doc)
        name = names[repeat % len(names)]
        again = json.dumps({name: doc[names[(repeat + 1) % len(names)]]}, separators=(",", ":"), ensure_ascii=False)
        body = body.rstrip()[:-1] + b"," + again[1:].encode()
    top = _skim.decode(body)
    walked = _walked(body, top)
    read = _compact(body, top)
    if read is not None:
        assert read == walked
    elif compact and repeat is None and all('"' not in k and "\\" not in k and k.isprintable() for k in doc):
        raise AssertionError("a compact body with plain names is read without the walk")
