"""The `anthropic` adapter: `POST {base_url}/messages` (base_url `https://api.anthropic.com/v1`, like the
`openai` adapter's, so the health probe's `/models` is the provider's), on the same lean HTTP/1.1 pool
(plugins.http1) with the backend's timeouts, connection limit and answer limits.

Authentication is the backend's key (`api_key: env:NAME`) as `x-api-key`, with `anthropic-version`
(`anthropic.version`, default 2023-06-01); nothing of the client's headers goes up but the request id, the
trace context and, with a Messages client's own body, its `anthropic-beta` (the beta features that body
uses; checked at the edge: names and commas only, bounded). The body:
- a client that spoke Messages: its own bytes with only `model` replaced (gateway.passthrough), and its
  answer kept as the upstream sent it (contracts.NativeAnswer) for its edge, beside the translation;
- any other client (OpenAI Chat Completions), or a rescue's continuation: a Messages body translated from
  the canonical request (request.py); what Messages cannot carry is a 400 `untranslatable`, unsent.

The answer reaches the pipeline as OpenAI's wire format (answer.py, stream.py). An error answer's body is
Anthropic's envelope (`{"type":"error","error":{"type","message"}}`), which gateway.upstream.normalize
reads like OpenAI's (type and message kept, redacted): 429 and 529 `overloaded_error` keep their
`retry-after`, so the dispatcher retries or fails over as for any upstream (gateway.upstream.retry counts
529 as an overload); 401/403 is the provider refusing the gateway's key (502 `upstream_auth_failed`).
A stream that breaks, or ends without `message_stop`, raises UpstreamStreamBroken: never a truncated
answer that looks complete.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Final

import aiohttp
import msgspec

from gateway.contracts import (
    NativeAnswer,
    UpstreamCall,
    UpstreamConnectError,
    UpstreamResponse,
    UpstreamResponseTooLarge,
    UpstreamStreamBroken,
)
from gateway.errors import InvalidRequest
from gateway.policy.model import AnthropicOptions, Backend, UpstreamLimits
from gateway.upstream.chat_body import Untranslatable
from gateway.upstream.sse import SSEDecoder, SSELineTooLong
from plugins.anthropic_messages.answer import chat_completion
from plugins.anthropic_messages.request import PROTOCOL, messages_body
from plugins.anthropic_messages.stream import ChunkTranslator, StreamEvent, decode_event
from plugins.http1 import ConnectFailed, Http1Pool, Response
from plugins.openai_compat import resolve_secret
from plugins.stream_failure import stream_broken

PATH: Final = "/messages"
DONE: Final = b"[DONE]"
# Headers a client may need (retry hints, content type); never `anthropic-ratelimit-*` (the gateway's
# provider account, not the tenant's) nor the provider's `request-id`.
_KEPT = ("retry-after", "content-type")
_JSON = {"content-type": "application/json"}
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError)


def _refusal(message: str) -> bytes:
    return InvalidRequest(message, code="untranslatable").body()


class AnthropicAdapter:
    def __init__(self, backend: Backend, *, environ: Mapping[str, str] | None = None) -> None:
        if not backend.base_url:
            raise ValueError(f"backend {backend.name}: base_url is required")
        env = os.environ if environ is None else environ
        self.name = backend.name
        self._options = backend.anthropic if backend.anthropic is not None else AnthropicOptions()
        headers = {
            "content-type": "application/json",
            "accept": "application/json, text/event-stream",
            "anthropic-version": self._options.version,
        }
        key = resolve_secret(backend.api_key, env)
        if key:
            headers["x-api-key"] = key
        t = backend.timeouts
        self._pool = Http1Pool(
            backend.base_url.rstrip("/"),
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

    def _body(self, call: UpstreamCall) -> tuple[bytes, bool]:
        """The body to send, and whether it is the client's own (its answer is then kept native too)."""
        if call.prefill is None:
            own = call.passthrough(PROTOCOL)
            if own is not None:
                return own, True
        body = messages_body(
            call.request,
            call.model,
            stream=call.stream,
            default_max_tokens=self._options.default_max_tokens,
            prefill=call.prefill,
            prefill_tokens=call.prefill_tokens,
        )
        return body, False

    async def send(self, call: UpstreamCall) -> UpstreamResponse:
        if call.operation != "chat":
            # Anthropic serves messages only: a completions or embeddings route must not list this backend.
            return UpstreamResponse(
                status=400,
                body=_refusal(f"This route's upstream (Anthropic's Messages API) has no {call.operation} endpoint."),
                headers=dict(_JSON),
            )
        try:
            body, native = self._body(call)
        except Untranslatable as exc:
            return UpstreamResponse(status=400, body=_refusal(str(exc)), headers=dict(_JSON))
        headers = {**(call.headers or {}), "x-request-id": call.request_id}
        original = call.request.original
        if native and original is not None:
            headers.update(original.headers)  # the client's anthropic-beta: the features its body uses
        try:
            response = await self._pool.post(PATH, body, headers)
        except TimeoutError as exc:
            raise UpstreamConnectError(f"{self.name}: timed out ({type(exc).__name__})", timeout=True) from None
        except (aiohttp.ClientConnectorError, ConnectFailed) as exc:
            raise UpstreamConnectError(f"{self.name}: {type(exc).__name__}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamConnectError(f"{self.name}: {type(exc).__name__}", reset=True) from None
        kept = {k: v for k, v in response.headers.items() if k in _KEPT}
        streaming = call.stream and response.status == 200 and "text/event-stream" in kept.get("content-type", "")
        if not streaming:
            raw = await self._read_body(response)
            if response.status != 200:
                return UpstreamResponse(status=response.status, body=raw, headers=kept)
            try:
                translated = chat_completion(raw)
            except _DECODE_ERRORS:
                # Not a Messages answer: the client gets a 502, never the upstream's bytes.
                raise UpstreamConnectError(f"{self.name}: the answer is not a Messages response", reset=True) from None
            return UpstreamResponse(
                status=200,
                body=translated,
                headers={**kept, **_JSON},
                native=NativeAnswer(PROTOCOL, body=raw) if native else None,
            )
        state = _Stream(self._max_event, NativeAnswer(PROTOCOL) if native else None)
        return UpstreamResponse(
            status=200,
            headers=kept,
            batches=self._batches(response, state),
            close=_closer(response, state),
            drain=_drainer(response, state),
            native=state.native,
        )

    async def _read_body(self, response: Response) -> bytes:
        """The whole body, or UpstreamResponseTooLarge as soon as more than the limit arrived; the
        connection goes back to the pool after a complete read, else it is dropped."""
        limit = self._max_body
        try:
            if response.content_length is not None and response.content_length > limit:
                raise self._too_large()
            parts: list[bytes] = []
            size = 0
            while chunk := await response.content.readany():
                size += len(chunk)
                if size > limit:
                    raise self._too_large()
                parts.append(chunk)
        except TimeoutError:
            response.close()
            raise UpstreamConnectError(f"{self.name}: timed out reading the body", timeout=True) from None
        except (aiohttp.ClientError, OSError) as exc:
            response.close()
            raise UpstreamConnectError(f"{self.name}: {type(exc).__name__} reading the body", reset=True) from None
        except BaseException:
            response.close()  # too large, or cancelled mid-body: the rest is never read
            raise
        response.release()
        return b"".join(parts)

    def _too_large(self) -> UpstreamResponseTooLarge:
        return UpstreamResponseTooLarge(
            f"The upstream's answer exceeded the gateway's limit of {self._max_body} bytes "
            "(max_body_bytes of the backend's upstream limits)."
        )

    async def _batches(self, response: Response, state: _Stream) -> AsyncIterator[list[bytes]]:
        """Per read, the chunks its complete events translate to (a read of pings alone yields nothing)."""
        content = response.content
        try:
            while True:
                data = await content.readany()
                out = state.translate(state.decoder.feed(data) if data else state.decoder.close())
                if out:
                    yield out
                if state.translator.ended or state.translator.errored:
                    return
                if not data:
                    break
        except SSELineTooLong as exc:
            state.refused = state.translate(exc.events)
            raise stream_broken(self.name, exc) from None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise stream_broken(self.name, exc) from None
        # The connection ended without message_stop: whatever came before it, the answer is not known whole.
        raise UpstreamStreamBroken(f"{self.name}: stream ended without message_stop")


class _Stream:
    """One stream's decoding state: SSE framing, the translation, the native events kept for the edge."""

    __slots__ = ("decoder", "done", "native", "refused", "translator")

    def __init__(self, max_event_bytes: int, native: NativeAnswer | None) -> None:
        self.decoder = SSEDecoder(max_event_bytes)
        self.translator = ChunkTranslator()
        self.native = native
        self.done = False
        # The translated events of the read that held an oversize line (never yielded, charged by the drain).
        self.refused: list[bytes] = []

    def translate(self, payloads: list[bytes]) -> list[bytes]:
        out: list[bytes] = []
        translator = self.translator
        native = self.native
        for payload in payloads:
            if translator.ended or translator.errored:
                break  # nothing after the end (or an error) is an answer's
            try:
                parsed: StreamEvent = decode_event(payload)
            except _DECODE_ERRORS:
                out.append(payload)  # not an event: the relay counts it malformed and skips it
                continue
            if native is not None and parsed.type != "error":
                native.frames.append((parsed.type.encode(), payload))
            out.extend(translator.event(parsed))
        if translator.ended and not self.done:
            self.done = True  # the answer is whole: the connection may go back to the pool
            out.append(DONE)
        return out


def _drainer(response: Response, state: _Stream) -> Callable[[], list[bytes]]:
    def drain() -> list[bytes]:
        events = [e for e in state.refused if e != DONE]
        state.refused = []
        try:
            data = response.content.read_nowait()
        except (aiohttp.ClientError, OSError, RuntimeError):
            data = b""
        try:
            decoded = state.decoder.feed(data) if data else []
        except SSELineTooLong as exc:
            decoded = exc.events
        events.extend(e for e in state.translate(decoded) if e != DONE)
        return events

    return drain


def _closer(response: Response, state: _Stream) -> Callable[[], None]:
    def close() -> None:
        if state.done:
            response.release()
        else:
            response.close()  # abort: the provider stops generating for a client that left

    return close


def factory(backend: Backend) -> AnthropicAdapter:
    return AnthropicAdapter(backend)
