"""`openai`: any OpenAI-compatible upstream (OpenAI, vLLM, SGLang, TGI, llama.cpp, Ollama, Together, Groq,
DeepSeek, Fireworks...).

One connection pool per backend (plugins/http1.py: a lean HTTP/1.1 client whose answers arrive in an
aiohttp StreamReader). Neither httpx nor aiohttp's ClientSession: measured on this kind of machine, httpx
(on its own transport or on aiohttp's) cost 0.46-3.4 ms of CPU per request, aiohttp's client 0.16 ms
(loadtest/README.md) and about 65 us in a later, quieter measurement, the lean client about 7 us. No cookie jar: an upstream's cookies must never be
replayed on another tenant's request. The client's own headers are never forwarded: the upstream sees
only the backend's key from the environment (`api_key: env:NAME`), a content type and the request id.
The body is the client's own bytes with only the model replaced (byte-faithful passthrough,
gateway/passthrough.py): fields Strait does not know, key order and number spellings reach the upstream
as the client wrote them. A client of another protocol (Anthropic Messages) gets a chat body translated
from the canonical request instead (gateway.upstream.chat_body); what it cannot carry is a 400.
A backend with the `responses` capability (OpenAI, vLLM) also speaks OpenAI's Responses API: a Responses
client's body goes to `{base_url}/responses` as it came (model replaced; a `previous_response_id` already
resolved by Strait into the full `input`: gateway.api.responses.decode), and its answer, JSON or stream,
is kept as sent for that client (contracts.NativeAnswer) and translated to chat for the taps
(plugins/openai_responses.py).
Streams are handed over read by read (the events one read completed, together); `close` returns the connection to the pool after a complete
answer and aborts it otherwise (so the engine stops generating for a client that left).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Final

import aiohttp
import msgspec

from gateway.contracts import (
    NativeAnswer,
    Operation,
    UpstreamCall,
    UpstreamConnectError,
    UpstreamResponse,
    UpstreamResponseTooLarge,
    UpstreamStreamBroken,
)
from gateway.errors import InvalidRequest
from gateway.policy.model import Backend, UpstreamLimits
from gateway.upstream.chat_body import Untranslatable, chat_body
from gateway.upstream.sse import DONE, SSEDecoder, SSELineTooLong
from plugins.http1 import ConnectFailed, Http1Pool, Response
from plugins.openai_responses import PROTOCOL as RESPONSES
from plugins.openai_responses import ResponsesStreamState, chat_completion
from plugins.stream_failure import stream_broken

_PATHS: Final[dict[Operation, str]] = {
    "chat": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
}
_KEPT = ("retry-after", "retry-after-ms", "content-type")
# The client's protocol this adapter speaks: an OpenAI client's bytes go up as they came (passthrough).
PROTOCOL: Final = "openai"


def resolve_secret(ref: str | None, environ: Mapping[str, str]) -> str | None:
    if ref is None:
        return None
    name = ref.removeprefix("env:")
    value = environ.get(name)
    if not value:
        raise ValueError(f"environment variable {name} (api_key: {ref}) is not set")
    return value


def _kept_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Only the upstream headers a client may need (retry hints, content type); never internal ones,
    and never `x-ratelimit-*`: they describe the gateway's provider account, not the tenant (whose own
    come from the limits stage)."""
    out: dict[str, str] = {}
    for k, v in headers.items():
        name = k.lower()
        if name in _KEPT:
            out[name] = v
    return out


def _refusal(message: str) -> bytes:
    """The 400 for a request this upstream cannot be given faithfully (answered without sending it)."""
    return InvalidRequest(message, code="untranslatable").body()


def _call_headers(call: UpstreamCall) -> dict[str, str]:
    if call.headers is None:
        return {"x-request-id": call.request_id}
    return {**call.headers, "x-request-id": call.request_id}


