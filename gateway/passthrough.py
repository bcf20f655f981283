"""Byte-faithful passthrough: the client's JSON body, edited at the byte level.

When the upstream speaks the client's protocol, what goes up is the client's own bytes with only the
`model` value replaced (and Strait's `strait` member removed, and for streams `stream_options`
forced to ask for usage): unknown fields, key order, whitespace, number spellings (`1.0e2`, `-0.0`) and
unicode escapes survive byte for byte, and nothing is re-encoded.

The codec that decodes a body walks its top-level members once (`original_of`, from msgspec's zero-copy
`Raw` view of each value: one regex match and one memcmp per member) and keeps the spans Strait may edit
in an `Original`; `splice` then builds each attempt's body from them.
"""

from __future__ import annotations

import re

import msgspec

_WS = rb"[ \t\n\r]*"
_KEY = rb'"([^"\\]*+(?:\\.[^"\\]*+)*+)"'  # group 1: the key's text, escapes undecoded
_OPEN = re.compile(_WS + rb"\{" + _WS)
_FIRST = re.compile(_KEY + _WS + rb":" + _WS)
_NEXT = re.compile(_WS + rb"," + _WS + _KEY + _WS + rb":" + _WS)
_CLOSE = re.compile(_WS + rb"\}")
_members = msgspec.json.Decoder(dict[str, msgspec.Raw])
_str = msgspec.json.Decoder(str)
_TRUE = msgspec.Raw(b"true")
_EDITED = frozenset({"model", "strait", "stream_options", "input", "prompt"})
# The protocols whose streams report usage only when asked (`stream_options.include_usage`): a passthrough
# body of theirs asks. Anthropic's streams always report it (message_start, message_delta), and its API
# refuses fields it does not know, so its bodies are never given `stream_options`.
ASKS_FOR_STREAM_USAGE = frozenset({"openai"})


class RepeatedField(ValueError):
    """A top-level name appears twice: which value counts would differ between readers, so it is refused."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class Original(msgspec.Struct, frozen=True, kw_only=True):
    """The client's body and the spans Strait may edit in it."""

    protocol: str  # the codec that read it: "openai"
    body: bytes
    model: tuple[int, int]  # the `model` value
    # The `strait` member with one separator, to cut out (Strait's own preferences: not the upstream's).
    cut: tuple[int, int] | None = None
    stream_options: tuple[int, int] | None = None  # its value
    # The values of `input` (embeddings) and `prompt` (completions): replaced when token arrays become text.
    input: tuple[int, int] | None = None
    prompt: tuple[int, int] | None = None
    end: int = 0  # after the last member's value: where a member is added
    # Request headers of the client's protocol that belong with its body when it goes to an upstream of
    # that protocol (Anthropic's `anthropic-beta`: the beta features the body uses), lower-case names.
    headers: tuple[tuple[str, str], ...] = ()


def original_of(protocol: str, body: bytes, values: dict[str, msgspec.Raw]) -> Original:
    """Walk the top-level members of the JSON object `body`, given its values as decoded (`dict[str, Raw]`),
    and keep the spans of `model` (required), `strait` and `stream_options`.

    Each value's bytes are compared with the body where the walk expects them, so the walk cannot drift
    into a nested object unnoticed (two complete JSON values differ unless one is a number prefixing the
    other, and then the next member cannot follow: the walk stops short of the closing brace). A name
    that appears twice raises RepeatedField: the decoded mapping kept only the last value, and the
    upstream might read the first (`"max_tokens": 100000, "max_tokens": 1` must not pass as 1).
    """
    spans = _compact(body, values)
    if spans is None:
        spans = _walk(body, values)
    model, options, inputs, prompt, cut, end = spans
    if model is None:
        raise KeyError("model")
    return Original(
        protocol=protocol,
        body=body,
        model=model,
        cut=cut,
        stream_options=options,
        input=inputs,
        prompt=prompt,
        end=end,
    )


