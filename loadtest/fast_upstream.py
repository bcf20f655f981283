"""A very cheap OpenAI-compatible fake upstream for load tests (raw asyncio protocol, uvloop when present).

Every answer is precomputed bytes: the server parses the request line, the headers it needs and, for POSTs,
just enough of the JSON body (`stream`, `stream_options.include_usage`) to pick one of the prepared answers.
So its CPU cost per request is a few microseconds and the load test measures the gateway, not the fake.

    python -m loadtest.fast_upstream --port 9000 [--ttft-ms 0] [--chunk-delay-ms 0] [--latency-ms 0]

Endpoints: POST /v1/chat/completions (JSON or SSE), POST /v1/completions, POST /v1/embeddings,
GET /v1/models, GET /healthz. Streams: a role delta, `--chunks` content chunks of 5 tokens each, a finish
chunk, a usage chunk with `choices: []` when `stream_options.include_usage` was asked, then `[DONE]`.
With delays 0 the whole stream goes out in one write; otherwise event i is written at
`ttft + i * chunk_delay` after the request arrived, and the finish chunk, the usage chunk and `[DONE]`
go in one write (absolute deadlines: a late timer does not push the
later events back; timer callbacks, no task per stream).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import cast

import msgspec

MODEL = "m"
CREATED = 1_700_000_000
WORD = " tok"  # one token per word on most tokenizers
TOKENS_PER_CHUNK = 5
PROMPT_TOKENS = 12


class _StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _Probe(msgspec.Struct):
    """Only what the fake needs from a request body; other fields are ignored by msgspec."""

    stream: bool = False
    stream_options: _StreamOptions | None = None


_decode_probe = msgspec.json.Decoder(_Probe).decode
_encode = msgspec.json.encode


def _json_response(status: str, body: bytes, extra: str = "") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n{extra}"
        "server: fast-upstream\r\n\r\n"
    )
    return head.encode() + body


def _chunk(event: bytes) -> bytes:
    """One SSE event framed as an HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(event), event)


def _sse(obj: object) -> bytes:
    return b"data: " + _encode(obj) + b"\n\n"


@dataclass(frozen=True)
class Answers:
    chat: bytes
    completion: bytes
    embeddings: bytes
    models: bytes
    healthz: bytes
    not_found: bytes
    bad_request: bytes
    stream_head: bytes
    stream_events: tuple[bytes, ...]  # chunk-framed, without usage
    stream_usage_event: bytes  # chunk-framed usage chunk (choices: [])
    stream_tail: bytes  # chunk-framed [DONE] + last-chunk marker
    stream_all: bytes  # head + events + tail, one write
    stream_all_usage: bytes  # head + events + usage + tail, one write


def build_answers(chunks: int) -> Answers:
    completion_tokens = chunks * TOKENS_PER_CHUNK
    usage = {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": completion_tokens,
        "total_tokens": PROMPT_TOKENS + completion_tokens,
    }
    text = WORD * completion_tokens
    chat = {
        "id": "chatcmpl-fast",
        "object": "chat.completion",
        "created": CREATED,
        "model": MODEL,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": "stop"}
        ],
        "usage": usage,
    }
    completion = {
        "id": "cmpl-fast",
        "object": "text_completion",
        "created": CREATED,
        "model": MODEL,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}],
        "usage": usage,
    }
    embeddings = {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.01 * i for i in range(16)]}],
        "model": MODEL,
        "usage": {"prompt_tokens": PROMPT_TOKENS, "total_tokens": PROMPT_TOKENS},
    }
    models = {"object": "list", "data": [{"id": MODEL, "object": "model", "created": CREATED, "owned_by": "fake"}]}
    error = {"error": {"message": "not found", "type": "invalid_request_error", "code": "not_found"}}
    bad = {"error": {"message": "bad request", "type": "invalid_request_error", "code": "bad_request"}}

    def delta_chunk(delta: dict[str, str], finish: str | None) -> dict[str, object]:
        return {
            "id": "chatcmpl-fast",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    events = [_chunk(_sse(delta_chunk({"role": "assistant", "content": ""}, None)))]
    events += [_chunk(_sse(delta_chunk({"content": WORD * TOKENS_PER_CHUNK}, None))) for _ in range(chunks)]
    events.append(_chunk(_sse(delta_chunk({}, "stop"))))
    usage_event = _chunk(
        _sse(
            {
                "id": "chatcmpl-fast",
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": MODEL,
                "choices": [],
                "usage": usage,
            }
        )
    )
    tail = _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
        b"transfer-encoding: chunked\r\nserver: fast-upstream\r\n\r\n"
    )
    body = b"".join(events)
    return Answers(
        chat=_json_response("200 OK", _encode(chat)),
        completion=_json_response("200 OK", _encode(completion)),
        embeddings=_json_response("200 OK", _encode(embeddings)),
        models=_json_response("200 OK", _encode(models)),
        healthz=_json_response("200 OK", b'{"status":"ok"}'),
        not_found=_json_response("404 Not Found", _encode(error)),
        bad_request=_json_response("400 Bad Request", _encode(bad), "connection: close\r\n"),
        stream_head=head,
        stream_events=tuple(events),
        stream_usage_event=usage_event,
        stream_tail=tail,
        stream_all=head + body + tail,
        stream_all_usage=head + body + usage_event + tail,
    )


