"""A cached answer in either shape: a stored `chat.completion` replayed as stream chunks, a relayed
stream aggregated into the `chat.completion` to store, and a stored body given a fresh id.

- `replay_chunks(body, ...)`: the `chat.completion.chunk` payloads (JSON, unframed; the edge frames them
  as SSE) an OpenAI stream of this answer would carry: a role delta, the content in a few pieces (and
  any refusal), each tool call as a header delta (index, id, type, name, empty arguments) and argument
  pieces, a finish delta, then, only when the client asked (`include_usage`) and the body has usage, the
  usage chunk with `choices: []` (every other chunk then carries `"usage": null`, as OpenAI's do).
- `StreamAggregator`: fed the chunks a miss relays, `result()` is the equivalent complete answer, or
  None when it cannot be rebuilt faithfully: an error chunk, no finish_reason, a choice other than 0
  (n > 1), undecodable chunks, or more than `max_bytes` of chunks (it then stops collecting).
- `with_id(body, id, created)`: the stored body with a fresh `id` and `created`; every other top-level
  value keeps its exact bytes.

Fields outside the OpenAI message (`annotations`, vendor extras such as llama.cpp `timings`) are not
carried by replay or aggregation; the content, tool calls, finish_reason, usage, model, service_tier
and system_fingerprint are.
"""

from __future__ import annotations

from typing import Any

import msgspec

DEFAULT_MAX_BYTES = 4 * 1024 * 1024
_NULL = b"null"
_encode = msgspec.json.encode


def _present(raw: msgspec.Raw) -> bool:
    """A JSON value that is there and not null."""
    value = bytes(raw)
    return bool(value) and value != _NULL


# -- the stored body ----------------------------------------------------------------------------------


class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCall(msgspec.Struct):
    id: str | None = None
    type: str | None = None
    function: _Function = msgspec.field(default_factory=_Function)


class _Message(msgspec.Struct):
    role: str | None = None
    content: str | None = None
    refusal: str | msgspec.UnsetType | None = msgspec.UNSET
    tool_calls: list[_ToolCall] | None = None


class _Choice(msgspec.Struct):
    message: _Message
    index: int = 0
    logprobs: msgspec.Raw = msgspec.Raw()
    finish_reason: str | None = None


class _Body(msgspec.Struct):
    choices: list[_Choice]
    model: str = ""
    usage: msgspec.Raw = msgspec.Raw()
    service_tier: str | msgspec.UnsetType | None = msgspec.UNSET
    system_fingerprint: str | msgspec.UnsetType | None = msgspec.UNSET