class OpenAICompatAdapter:
    def __init__(self, backend: Backend, *, environ: Mapping[str, str] | None = None) -> None:
        if not backend.base_url:
            raise ValueError(f"backend {backend.name}: base_url is required")
        env = os.environ if environ is None else environ
        self.name = backend.name
        self._base = backend.base_url.rstrip("/")
        key = resolve_secret(backend.api_key, env)
        self._headers = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
        if key:
            self._headers["authorization"] = f"Bearer {key}"
        t = backend.timeouts
        # read_s bounds the wait for each read (first byte included); connect_s bounds the handshake.
        # The pool holds no connection until the first request (they belong to the running event loop).
        self._pool = Http1Pool(
            self._base,
            limit=backend.max_connections,
            connect_timeout_s=t.connect_s,
            read_timeout_s=t.read_s,
            headers=self._headers,
        )
        limits = backend.limits if backend.limits is not None else UpstreamLimits()
        self._max_body = limits.max_body_bytes
        self._max_event = limits.max_event_bytes
        self._responses = "responses" in backend.capabilities

    async def aclose(self) -> None:
        await self._pool.close()

    async def send(self, call: UpstreamCall) -> UpstreamResponse:
        if self._responses and call.prefill is None:
            own = call.passthrough(RESPONSES)
            if own is not None:
                return await self._send_responses(call, own)
        body = call.passthrough(PROTOCOL)
        if body is None:
            # Another protocol's client (Anthropic Messages): a chat body translated from the canonical request.
            if call.operation != "chat":
                raise UpstreamConnectError(f"{self.name}: no translation for a {call.operation} request")
            try:
                body = chat_body(
                    call.request,
                    call.model,
                    stream=call.stream,
                    prefill=call.prefill,
                    prefill_tokens=call.prefill_tokens,
                )
            except Untranslatable as exc:
                return UpstreamResponse(
                    status=400, body=_refusal(str(exc)), headers={"content-type": "application/json"}
                )
        response = await self._post(_PATHS[call.operation], body, call)
        headers = _kept_headers(response.headers)
        streaming = call.stream and response.status == 200 and "text/event-stream" in headers.get("content-type", "")
        if not streaming:
            return UpstreamResponse(status=response.status, body=await self._body(response), headers=headers)
        state = _StreamState(self._max_event)
        return UpstreamResponse(
            status=200,
            headers=headers,
            batches=self._batches(response, state),
            close=_closer(response, state),
            drain=_drainer(response, state),
        )

    async def _send_responses(self, call: UpstreamCall, body: bytes) -> UpstreamResponse:
        """A Responses client's own body to `/responses`; the answer kept native and translated to chat."""
        response = await self._post("/responses", body, call)
        headers = _kept_headers(response.headers)
        streaming = call.stream and response.status == 200 and "text/event-stream" in headers.get("content-type", "")
        if not streaming:
            raw = await self._body(response)
            if response.status != 200:
                return UpstreamResponse(status=response.status, body=raw, headers=headers)
            try:
                translated = chat_completion(raw)
            except (msgspec.DecodeError, msgspec.ValidationError):
                # Not a response object: the client gets a 502, never the upstream's bytes.
                raise UpstreamConnectError(f"{self.name}: the answer is not a Responses object", reset=True) from None
            native = NativeAnswer(RESPONSES, body=raw)
            return UpstreamResponse(status=200, body=translated, headers=headers, native=native)
        state = ResponsesStreamState(self._max_event, NativeAnswer(RESPONSES))
        return UpstreamResponse(
            status=200,
            headers=headers,
            batches=self._response_batches(response, state),
            close=_closer(response, state),
            drain=_drainer(response, state),
            native=state.native,
        )

    async def _post(self, path: str, body: bytes, call: UpstreamCall) -> Response:
        try:
            return await self._pool.post(path, body, _call_headers(call))
        except TimeoutError as exc:
            raise UpstreamConnectError(f"{self.name}: timed out ({type(exc).__name__})", timeout=True) from None
        except (aiohttp.ClientConnectorError, ConnectFailed) as exc:
            raise UpstreamConnectError(f"{self.name}: {type(exc).__name__}") from None
        except (aiohttp.ClientError, OSError) as exc:
            # Connected, then dropped before the head arrived (reset, disconnected).
            raise UpstreamConnectError(f"{self.name}: {type(exc).__name__}", reset=True) from None

    async def _body(self, response: Response) -> bytes:
        """The whole body; the connection back to the pool after a complete read, else dropped."""
        try:
            body = await self._read_body(response)
        except UpstreamResponseTooLarge:
            response.close()  # drop the connection: the rest is never read
            raise
        except TimeoutError:
            response.close()
            raise UpstreamConnectError(f"{self.name}: timed out reading the body", timeout=True) from None
        except (aiohttp.ClientError, OSError) as exc:
            response.close()
            raise UpstreamConnectError(f"{self.name}: {type(exc).__name__} reading the body", reset=True) from None
        except BaseException:
            response.close()  # cancelled mid-body: the connection (and its slot) is not left behind
            raise
        response.release()
        return body

    async def _read_body(self, response: Response) -> bytes:
        """The whole body, or UpstreamResponseTooLarge as soon as more than the limit arrived."""
        limit = self._max_body
        if response.content_length is not None and response.content_length > limit:
            raise self._too_large()
        content = response.content
        if content.is_eof():
            # All of it has arrived (a small answer comes with its head, in one read): taken as it is,
            # without a read coroutine per chunk and one for the end.
            body = content.read_nowait()
            if len(body) > limit:
                raise self._too_large()
            return body
        parts: list[bytes] = []
        size = 0
        while True:
            chunk = await content.readany()
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise self._too_large()
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _too_large(self) -> UpstreamResponseTooLarge:
        return UpstreamResponseTooLarge(
            f"The upstream's answer exceeded the gateway's limit of {self._max_body} bytes "
            "(max_body_bytes of the backend's upstream limits)."
        )

    def _batches(self, response: Response, state: _StreamState) -> _Batches:
        """The events of each read, together (`_Batches`)."""
        return _Batches(self.name, response, state)

    async def _response_batches(self, response: Response, state: ResponsesStreamState) -> AsyncIterator[list[bytes]]:
        """Per read, the chunks its complete Responses events translate to, until response.completed."""
        content = response.content
        translator = state.translator
        try:
            while True:
                data = await content.readany()
                out = state.feed(data)
                if out:
                    yield out
                if translator.ended or translator.errored or not data:
                    break
        except SSELineTooLong as exc:
            state.refused = state.translate(exc.events)
            raise stream_broken(self.name, exc) from None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise stream_broken(self.name, exc) from None
        if not (translator.ended or translator.errored):
            raise UpstreamStreamBroken(f"{self.name}: stream ended without response.completed")