@dataclass(frozen=True)
class Timing:
    ttft_s: float = 0.0
    chunk_delay_s: float = 0.0
    latency_s: float = 0.0  # non-streaming answers


class FastUpstream(asyncio.Protocol):
    """One connection: HTTP/1.1 keep-alive, Content-Length or chunked request bodies, pipelining tolerated."""

    __slots__ = ("_answers", "_buf", "_busy", "_closed", "_loop", "_timing", "_transport")

    def __init__(self, answers: Answers, timing: Timing) -> None:
        self._answers = answers
        self._timing = timing
        self._buf = b""
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._busy = False  # a delayed answer is in flight: later pipelined requests wait for it
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have the same methods.
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True

    def data_received(self, data: bytes) -> None:
        self._buf = self._buf + data if self._buf else data
        if not self._busy:
            self._drain()

    def _drain(self) -> None:
        while self._buf and not self._busy and not self._closed:
            if not self._one():
                return

    def _one(self) -> bool:
        """Handle one complete request from the buffer; False when more bytes are needed."""
        buf = self._buf
        end = buf.find(b"\r\n\r\n")
        if end == -1:
            if len(buf) > 65536:
                self._fail()
            return False
        head = buf[:end]
        line_end = head.find(b"\r\n")
        request_line = head if line_end == -1 else head[:line_end]
        parts = request_line.split(b" ")
        if len(parts) != 3:
            self._fail()
            return False
        method, target = parts[0], parts[1]
        lower = head.lower()
        close = b"\r\nconnection: close" in lower
        length = 0
        body_start = end + 4
        i = lower.find(b"\r\ncontent-length:")
        if i != -1:
            j = lower.find(b"\r\n", i + 2)
            try:
                length = int(lower[i + 17 : j if j != -1 else len(lower)])
            except ValueError:
                self._fail()
                return False
            if len(buf) < body_start + length:
                return False
            body = buf[body_start : body_start + length]
            self._buf = buf[body_start + length :]
        elif b"\r\ntransfer-encoding: chunked" in lower:
            parsed = _dechunk(buf, body_start)
            if parsed is None:
                return False
            body, rest = parsed
            self._buf = buf[rest:]
        else:
            body = b""
            self._buf = buf[body_start:]
        self._answer(method, target.split(b"?", 1)[0], body)
        if close and self._transport is not None:
            self._closed = True
            self._transport.close()
        return True

    def _fail(self) -> None:
        assert self._transport is not None
        self._transport.write(self._answers.bad_request)
        self._transport.close()
        self._closed = True
        self._buf = b""

    def _answer(self, method: bytes, path: bytes, body: bytes) -> None:
        a = self._answers
        t = self._transport
        assert t is not None
        if method == b"POST":
            if path == b"/v1/chat/completions":
                try:
                    probe = _decode_probe(body)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    self._fail()
                    return
                if probe.stream:
                    usage = probe.stream_options is not None and probe.stream_options.include_usage
                    self._stream(usage)
                else:
                    self._send(a.chat)
                return
            if path == b"/v1/completions":
                self._send(a.completion)
                return
            if path == b"/v1/embeddings":
                self._send(a.embeddings)
                return
        elif method == b"GET":
            if path == b"/healthz":
                t.write(a.healthz)
                return
            if path == b"/v1/models":
                t.write(a.models)
                return
        t.write(a.not_found)

    def _send(self, payload: bytes) -> None:
        assert self._transport is not None
        if self._timing.latency_s <= 0:
            self._transport.write(payload)
            return
        self._busy = True
        self._loop.call_later(self._timing.latency_s, self._send_later, payload)

    def _send_later(self, payload: bytes) -> None:
        self._busy = False
        if self._closed or self._transport is None or self._transport.is_closing():
            return
        self._transport.write(payload)
        self._drain()

    def _stream(self, usage: bool) -> None:
        a = self._answers
        t = self._transport
        assert t is not None
        timing = self._timing
        if timing.ttft_s <= 0 and timing.chunk_delay_s <= 0:
            t.write(a.stream_all_usage if usage else a.stream_all)
            return
        # The finish chunk, the usage chunk and [DONE] leave together, as an engine sends them (vLLM: at
        # the end of the same step, no token to wait for): a proxy asking for usage (to account) must not
        # wait one more inter-token gap than a client that does not.
        frames = list(a.stream_events[:-1])
        frames.append(a.stream_events[-1] + (a.stream_usage_event if usage else b"") + a.stream_tail)
        t.write(a.stream_head)
        self._busy = True
        # On an absolute schedule from the request's arrival, as an engine on its own machine produces
        # tokens whatever the proxy in front of it is doing: a timer that fires late (this process shares
        # the cores with the gateway and the load generator) delays that one event, not every later one.
        start = self._loop.time()
        self._loop.call_at(start + timing.ttft_s, self._stream_step, frames, 0, start)

    def _stream_step(self, frames: list[bytes], i: int, start: float) -> None:
        t = self._transport
        if self._closed or t is None or t.is_closing():
            self._busy = False
            return
        t.write(frames[i])
        if i + 1 < len(frames):
            timing = self._timing
            due = start + timing.ttft_s + (i + 1) * timing.chunk_delay_s
            self._loop.call_at(due, self._stream_step, frames, i + 1, start)
            return
        self._busy = False
        self._drain()