_Span = tuple[int, int]
_Spans = tuple[_Span | None, _Span | None, _Span | None, _Span | None, _Span | None, int]
# `"name":` of plain member names (no quote, backslash or control character: spelled as they are).
_HEADS: dict[str, bytes] = {}


def _head(name: str) -> bytes | None:
    if '"' in name or "\\" in name or not name.isprintable():
        return None
    head = b'"' + name.encode() + b'":'
    if len(_HEADS) < _MAX_NAMES:
        _HEADS[name] = head
    return head


def _compact(body: bytes, values: dict[str, msgspec.Raw]) -> _Spans | None:
    """The spans of a body spelled compactly (`{"a":1,"b":2}`, what most SDKs send), found by comparing
    each member as it must read, in the decoded mapping's order, with the body: no regex, no name decoded.
    None for any other spelling (whitespace, escaped names, a repeated name), left to `_walk`.

    Sound: every member of the mapping is matched once, each followed by `,` (or the last by `}`, the
    body's last byte), so the body holds exactly those members, each name once."""
    if not values or body[:1] != b"{":
        return None
    kept: dict[str, _Span] = {}
    cut: _Span | None = None
    cut_next = False
    startswith = body.startswith
    pos = 1
    end = -1
    left = len(values)
    for name, value in values.items():
        head = _HEADS.get(name)
        if head is None:
            head = _head(name)
            if head is None:
                return None
        if not startswith(head, pos):
            return None
        start = pos + len(head)
        if not startswith(value, start):
            return None
        if cut_next:
            cut, cut_next = (cut[0], pos) if cut is not None else None, False
        previous_end = end
        end = start + len(value)
        if name in _EDITED:
            if name != "strait":
                kept[name] = (start, end)
            elif previous_end < 0:  # `strait` first: up to the next key, its comma included
                cut, cut_next = (pos, end), True
            else:  # from the end of the previous value: the comma before it goes too
                cut = (previous_end, end)
        left -= 1
        if not startswith(b"," if left else b"}", end):
            return None
        pos = end + 1
    if pos != len(body):
        return None  # whitespace after the closing brace: the walk reads it
    return _spans(kept, cut, end)


def _spans(kept: dict[str, _Span], cut: _Span | None, end: int) -> _Spans:
    get = kept.get
    return get("model"), get("stream_options"), get("input"), get("prompt"), cut, end


def _walk(body: bytes, values: dict[str, msgspec.Raw]) -> _Spans:
    """The spans, found by walking the members with a regex (any valid spelling); RepeatedField."""
    opened = _OPEN.match(body)
    assert opened is not None  # `values` was decoded from `body`: it is an object
    pos = opened.end()
    count = 0
    kept: dict[str, _Span] = {}
    cut: _Span | None = None
    cut_next = False  # `strait` came first: its cut runs to the next key
    previous_end = -1
    match = _FIRST.match
    names = _NAMES
    get = values.get
    startswith = body.startswith
    while True:
        m = match(body, pos)
        if m is None:
            break
        key = m.group(1)
        name = names.get(key)
        if name is None:
            name = _name(key)
        value = get(name)
        start = m.end()
        # bytes.startswith is a memcmp (memoryview equality compares item by item: ~20 µs for 7 KB).
        if value is None or not startswith(value, start):
            raise RepeatedField(name)
        count += 1
        end = start + len(value)
        if cut_next:
            cut, cut_next = (cut[0], m.start(1) - 1) if cut is not None else None, False
        if name in _EDITED:
            if name != "strait":
                kept[name] = (start, end)
            elif previous_end < 0:  # `strait` first: up to the next key, its comma included
                cut, cut_next = (m.start(1) - 1, end), True
            else:  # from the end of the previous value: the comma before it goes too
                cut = (previous_end, end)
        previous_end = pos = end
        match = _NEXT.match
    if count != len(values) or _CLOSE.match(body, pos) is None:
        # More members than names means a name repeats; so does a walk that stopped before the closing
        # brace (a repeated number whose last value prefixes the first: `12` read where `1` was kept).
        raise RepeatedField(_repeated(body, values))
    return _spans(kept, cut, previous_end)


