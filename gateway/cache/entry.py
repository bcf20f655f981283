"""One cached answer as the store keeps it: a msgpack-encoded `CacheEntry`.

`body` is the complete OpenAI `chat.completion` JSON as the upstream answered it (a streamed answer is
stored as its aggregated equivalent, see `replay.py`); a hit re-serves it with a fresh id (`with_id`).
`expires_ms` is absolute (epoch ms), fixed at `put` and never moved by a read. Decoding never raises:
bytes that are not an entry (garbage, another version's layout) decode to None, which callers treat
as a miss.
"""

from __future__ import annotations

import msgspec


class CacheEntry(msgspec.Struct, frozen=True, kw_only=True):
    body: bytes  # a complete `chat.completion` JSON
    query: str | None = None  # the embedded text (semantic tier), None for an exact-only entry
    vector: bytes | None = None  # the query's embedding, float32 little-endian, L2-normalised
    created_ms: int
    expires_ms: int  # absolute expiry, epoch ms: set once at put, never renewed
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model: str = ""  # the upstream model that answered
    deployment: str = ""
    # Every deployment that produced part of the answer (`model@backend`: the one that answered, and a
    # broken stream's deployment it continued). A hit is served only if the requesting tenant may use
    # each of them now. Empty (an entry written before this field): `deployment` alone.
    producers: tuple[str, ...] = ()


class VectorRecord(msgspec.Struct, frozen=True, array_like=True):
    """What the semantic index keeps per entry (the Redis store's `vec` hash): enough to search and to
    drop the row when it expires, without fetching bodies."""

    query: str
    vector: bytes
    expires_ms: int


_encoder = msgspec.msgpack.Encoder()
_entry_decoder = msgspec.msgpack.Decoder(CacheEntry)
_record_decoder = msgspec.msgpack.Decoder(VectorRecord)


def encode_entry(entry: CacheEntry) -> bytes:
    return _encoder.encode(entry)


def decode_entry(raw: bytes) -> CacheEntry | None:
    try:
        return _entry_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def vector_record(entry: CacheEntry) -> VectorRecord | None:
    """The entry's searchable part, None when it has no usable vector (exact tier only)."""
    if entry.query is None or not entry.vector or len(entry.vector) % 4:
        return None
    return VectorRecord(entry.query, entry.vector, entry.expires_ms)


def encode_record(record: VectorRecord) -> bytes:
    return _encoder.encode(record)


def decode_record(raw: bytes) -> VectorRecord | None:
    try:
        return _record_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
