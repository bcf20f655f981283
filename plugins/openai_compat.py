"""`openai`: any OpenAI-compatible upstream (OpenAI, vLLM, SGLang, TGI, llama.cpp, Ollama, Together, Groq,
DeepSeek, Fireworks...).

One pooled HTTP client per backend. The client's own headers are never forwarded: the upstream sees
only the backend's key from the environment (`api_key: env:NAME`), a content type and the request id.
Streams are relayed event by event; the upstream response is closed by the caller through `close`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from typing import Final

import httpx
import msgspec
from httpx_aiohttp import AiohttpTransport

from gateway.api.sse import DONE, SSEDecoder
from gateway.contracts import Operation, UpstreamCall, UpstreamConnectError, UpstreamResponse, UpstreamStreamBroken
from gateway.policy.model import Backend

_PATHS: Final[dict[Operation, str]] = {
    "chat": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
}
_encode = msgspec.json.encode


def resolve_secret(ref: str | None, environ: Mapping[str, str]) -> str | None:
    if ref is None:
        return None
    name = ref.removeprefix("env:")
    value = environ.get(name)
    if not value:
        raise ValueError(f"environment variable {name} (api_key: {ref}) is not set")
    return value


def _kept_headers(headers: httpx.Headers) -> dict[str, str]:
    """Only the upstream headers a client may need (rate-limit hints); never internal ones."""
    return {
        k: v
        for k, v in headers.items()
        if k in ("retry-after", "retry-after-ms", "content-type") or k.startswith("x-ratelimit-")
    }


class OpenAICompatAdapter:
    def __init__(
        self, backend: Backend, *, environ: Mapping[str, str] | None = None, transport: str | None = None
    ) -> None:
        if not backend.base_url:
            raise ValueError(f"backend {backend.name}: base_url is required")
        env = os.environ if environ is None else environ
        self.name = backend.name
        key = resolve_secret(backend.api_key, env)
        headers = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
        if key:
            headers["authorization"] = f"Bearer {key}"
        t = backend.timeouts
        limits = httpx.Limits(
            max_connections=backend.max_connections, max_keepalive_connections=backend.max_connections
        )
        kind = transport or env.get("STRAIT_UPSTREAM_TRANSPORT", "aiohttp")
        self._client = httpx.AsyncClient(
            base_url=backend.base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(connect=t.connect_s, read=t.read_s, write=t.read_s, pool=t.connect_s),
            transport=AiohttpTransport(limits=limits, trust_env=False) if kind == "aiohttp" else None,
            limits=limits,
            follow_redirects=False,
            trust_env=False,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def send(self, call: UpstreamCall) -> UpstreamResponse:
        request = self._client.build_request(
            "POST", _PATHS[call.operation], content=_encode(call.payload), headers={"x-request-id": call.request_id}
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise UpstreamConnectError(f"{self.name}: timed out ({type(exc).__name__})", timeout=True) from None
        except (httpx.TransportError, OSError) as exc:
            raise UpstreamConnectError(f"{self.name}: {type(exc).__name__}") from None
        headers = _kept_headers(response.headers)
        streaming = (
            call.stream and response.status_code == 200 and "text/event-stream" in headers.get("content-type", "")
        )
        if not streaming:
            try:
                body = await response.aread()
            except httpx.TimeoutException:
                raise UpstreamConnectError(f"{self.name}: timed out reading the body", timeout=True) from None
            except httpx.TransportError as exc:
                raise UpstreamConnectError(f"{self.name}: {type(exc).__name__} reading the body") from None
            finally:
                await response.aclose()
            return UpstreamResponse(status=response.status_code, body=body, headers=headers)
        return UpstreamResponse(status=200, headers=headers, events=self._events(response), close=response.aclose)

    async def _events(self, response: httpx.Response) -> AsyncIterator[bytes]:
        decoder = SSEDecoder()
        try:
            async for chunk in response.aiter_raw():
                for event in decoder.feed(chunk):
                    if event == DONE:
                        return
                    yield event
        except httpx.HTTPError as exc:
            raise UpstreamStreamBroken(f"{self.name}: stream failed ({type(exc).__name__})") from None
        for event in decoder.close():
            if event == DONE:
                return
            yield event
        raise UpstreamStreamBroken(f"{self.name}: stream ended without [DONE]")


def factory(backend: Backend) -> OpenAICompatAdapter:
    return OpenAICompatAdapter(backend)