def _dechunk(buf: bytes, start: int) -> tuple[bytes, int] | None:
    """Decode a chunked body starting at `start`; None when incomplete. Returns (body, end offset)."""
    parts: list[bytes] = []
    pos = start
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol == -1:
            return None
        size = int(buf[pos:eol].split(b";", 1)[0], 16)
        pos = eol + 2
        if size == 0:
            # Skip trailers up to the blank line.
            end = buf.find(b"\r\n", pos)
            while end != -1 and end != pos:
                pos = end + 2
                end = buf.find(b"\r\n", pos)
            if end == -1:
                return None
            return b"".join(parts), end + 2
        if len(buf) < pos + size + 2:
            return None
        parts.append(buf[pos : pos + size])
        pos += size + 2


async def serve(host: str, port: int, chunks: int, timing: Timing, ready_fd: int | None = None) -> None:
    answers = build_answers(chunks)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: FastUpstream(answers, timing), host, port, backlog=2048, reuse_address=True
    )
    bound = server.sockets[0].getsockname()[1]
    print(f"fast_upstream: listening on http://{host}:{bound}", file=sys.stderr, flush=True)
    if ready_fd is not None:
        os.write(ready_fd, f"{bound}\n".encode())
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Cheap OpenAI-compatible fake upstream for load tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000, help="0 picks a free port (printed on stderr)")
    parser.add_argument("--chunks", type=int, default=10, help="content chunks per stream (5 tokens each)")
    parser.add_argument("--ttft-ms", type=float, default=0.0, help="delay before the first stream event")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0, help="delay between stream events")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay before a non-streaming answer")
    parser.add_argument("--nice", type=int, default=0, help="lower this process's priority by N (os.nice)")
    args = parser.parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("the fake upstream binds loopback only")
    if args.nice:
        os.nice(args.nice)
    timing = Timing(args.ttft_ms / 1000, args.chunk_delay_ms / 1000, args.latency_ms / 1000)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a gateway dependency
        pass
    started = time.perf_counter()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, args.chunks, timing))
    print(f"fast_upstream: stopped after {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