class _StreamState:
    __slots__ = ("decoder", "done", "refused")

    def __init__(self, max_event_bytes: int) -> None:
        self.decoder = SSEDecoder(max_event_bytes)
        self.done = False
        # The complete events of the read that held an oversize line (never yielded, charged by the drain).
        self.refused: list[bytes] = []


class _Batches:
    """The events of each read, together: the relay forwards them to the client in one write.

    An async iterator of its own rather than an async generator: a read costs one coroutine (this
    `__anext__`) over the reader's, not also the generator's `asend` and frame, on every event of a
    paced stream. Ends as the generator did: after `[DONE]` (last in its batch: the relay knows it is
    over) or a failure, the next read is `StopAsyncIteration`; a body that ends without `[DONE]` hands
    over its last events, then raises `UpstreamStreamBroken(clean_end=True)`."""

    __slots__ = ("_content", "_name", "_over", "_state", "_unfinished")

    def __init__(self, name: str, response: Response, state: _StreamState) -> None:
        self._name = name
        self._content = response.content
        self._state = state
        self._over = False
        self._unfinished = False  # the body ended without [DONE]: the next read says so

    def __aiter__(self) -> _Batches:
        return self

    async def __anext__(self) -> list[bytes]:
        if self._over:
            raise StopAsyncIteration
        state = self._state
        try:
            if self._unfinished:
                raise UpstreamStreamBroken(f"{self._name}: stream ended without [DONE]", clean_end=True)
            decoder = state.decoder
            content = self._content
            while True:
                chunk = await content.readany()
                if chunk:
                    batch = decoder.feed(chunk)
                else:
                    # At the end of the body, a last event without its blank line still counts.
                    batch = decoder.close()
                    if not batch or DONE not in batch:
                        self._unfinished = True
                        if not batch:
                            raise UpstreamStreamBroken(f"{self._name}: stream ended without [DONE]", clean_end=True)
                        return batch
                if batch:
                    if DONE in batch:
                        state.done = True
                        self._over = True
                        return batch[: batch.index(DONE) + 1]  # [DONE] last: the relay knows it is over
                    return batch
        except SSELineTooLong as exc:
            self._over = True
            state.refused = exc.events  # decoded before the oversize line: charged (drain)
            raise stream_broken(self._name, exc) from None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            self._over = True
            raise stream_broken(self._name, exc) from None
        except BaseException:
            self._over = True  # a failure (or a cancelled read) ends it, as it ended the generator
            raise


def _buffered(content: aiohttp.StreamReader) -> bytes:
    """What the reader holds unread, without waiting. After a connection error aiohttp refuses to hand
    it over (every read raises the error first), yet it was received: it is read from the buffer."""
    try:
        return content.read_nowait()
    except (aiohttp.ClientError, OSError, TimeoutError, RuntimeError):
        pass
    # aiohttp internals (pinned by tests/unit/test_openai_compat_stream.py): a deque of chunks, the
    # first one consumed up to `_buffer_offset`.
    chunks = getattr(content, "_buffer", None)
    if not chunks:
        return b""
    offset = getattr(content, "_buffer_offset", 0)
    data = b"".join(chunks)[offset:]
    chunks.clear()
    return data


def _drainer(response: Response, state: _StreamState | ResponsesStreamState) -> Callable[[], list[bytes]]:
    def drain() -> list[bytes]:
        # Each batch is handed over whole (the relay charges all of it); what is left: the events of a
        # refused read, then whatever complete events are buffered.
        events = [e for e in state.refused if e != DONE]
        state.refused = []
        # Complete events only: a torn last line is not one (an ended stream was closed by `events`).
        try:
            decoded = state.decoder.feed(_buffered(response.content))
        except SSELineTooLong as exc:
            decoded = exc.events  # those before an oversize line are charged; it is not
        if isinstance(state, ResponsesStreamState):
            decoded = state.translate(decoded)  # Responses events, charged as the chunks they stand for
        events.extend(e for e in decoded if e != DONE)
        return events

    return drain


def _closer(response: Response, state: _StreamState | ResponsesStreamState) -> Callable[[], None]:
    def close() -> None:
        if state.done:
            response.release()  # back to the pool (aiohttp closes it instead if bytes are left unread)
        else:
            response.close()  # abort: the upstream sees the connection drop and stops generating

    return close


def factory(backend: Backend) -> OpenAICompatAdapter:
    return OpenAICompatAdapter(backend)
