"""Server-sent events: an incremental decoder for upstream streams and the encoder for client streams."""

from __future__ import annotations

DONE = b"[DONE]"
DONE_EVENT = b"data: [DONE]\n\n"


def encode_event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


class SSEDecoder:
    """Turns arbitrary byte chunks into the `data` payloads of complete events.

    Tolerates what real servers send: CRLF or CR line ends, `data:` with or without a space,
    comment lines (`: ping`), other fields (`event:`, `id:`), and multi-line data joined with `\\n`.
    """

    __slots__ = ("_buf", "_data")

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self._buf + chunk if self._buf else chunk
        events: list[bytes] = []
        start = 0
        n = len(buf)
        while start < n:
            lf = buf.find(b"\n", start)
            cr = buf.find(b"\r", start, lf if lf != -1 else n)
            if cr != -1:
                end = cr
                # A CR at the very end may be the first half of a CRLF: wait for the next byte.
                if cr + 1 == n:
                    break
                nxt = cr + 2 if buf[cr + 1 : cr + 2] == b"\n" else cr + 1
            elif lf != -1:
                end, nxt = lf, lf + 1
            else:
                break
            self._line(buf[start:end], events)
            start = nxt
        self._buf = buf[start:]
        return events

    def _line(self, line: bytes, events: list[bytes]) -> None:
        if not line:
            if self._data:
                events.append(b"\n".join(self._data))
                self._data = []
            return
        if line.startswith(b"data:"):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(b" ") else value)
        # Comments (":...") and other fields (event, id, retry) carry nothing Strait forwards.

    def close(self) -> list[bytes]:
        """End of stream: a final event without its blank line still counts (some servers omit it)."""
        events: list[bytes] = []
        if self._buf:
            self._line(self._buf.rstrip(b"\r"), events)
            self._buf = b""
        if self._data:
            events.append(b"\n".join(self._data))
            self._data = []
        return events
