"""`gemini`: Google's Gemini API, natively (`models/{model}:generateContent` and
`:streamGenerateContent?alt=sse`), behind the one Adapter Protocol.

The request is translated from the canonical form (plugins.gemini.request: a 400 for what Gemini cannot
be given), the answer back into the pipeline's OpenAI chat format (plugins.gemini.response and
.stream). HTTP is the `openai` adapter's lean pooled client (plugins/http1.py), with the same bounds:
the backend's connect and read timeouts, `max_body_bytes` on a JSON answer, `max_event_bytes` on one
SSE event. The key comes from the backend's `api_key: env:NAME` and goes only in the `x-goog-api-key`
header (never in the URL, where proxies and access logs would keep it); the base URL only from the
policy (`https://generativelanguage.googleapis.com`; the adapter adds `/v1beta/models/...`).

A stream is read up to its first event before the adapter answers: a prompt or an answer Gemini blocks
before saying anything comes as that first event, and it is the client's 400 `content_filter` (not a
stream that fails, which the dispatcher would retry elsewhere). So for this adapter a route's
`stream_headers_s` bounds the wait for Gemini's first event.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Final
from urllib.parse import quote, urlsplit

import aiohttp

from gateway.contracts import (
    UpstreamCall,
    UpstreamConnectError,
    UpstreamResponse,
    UpstreamResponseTooLarge,
    UpstreamStreamBroken,
)
from gateway.errors import InvalidRequest, UpstreamError
from gateway.policy.model import Backend, UpstreamLimits
from gateway.upstream.chat_body import Untranslatable
from gateway.upstream.sse import SSEDecoder, SSELineTooLong
from plugins.gemini.request import generate_content_body
from plugins.gemini.response import GeminiRefusal, completion, error_answer
from plugins.gemini.stream import StreamTranslator
from plugins.gemini.wire import DECODE_ERRORS, decode_response
from plugins.http1 import ConnectFailed, Http1Pool, Response
from plugins.openai_compat import resolve_secret
from plugins.stream_failure import stream_broken

API_VERSION: Final = "v1beta"
_KEPT = ("retry-after", "content-type")
_JSON = {"content-type": "application/json"}


def _refusal(message: str, code: str = "untranslatable") -> UpstreamResponse:
    return UpstreamResponse(status=400, body=InvalidRequest(message, code=code).body(), headers=dict(_JSON))


def _bad_answer(message: str) -> UpstreamResponse:
    error = UpstreamError(message, status=502, code="upstream_bad_response", type_="server_error")
    return UpstreamResponse(status=502, body=error.body(), headers=dict(_JSON))


class GeminiAdapter:
    def __init__(self, backend: Backend, *, environ: Mapping[str, str] | None = None) -> None:
        if not backend.base_url:
            raise ValueError(f"backend {backend.name}: base_url is required")
        if urlsplit(backend.base_url).query:
            raise ValueError(f"backend {backend.name}: a gemini base_url takes no query (the key goes in a header)")
        env = os.environ if environ is None else environ
        self.name = backend.name
        key = resolve_secret(backend.api_key, env)
        headers = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
        if key:
            headers["x-goog-api-key"] = key
        self._base = backend.base_url.rstrip("/")
        self._probe_headers = {"x-goog-api-key": key} if key else {}
        t = backend.timeouts
        self._pool = Http1Pool(
            self._base,
            limit=backend.max_connections,
            connect_timeout_s=t.connect_s,
            read_timeout_s=t.read_s,
            headers=headers,
        )
        limits = backend.limits if backend.limits is not None else UpstreamLimits()
        self._max_body = limits.max_body_bytes
        self._max_event = limits.max_event_bytes

    async def aclose(self) -> None:
        await self._pool.close()

    def probe_request(self) -> tuple[str, dict[str, str]]:
        """The health monitor's free probe (gateway.upstream.health.OwnProbe): one page of the model list,
        the key in its header as for every request."""
        return f"{self._base}/{API_VERSION}/models?pageSize=1", dict(self._probe_headers)

    async def send(self, call: UpstreamCall) -> UpstreamResponse:
        if call.operation != "chat":
            return _refusal(f"This route's upstream (Gemini) serves chat only, not {call.operation}.", "unsupported")
        if call.prefill is not None:
            # A mid-stream rescue's continuation: Gemini has no assistant prefill to continue from.
            return _refusal(
                "This route's upstream (Gemini) cannot continue an assistant prefix.", "unsupported_prefill"
            )
        try:
            body = generate_content_body(call.request)
        except Untranslatable as exc:
            return _refusal(str(exc))
        method = "streamGenerateContent?alt=sse" if call.stream else "generateContent"
        path = f"/{API_VERSION}/models/{quote(call.model, safe='-._~@')}:{method}"
        extra = {"x-request-id": call.request_id, **(call.headers or {})}
        try:
            response = await self._pool.post(path, body, extra)
        except TimeoutError as exc:
            raise UpstreamConnectError(f"{self.name}: timed out ({type(exc).__name__})", timeout=True) from None
        except (aiohttp.ClientConnectorError, ConnectFailed) as exc:
            raise UpstreamConnectError(f"{self.name}: {type(exc).__name__}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamConnectError(f"{self.name}: {type(exc).__name__}", reset=True) from None
        headers = {k: v for k, v in response.headers.items() if k in _KEPT}
        streaming = call.stream and response.status == 200 and "text/event-stream" in headers.get("content-type", "")
        if streaming:
            return await self._stream(call, response, headers)
        raw = await self._whole_body(response)
        if response.status != 200:
            status, out, out_headers = error_answer(response.status, raw, headers)
            return UpstreamResponse(status=status, body=out, headers=out_headers)
        try:
            translated = completion(decode_response(raw), call.model, call.request_id)
        except DECODE_ERRORS:
            return _bad_answer("The upstream (Gemini) answered with a body that is not a GenerateContentResponse.")
        except GeminiRefusal as refused:
            return UpstreamResponse(status=refused.status, body=refused.body, headers=dict(_JSON))
        return UpstreamResponse(status=200, body=translated, headers=dict(_JSON))

    async def _whole_body(self, response: Response) -> bytes:
        try:
            body = await self._read_body(response)
        except UpstreamResponseTooLarge:
            response.close()
            raise
        except TimeoutError:
            response.close()
            raise UpstreamConnectError(f"{self.name}: timed out reading the body", timeout=True) from None
        except (aiohttp.ClientError, OSError) as exc:
            response.close()
            raise UpstreamConnectError(f"{self.name}: {type(exc).__name__} reading the body", reset=True) from None
        except BaseException:
            response.close()
            raise
        response.release()
        return body

    async def _read_body(self, response: Response) -> bytes:
        limit = self._max_body
        if response.content_length is not None and response.content_length > limit:
            raise self._too_large()
        parts: list[bytes] = []
        size = 0
        while chunk := await response.content.readany():
            size += len(chunk)
            if size > limit:
                raise self._too_large()
            parts.append(chunk)
        return b"".join(parts)

    def _too_large(self) -> UpstreamResponseTooLarge:
        return UpstreamResponseTooLarge(
            f"The upstream's answer exceeded the gateway's limit of {self._max_body} bytes "
            "(max_body_bytes of the backend's upstream limits)."
        )

    async def _stream(self, call: UpstreamCall, response: Response, headers: dict[str, str]) -> UpstreamResponse:
        request = call.request
        state = _StreamState(self._max_event, StreamTranslator(call.model, call.request_id, request.n or 1))
        reading = self._batches(response, state)
        # Up to Gemini's first event: a block before any content is the client's error, not a stream.
        try:
            first = await reading.__anext__()
        except GeminiRefusal as refused:
            response.close()
            return UpstreamResponse(status=refused.status, body=refused.body, headers=dict(_JSON))
        except StopAsyncIteration:
            first = []
        except UpstreamStreamBroken as exc:
            state.failure = exc  # raised to the relay as the stream's first read
            first = []
        except BaseException:
            response.close()  # cancelled (the route's head timeout, the client left): not left behind
            raise
        headers["content-type"] = "text/event-stream"
        return UpstreamResponse(
            status=200,
            headers=headers,
            batches=_after(first, reading, state),
            close=_closer(response, state),
            drain=_drainer(response, state),
        )

    async def _batches(self, response: Response, state: _StreamState) -> AsyncIterator[list[bytes]]:
        """The OpenAI chunks of each read, together (never an empty list)."""
        content = response.content
        translator = state.translator
        try:
            while True:
                data = await content.readany()
                events = state.decoder.feed(data) if data else state.decoder.close()
                batch = [chunk for event in events for chunk in translator.feed(event)]
                if not data:
                    batch.extend(translator.end())  # raises UpstreamStreamBroken when it was cut
                    state.done = True
                if batch:
                    yield batch
                if not data:
                    return
        except SSELineTooLong as exc:
            raise stream_broken(self.name, exc) from None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise stream_broken(self.name, exc) from None


class _StreamState:
    __slots__ = ("decoder", "done", "failure", "translator")

    def __init__(self, max_event_bytes: int, translator: StreamTranslator) -> None:
        self.decoder = SSEDecoder(max_event_bytes)
        self.translator = translator
        self.done = False
        self.failure: UpstreamStreamBroken | None = None


async def _after(
    first: list[bytes], rest: AsyncIterator[list[bytes]], state: _StreamState
) -> AsyncIterator[list[bytes]]:
    if state.failure is not None:
        raise state.failure
    if first:
        yield first
    async for batch in rest:
        yield batch


def _drainer(response: Response, state: _StreamState) -> Callable[[], list[bytes]]:
    """What a stream that broke or lost its client cost: chunks of events still buffered, and Gemini's
    last (cumulative) usage as a usage chunk, so the bill is the provider's own count."""

    def drain() -> list[bytes]:
        if state.done:
            return []
        out: list[bytes] = []
        try:
            buffered = response.content.read_nowait()
        except (aiohttp.ClientError, OSError, TimeoutError, RuntimeError):
            buffered = b""
        try:
            for event in state.decoder.feed(buffered):
                out.extend(state.translator.feed(event))
        except (SSELineTooLong, UpstreamStreamBroken, GeminiRefusal):
            pass
        usage = state.translator.usage_chunk()
        if usage is not None:
            out.append(usage)
        return out

    return drain


def _closer(response: Response, state: _StreamState) -> Callable[[], None]:
    def close() -> None:
        if state.done:
            response.release()
        else:
            response.close()  # abort: Gemini sees the connection drop and stops generating

    return close


def factory(backend: Backend) -> GeminiAdapter:
    return GeminiAdapter(backend)
