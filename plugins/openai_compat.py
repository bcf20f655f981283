"""`openai`: any OpenAI-compatible upstream (OpenAI, vLLM, SGLang, TGI, llama.cpp, Ollama, Together, Groq,
DeepSeek, Fireworks...).

One pooled aiohttp session per backend. aiohttp directly, not httpx: measured on this kind of
machine, httpx (on its own transport or on aiohttp's) cost 0.46-3.4 ms of CPU per request against
0.16 ms for aiohttp alone (loadtest/README.md). No cookie jar: an upstream's cookies must never be
replayed on another tenant's request. The client's own headers are never forwarded: the upstream sees
only the backend's key from the environment (`api_key: env:NAME`), a content type and the request id.
Streams are relayed event by event; `close` returns the connection to the pool after a complete
answer and aborts it otherwise (so the engine stops generating for a client that left).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Final

import aiohttp
import msgspec

from gateway.api.sse import DONE, SSEDecoder
from gateway.contracts import Operation, UpstreamCall, UpstreamConnectError, UpstreamResponse, UpstreamStreamBroken
from gateway.policy.model import Backend

_PATHS: Final[dict[Operation, str]] = {
    "chat": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
}
_KEPT = ("retry-after", "retry-after-ms", "content-type")
_encode = msgspec.json.encode


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
        # sock_read bounds the wait for each read (first byte included); connect bounds the handshake.
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=t.connect_s, sock_read=t.read_s)
        self._limit = backend.max_connections
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Created on first use: a session belongs to the running event loop.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._limit, limit_per_host=self._limit, ttl_dns_cache=60),
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=self._timeout,
                headers=self._headers,
                trust_env=False,
                auto_decompress=True,
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()

    async def send(self, call: UpstreamCall) -> UpstreamResponse:
        url = self._base + _PATHS[call.operation]
        try:
            response = await self._client().post(
                url, data=_encode(call.payload), headers={"x-request-id": call.request_id}, allow_redirects=False
            )
        except TimeoutError as exc:
            raise UpstreamConnectError(f"{self.name}: timed out ({type(exc).__name__})", timeout=True) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamConnectError(f"{self.name}: {type(exc).__name__}") from None
        headers = _kept_headers(response.headers)
        streaming = call.stream and response.status == 200 and "text/event-stream" in headers.get("content-type", "")
        if not streaming:
            try:
                body = await response.read()
            except TimeoutError:
                response.close()
                raise UpstreamConnectError(f"{self.name}: timed out reading the body", timeout=True) from None
            except (aiohttp.ClientError, OSError) as exc:
                response.close()
                raise UpstreamConnectError(f"{self.name}: {type(exc).__name__} reading the body") from None
            response.release()
            return UpstreamResponse(status=response.status, body=body, headers=headers)
        state = _StreamState()
        return UpstreamResponse(
            status=200,
            headers=headers,
            events=self._events(response, state),
            close=_closer(response, state),
            drain=_drainer(response, state),
        )

    async def _events(self, response: aiohttp.ClientResponse, state: _StreamState) -> AsyncIterator[bytes]:
        decoder = state.decoder
        try:
            async for chunk in response.content.iter_any():
                for event in decoder.feed(chunk):
                    if event == DONE:
                        state.done = True
                        return
                    yield event
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise UpstreamStreamBroken(f"{self.name}: stream failed ({type(exc).__name__})") from None
        for event in decoder.close():
            if event == DONE:
                state.done = True
                return
            yield event
        raise UpstreamStreamBroken(f"{self.name}: stream ended without [DONE]")


class _StreamState:
    __slots__ = ("decoder", "done")

    def __init__(self) -> None:
        self.decoder = SSEDecoder()
        self.done = False


def _drainer(response: aiohttp.ClientResponse, state: _StreamState) -> Callable[[], list[bytes]]:
    def drain() -> list[bytes]:
        try:
            data = response.content.read_nowait()
        except (aiohttp.ClientError, RuntimeError, OSError, TimeoutError):
            return []  # the connection already failed: nothing more was received
        return [e for e in state.decoder.feed(data) if e != DONE]

    return drain


def _closer(response: aiohttp.ClientResponse, state: _StreamState) -> Callable[[], Awaitable[None]]:
    async def close() -> None:
        if state.done:
            response.release()  # back to the pool (aiohttp closes it instead if bytes are left unread)
        else:
            response.close()  # abort: the upstream sees the connection drop and stops generating

    return close


def factory(backend: Backend) -> OpenAICompatAdapter:
    return OpenAICompatAdapter(backend)
