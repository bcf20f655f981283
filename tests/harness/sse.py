"""Server-sent events parsing for tests (the WHATWG event-stream rules, reduced to what the tests need).

- Lines end with ``\\r\\n``, ``\\n`` or ``\\r``; a blank line ends an event (so ``\\n\\n`` and ``\\r\\n\\r\\n`` both work).
- Lines starting with ``:`` are comments and are ignored.
- ``data:`` lines accumulate; several in one event are joined with ``\\n``.  One space after the colon is dropped.
- An event without any ``data:`` line is not dispatched; an unterminated event at the end of the stream is dropped.
- A leading UTF-8 BOM is ignored.

``SSEParser`` is incremental (feed bytes as they arrive, split anywhere, even inside a UTF-8 sequence or between the
``\\r`` and ``\\n`` of a CRLF); ``parse_sse`` / ``parse_events`` handle a whole byte string.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, Iterable
from dataclasses import dataclass, field
from typing import Any

_BOM = b"\xef\xbb\xbf"


@dataclass
class SSEEvent:
    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None


@dataclass
class SSEParser:
    """Incremental parser: ``feed(chunk)`` returns the events completed by that chunk."""

    _buf: bytes = b""
    _started: bool = False
    _data: list[str] = field(default_factory=list)
    _event: str = ""
    _id: str | None = None
    _retry: int | None = None
    comments: list[str] = field(default_factory=list)

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        self._buf += chunk
        if not self._started:
            if len(self._buf) < len(_BOM) and _BOM.startswith(self._buf):
                return []
            self._buf = self._buf.removeprefix(_BOM)
            self._started = True
        out: list[SSEEvent] = []
        while True:
            i_n = self._buf.find(b"\n")
            i_r = self._buf.find(b"\r")
            if i_n < 0 and i_r < 0:
                break
            if i_r >= 0 and (i_n < 0 or i_r < i_n):
                if i_r == len(self._buf) - 1:
                    break  # a lone trailing \r may be the first half of \r\n: wait for more bytes
                end, nxt = i_r, i_r + (2 if self._buf[i_r + 1 : i_r + 2] == b"\n" else 1)
            else:
                end, nxt = i_n, i_n + 1
            line = self._buf[:end].decode("utf-8", errors="replace")
            self._buf = self._buf[nxt:]
            ev = self._line(line)
            if ev is not None:
                out.append(ev)
        return out

    def close(self) -> list[SSEEvent]:
        """End of stream: a trailing lone ``\\r`` still ends its line; an unterminated event is dropped."""
        out: list[SSEEvent] = []
        if self._buf.endswith(b"\r"):
            self._buf = self._buf[:-1]
            line = self._buf.decode("utf-8", errors="replace")
            self._buf = b""
            ev = self._line(line)
            if ev is not None:
                out.append(ev)
        return out

    @property
    def pending(self) -> bool:
        """True when bytes or data lines of an unterminated event are buffered."""
        return bool(self._buf or self._data)

    def _line(self, line: str) -> SSEEvent | None:
        if line == "":
            if not self._data:
                self._event = ""
                return None
            ev = SSEEvent(data="\n".join(self._data), event=self._event or "message", id=self._id, retry=self._retry)
            self._data = []
            self._event = ""
            return ev
        if line.startswith(":"):
            self.comments.append(line[1:].removeprefix(" "))
            return None
        name, sep, value = line.partition(":")
        if sep:
            value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isdigit():
            self._retry = int(value)
        return None


def parse_events(data: bytes | str) -> list[SSEEvent]:
    raw = data.encode() if isinstance(data, str) else data
    p = SSEParser()
    return p.feed(raw) + p.close()


def parse_sse(data: bytes | str) -> list[str]:
    """The ``data:`` payload strings of each complete event in `data`."""
    return [e.data for e in parse_events(data)]


def parse_chunks(chunks: Iterable[bytes]) -> list[str]:
    """Like parse_sse, for a stream delivered in pieces."""
    p = SSEParser()
    out: list[SSEEvent] = []
    for c in chunks:
        out.extend(p.feed(c))
    out.extend(p.close())
    return [e.data for e in out]


async def aparse_chunks(chunks: AsyncIterable[bytes]) -> list[str]:
    """parse_chunks for an async byte stream (e.g. ``httpx.Response.aiter_bytes()``)."""
    p = SSEParser()
    out: list[SSEEvent] = []
    async for c in chunks:
        out.extend(p.feed(c))
    out.extend(p.close())
    return [e.data for e in out]


def json_payloads(payloads: Iterable[str]) -> list[Any]:
    """Decode each payload as JSON, except the literal ``[DONE]`` which is kept as the string."""
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]
