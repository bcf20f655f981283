"""Byte-faithful passthrough: the client's JSON body, edited at the byte level.

When the upstream speaks the client's protocol, what goes up is the client's own bytes with only the
`model` value replaced (and Strait's `strait` member removed, and for streams `stream_options`
forced to ask for usage): unknown fields, key order, whitespace, number spellings (`1.0e2`, `-0.0`) and
unicode escapes survive byte for byte, and nothing is re-encoded.

The codec that decodes a body locates its top-level members once (`locate`, from msgspec's zero-copy
`Raw` view of each value: one regex match per member, C speed) and keeps the spans Strait may edit in an
`Original`; `splice` then builds each attempt's body from them.
"""

from __future__ import annotations

import re

import msgspec

_WS = rb"[ \t\n\r]*"
_KEY = rb'("(?:[^"\\]|\\.)*+")'
_OPEN = re.compile(_WS + rb"\{" + _WS)
_FIRST = re.compile(_KEY + _WS + rb":" + _WS)
_NEXT = re.compile(_WS + rb"," + _WS + _KEY + _WS + rb":" + _WS)
_members = msgspec.json.Decoder(dict[str, msgspec.Raw])
_str = msgspec.json.Decoder(str)
_TRUE = msgspec.Raw(b"true")


class RepeatedField(ValueError):
    """A top-level name appears twice: which value counts would differ between readers, so it is refused."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class Member(msgspec.Struct, frozen=True, array_like=True):
    """One top-level member: where its key starts and where its value starts and ends."""

    key_start: int
    start: int
    end: int


def locate(body: bytes, values: dict[str, msgspec.Raw]) -> dict[str, Member]:
    """Every top-level member of the JSON object `body`, given its values as decoded (`dict[str, Raw]`).

    Each value's bytes are compared with the body where the walk expects them, so a misread position
    cannot go unnoticed; a name that appears twice raises RepeatedField (the decoded mapping kept only
    the last value, the upstream might read the first).
    """
    opened = _OPEN.match(body)
    assert opened is not None  # `values` was decoded from `body`: it is an object
    pos = opened.end()
    view = memoryview(body)
    out: dict[str, Member] = {}
    pattern = _FIRST
    for _ in range(len(values) + 1):
        m = pattern.match(body, pos)
        if m is None:
            break
        quoted = m.group(1)
        name = _str.decode(quoted) if b"\\" in quoted else quoted[1:-1].decode()
        value = values.get(name)
        start = m.end()
        end = start + (len(value) if value is not None else 0)
        if name in out or value is None or view[start:end] != memoryview(value):
            raise RepeatedField(name)
        out[name] = Member(m.start(1), start, end)
        pos = end
        pattern = _NEXT
    if len(out) != len(values):
        raise RepeatedField(next(n for n in values if n not in out))
    return out


class Original(msgspec.Struct, frozen=True, kw_only=True):
    """The client's body and the spans Strait may edit in it."""

    protocol: str  # the codec that read it: "openai"
    body: bytes
    model: tuple[int, int]  # the `model` value
    # The `strait` member with one separator, to cut out (Strait's own preferences: not the upstream's).
    cut: tuple[int, int] | None = None
    stream_options: tuple[int, int] | None = None  # its value
    end: int = 0  # after the last member's value: where a member is added


def original(protocol: str, body: bytes, members: dict[str, Member]) -> Original:
    """The `Original` of a body whose members `locate` found (it must have a `model`)."""
    order = sorted(members.values(), key=lambda m: m.start)
    cut: tuple[int, int] | None = None
    strait = members.get("strait")
    if strait is not None:
        i = order.index(strait)
        if i > 0:  # from the end of the previous value: the comma before it goes too
            cut = (order[i - 1].end, strait.end)
        elif len(order) > 1:  # the first: up to the next key, its comma included
            cut = (strait.key_start, order[1].key_start)
        else:
            cut = (strait.key_start, strait.end)
    model = members["model"]
    options = members.get("stream_options")
    return Original(
        protocol=protocol,
        body=body,
        model=(model.start, model.end),
        cut=cut,
        stream_options=(options.start, options.end) if options is not None else None,
        end=order[-1].end,
    )


def _with_usage(value: bytes) -> bytes | None:
    """`stream_options` asking for usage, or None when it already does."""
    try:
        options = _members.decode(value)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return b'{"include_usage":true}'  # null or not an object: replaced whole
    if bytes(options.get("include_usage", b"")) == b"true":
        return None
    options["include_usage"] = _TRUE
    return msgspec.json.encode(options)


def splice(source: Original, model: str, *, stream_usage: bool = False) -> bytes:
    """The client's body with `model` set, `strait` removed and, with `stream_usage`, usage asked for."""
    body = source.body
    edits: list[tuple[int, int, bytes]] = [(*source.model, msgspec.json.encode(model))]
    if source.cut is not None:
        edits.append((*source.cut, b""))
    if stream_usage:
        if source.stream_options is None:
            edits.append((source.end, source.end, b',"stream_options":{"include_usage":true}'))
        else:
            start, end = source.stream_options
            replaced = _with_usage(body[start:end])
            if replaced is not None:
                edits.append((start, end, replaced))
    edits.sort()
    parts: list[bytes] = []
    pos = 0
    for start, end, text in edits:
        parts.append(body[pos:start])
        parts.append(text)
        pos = end
    parts.append(body[pos:])
    return b"".join(parts)