# Member names as spelled without escapes (bytes) and their text: the same few names come in every
# body, so each is decoded once (bounded: a client's own names cannot grow it past _MAX_NAMES).
_NAMES: dict[bytes, str] = {}
_MAX_NAMES = 1024


def _name(key: bytes) -> str:
    """A member name's text, from its bytes between the quotes (escapes decoded)."""
    if b"\\" in key:
        return str(_str.decode(b'"' + key + b'"'))
    name = key.decode()
    if len(_NAMES) < _MAX_NAMES:
        _NAMES[key] = name
    return name


def _repeated(body: bytes, values: dict[str, msgspec.Raw]) -> str:
    """The first top-level name that appears twice (only on the error path: a second, slower walk)."""
    seen: set[str] = set()
    match = _FIRST.match
    opened = _OPEN.match(body)
    pos = opened.end() if opened is not None else 0
    name = next(iter(values))
    while (m := match(body, pos)) is not None:
        key = m.group(1)
        name = _str.decode(b'"' + key + b'"') if b"\\" in key else key.decode()
        value = values.get(name)
        if name in seen or value is None or not body.startswith(value, m.end()):
            return name
        seen.add(name)
        pos = m.end() + len(value)
        match = _NEXT.match
    return name  # the walk stopped inside the last name's value: a repeat kept a prefix of it


def _with_usage(value: bytes) -> bytes | None:
    """`stream_options` asking for usage, or None when it already does (once, plainly spelled: a repeated
    or escaped key is re-encoded, so no upstream can read a `false` the decoded value hid)."""
    try:
        options = _members.decode(value)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return b'{"include_usage":true}'  # null or not an object: replaced whole
    plain = b"\\" not in value  # no escaped name (`include\u005fusage`) can repeat the key
    if plain and bytes(options.get("include_usage", b"")) == b"true" and value.count(b'"include_usage"') == 1:
        return None
    options["include_usage"] = _TRUE
    return msgspec.json.encode(options)


def splice(
    source: Original, model: str, *, stream_usage: bool = False, inputs: tuple[str, bytes] | None = None
) -> bytes:
    """The client's body with `model` set, `strait` removed, with `stream_usage` usage asked for, and with
    `inputs` (a member name, `input` or `prompt`, and its new JSON value) replaced."""
    body = source.body
    edits: list[tuple[int, int, bytes]] = [(*source.model, msgspec.json.encode(model))]
    if inputs is not None:
        span = source.input if inputs[0] == "input" else source.prompt
        if span is not None:
            edits.append((*span, inputs[1]))
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


def with_prefill(body: bytes, prefix: str, produced: int) -> bytes | None:
    """A chat body (already spliced) asking to continue `prefix` as the assistant's answer (mid-stream
    rescue): the prefix appended as a final assistant message (joined to one the client sent itself),
    vLLM's `continue_final_message: true` and `add_generation_prompt: false` set (llama.cpp's server
    continues a final assistant message by itself and ignores them), and `max_tokens` /
    `max_completion_tokens` lowered by the `produced` tokens already spent. Re-encoded: the rare path.
    None when the body has no message list to continue."""
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None
    messages = data.get("messages") if isinstance(data, dict) else None
    if not isinstance(messages, list):
        return None
    last = messages[-1] if messages else None
    if isinstance(last, dict) and last.get("role") == "assistant" and isinstance(last.get("content"), str):
        messages[-1] = {**last, "content": last["content"] + prefix}
    else:
        messages.append({"role": "assistant", "content": prefix})
    data["continue_final_message"] = True
    data["add_generation_prompt"] = False
    for name in ("max_tokens", "max_completion_tokens"):
        limit = data.get(name)
        if isinstance(limit, int) and not isinstance(limit, bool):
            data[name] = max(1, limit - produced)
    return msgspec.json.encode(data)