def _pieces(text: str, parts: int = 8, min_size: int = 24) -> list[str]:
    """`text` in up to about `parts` pieces, cut after whitespace where one is near (a stream's look)."""
    if not text:
        return []
    size = max(min_size, -(-len(text) // parts))
    out: list[str] = []
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            space = text.find(" ", end, end + 16)
            if space != -1:
                end = space + 1
        out.append(text[start:end])
        start = end
    return out


def replayable(body: bytes) -> bool:
    """Whether `replay_chunks` can replay `body` (check before storing an answer, so a hit never fails)."""
    try:
        msgspec.json.decode(body, type=_Body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return False
    return True


def replay_chunks(body: bytes, *, response_id: str, created: int, include_usage: bool) -> list[bytes]:
    """The stream chunks of a stored `chat.completion`. Raises msgspec.DecodeError / ValidationError
    when `body` is not one (see `replayable`; every body the aggregator builds is)."""
    answer = msgspec.json.decode(body, type=_Body)
    head: dict[str, Any] = {
        "id": response_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": answer.model,
    }
    if answer.service_tier is not msgspec.UNSET:
        head["service_tier"] = answer.service_tier
    if answer.system_fingerprint is not msgspec.UNSET:
        head["system_fingerprint"] = answer.system_fingerprint
    usage_null = {"usage": None} if include_usage else {}
    chunks: list[bytes] = []

    def emit(index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> None:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        chunks.append(_encode({**head, "choices": [choice], **usage_null}))

    for choice in answer.choices:
        message = choice.message
        first: dict[str, Any] = {
            "role": message.role or "assistant",
            "content": "" if message.content is not None else None,
        }
        if message.refusal is not msgspec.UNSET:
            first["refusal"] = None
        emit(choice.index, first)
        for piece in _pieces(message.content or ""):
            emit(choice.index, {"content": piece})
        for piece in _pieces(message.refusal or ""):
            emit(choice.index, {"refusal": piece})
        for i, call in enumerate(message.tool_calls or ()):
            header = {
                "index": i,
                "id": call.id or "",
                "type": call.type or "function",
                "function": {"name": call.function.name or "", "arguments": ""},
            }
            emit(choice.index, {"tool_calls": [header]})
            for piece in _pieces(call.function.arguments or ""):
                emit(choice.index, {"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
        logprobs = choice.logprobs if _present(choice.logprobs) else None
        emit(choice.index, {}, choice.finish_reason, logprobs)
    if include_usage and _present(answer.usage):
        chunks.append(_encode({**head, "choices": [], "usage": answer.usage}))
    return chunks


# -- a relayed stream ---------------------------------------------------------------------------------


class _FunctionDelta(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCallDelta(msgspec.Struct):
    index: int = 0
    id: str | None = None
    type: str | None = None
    function: _FunctionDelta | None = None


class _Delta(msgspec.Struct):
    role: str | None = None
    content: str | None = None
    refusal: str | msgspec.UnsetType | None = msgspec.UNSET
    tool_calls: list[_ToolCallDelta] | None = None


class _ChunkChoice(msgspec.Struct):
    index: int = 0
    delta: _Delta | None = None
    logprobs: msgspec.Raw = msgspec.Raw()
    finish_reason: str | None = None


class _Chunk(msgspec.Struct):
    id: str | None = None
    created: int | None = None
    model: str | None = None
    service_tier: str | msgspec.UnsetType | None = msgspec.UNSET
    system_fingerprint: str | msgspec.UnsetType | None = msgspec.UNSET
    choices: list[_ChunkChoice] | None = None
    usage: msgspec.Raw = msgspec.Raw()
    error: msgspec.Raw = msgspec.Raw()


_chunk_decoder = msgspec.json.Decoder(_Chunk)
_any_decoder = msgspec.json.Decoder()


class _Call:
    __slots__ = ("arguments", "id", "name", "type")

    def __init__(self) -> None:
        self.id = ""
        self.type = ""
        self.name = ""
        self.arguments: list[str] = []


class StreamAggregator:
    """Feed it every chunk payload of one relayed stream, in order; then `result()`."""

    __slots__ = (
        "_calls",
        "_content",
        "_content_seen",
        "_created",
        "_failed",
        "_fingerprint",
        "_finish",
        "_id",
        "_logprobs",
        "_max_bytes",
        "_model",
        "_refusal",
        "_refusal_key",
        "_refusal_seen",
        "_role",
        "_service_tier",
        "_size",
        "_usage",
    )

    def __init__(self, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self._max_bytes = max_bytes
        self._size = 0
        self._failed = False
        self._id: str | None = None
        self._created: int | None = None
        self._model: str | None = None
        self._service_tier: str | msgspec.UnsetType | None = msgspec.UNSET
        self._fingerprint: str | msgspec.UnsetType | None = msgspec.UNSET
        self._role = "assistant"
        self._content: list[str] = []
        self._content_seen = False
        self._refusal: list[str] = []
        self._refusal_key = False  # the stream carried a `refusal` field (OpenAI: null), so the message has one
        self._refusal_seen = False
        self._calls: dict[int, _Call] = {}
        self._logprobs: dict[str, list[Any]] | None = None
        self._finish: str | None = None
        self._usage: bytes | None = None

    @property
    def failed(self) -> bool:
        return self._failed

    def fail(self) -> None:
        """The stream ended badly (upstream error, client gone mid-way): nothing to store."""
        self._stop()

    def feed(self, payload: bytes) -> None:
        if self._failed:
            return
        self._size += len(payload)
        if self._size > self._max_bytes:
            self._stop()
            return
        if payload.strip() == b"[DONE]":
            return
        try:
            chunk = _chunk_decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self._stop()
            return
        if _present(chunk.error):
            self._stop()
            return
        self._id = self._id or chunk.id
        self._created = self._created or chunk.created
        self._model = self._model or chunk.model
        if chunk.service_tier is not msgspec.UNSET:
            self._service_tier = chunk.service_tier
        if chunk.system_fingerprint is not msgspec.UNSET:
            self._fingerprint = chunk.system_fingerprint
        if _present(chunk.usage):
            self._usage = bytes(chunk.usage)
        for choice in chunk.choices or ():
            if choice.index != 0:
                self._stop()  # n > 1: not rebuilt (the cache stores one-choice answers)
                return
            self._choice(choice)

    def _choice(self, choice: _ChunkChoice) -> None:
        delta = choice.delta
        if delta is not None:
            if delta.role:
                self._role = delta.role
            if delta.content is not None:
                self._content_seen = True
                self._content.append(delta.content)
            if delta.refusal is not msgspec.UNSET:
                self._refusal_key = True
                if delta.refusal is not None:
                    self._refusal_seen = True
                    self._refusal.append(delta.refusal)
            for tool in delta.tool_calls or ():
                call = self._calls.get(tool.index)
                if call is None:
                    call = self._calls[tool.index] = _Call()
                call.id = call.id or tool.id or ""
                call.type = call.type or tool.type or ""
                if tool.function is not None:
                    call.name = call.name or tool.function.name or ""
                    if tool.function.arguments:
                        call.arguments.append(tool.function.arguments)
        if _present(choice.logprobs):
            self._add_logprobs(bytes(choice.logprobs))
        if choice.finish_reason is not None:
            self._finish = choice.finish_reason

    def _add_logprobs(self, raw: bytes) -> None:
        try:
            value = _any_decoder.decode(raw)
        except msgspec.DecodeError:
            self._stop()
            return
        if not isinstance(value, dict):
            return
        if self._logprobs is None:
            self._logprobs = {}
        for part in ("content", "refusal"):
            items = value.get(part)
            if isinstance(items, list):
                self._logprobs.setdefault(part, []).extend(items)

    def _stop(self) -> None:
        self._failed = True
        self._content = []
        self._refusal = []
        self._calls = {}
        self._logprobs = None

    def result(self, *, usage: bytes | None = None) -> bytes | None:
        """The complete `chat.completion` JSON, or None (see the module doc). `usage`: the usage JSON to
        use when the stream carried none (e.g. the gateway's own count)."""
        if self._failed or self._finish is None:
            return None
        message: dict[str, Any] = {
            "role": self._role,
            "content": "".join(self._content) if self._content_seen else None,
        }
        if self._refusal_key:
            message["refusal"] = "".join(self._refusal) if self._refusal_seen else None
        if self._calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": call.type or "function",
                    "function": {"name": call.name, "arguments": "".join(call.arguments)},
                }
                for _, call in sorted(self._calls.items())
            ]
        logprobs: dict[str, Any] | None = None
        if self._logprobs is not None:
            logprobs = {"content": self._logprobs.get("content"), "refusal": self._logprobs.get("refusal")}
        body: dict[str, Any] = {
            "id": self._id or "",
            "object": "chat.completion",
            "created": self._created or 0,
            "model": self._model or "",
            "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": self._finish}],
        }
        final_usage = self._usage if self._usage is not None else usage
        if final_usage is not None:
            body["usage"] = msgspec.Raw(final_usage)
        if self._service_tier is not msgspec.UNSET:
            body["service_tier"] = self._service_tier
        if self._fingerprint is not msgspec.UNSET:
            body["system_fingerprint"] = self._fingerprint
        return _encode(body)


# -- a fresh id ---------------------------------------------------------------------------------------

_top_level = msgspec.json.Decoder(dict[str, msgspec.Raw])


def with_id(body: bytes, response_id: str, created: int) -> bytes:
    """`body` with `id` and `created` replaced; the other top-level values keep their exact bytes (in
    their order; only the whitespace between them goes). A body that is not a JSON object is returned
    as it is."""
    try:
        fields = _top_level.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return body
    fields["id"] = msgspec.Raw(_encode(response_id))
    fields["created"] = msgspec.Raw(_encode(created))
    return _encode(fields)
