"""Server-sent events from upstreams: an incremental decoder (the client side's encoder is the edge's:
gateway.api.openai.sse_encode)."""

from __future__ import annotations

DONE = b"[DONE]"
# Longest line (and longest event: its data lines joined) an upstream may send; a real chunk is a few KiB.
MAX_EVENT_BYTES = 1024 * 1024


class SSELineTooLong(ValueError):
    """A line or an event longer than the decoder's cap: the stream is refused, not buffered further."""

    def __init__(self, limit: int, events: list[bytes] | None = None) -> None:
        super().__init__(f"an upstream stream event exceeded {limit} bytes")
        self.limit = limit
        # The complete events the refused feed had decoded before the oversize line.
        self.events = events or []


class SSEDecoder:
    """Turns arbitrary byte chunks into the `data` payloads of complete events.

    Tolerates what real servers send: CRLF or CR line ends, `data:` with or without a space,
    comment lines (`: ping`), other fields (`event:`, `id:`), and multi-line data joined with `\\n`.

    Bounded: a line or an event longer than `max_bytes` raises `SSELineTooLong` as soon as that many
    bytes are pending, whatever the split. An incomplete line is kept as a list of the chunks it arrived
    in and joined once, when it ends: a long line costs linear time, not one copy per chunk.
    """

    __slots__ = ("_cr", "_data", "_data_size", "_max", "_parts", "_pending")

    def __init__(self, max_bytes: int = MAX_EVENT_BYTES) -> None:
        self._parts: list[bytes] = []  # the incomplete last line, as received
        self._pending = 0  # its length
        self._cr = False  # it ends with a CR (maybe the first half of a CRLF)
        self._data: list[bytes] = []
        self._data_size = 0
        self._max = max_bytes

    def feed(self, chunk: bytes) -> list[bytes]:
        if self._parts:
            if not self._cr and b"\n" not in chunk and b"\r" not in chunk:
                # Still inside the same line: keep the piece, no copy.
                self._parts.append(chunk)
                self._pending += len(chunk)
                if self._pending > self._max:
                    raise SSELineTooLong(self._max)
                return []
            self._parts.append(chunk)
            buf = b"".join(self._parts)
            self._parts = []
            self._pending = 0
        else:
            buf = chunk
        if b"\r" in buf:
            return self._scan(buf)
        # The common case (LF line ends only): one split, one pass, no call per line.
        lines = buf.split(b"\n")
        rest = lines.pop()  # the incomplete last line (b"" when the chunk ended with a line end)
        events: list[bytes] = []
        data = self._data
        size = self._data_size
        limit = self._max
        for line in lines:
            if not line:
                if data:
                    events.append(b"\n".join(data))
                    data = []
                    size = 0
                continue
            if len(line) > limit:
                raise SSELineTooLong(limit, events)
            if line.startswith(b"data:"):
                value = line[6:] if line[5:6] == b" " else line[5:]
                size += len(value) + 1
                if size > limit + 1:
                    raise SSELineTooLong(limit, events)
                data.append(value)
            # Comments (":...") and other fields (event, id, retry) carry nothing Strait forwards.
        self._data = data
        self._data_size = size
        if rest:
            self._cr = False
            self._pending = len(rest)
            if self._pending > limit:
                raise SSELineTooLong(limit, events)
            self._parts = [rest]
        return events

    def _scan(self, buf: bytes) -> list[bytes]:
        """Any line ends (CR, CRLF, LF), a line at a time."""
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
            if end - start > self._max:
                raise SSELineTooLong(self._max, events)
            self._line(buf[start:end], events)
            start = nxt
        if start < n:
            rest = buf[start:]
            self._cr = rest.endswith(b"\r")
            self._pending = len(rest)
            if self._pending - int(self._cr) > self._max:
                raise SSELineTooLong(self._max, events)
            self._parts = [rest]
        return events

    def _line(self, line: bytes, events: list[bytes]) -> None:
        if not line:
            if self._data:
                events.append(b"\n".join(self._data))
                self._data = []
                self._data_size = 0
            return
        if line.startswith(b"data:"):
            value = line[5:]
            if value.startswith(b" "):
                value = value[1:]
            self._data_size += len(value) + 1
            if self._data_size > self._max + 1:
                raise SSELineTooLong(self._max, events)
            self._data.append(value)
        # Comments (":...") and other fields (event, id, retry) carry nothing Strait forwards.

    def close(self) -> list[bytes]:
        """End of stream: a final event without its blank line still counts (some servers omit it)."""
        events: list[bytes] = []
        if self._parts:
            buf = b"".join(self._parts)
            self._parts = []
            self._pending = 0
            self._line(buf.rstrip(b"\r"), events)
        if self._data:
            events.append(b"\n".join(self._data))
            self._data = []
            self._data_size = 0
        return events
