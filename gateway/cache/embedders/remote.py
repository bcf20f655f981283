"""The remote embedder: any OpenAI-compatible embeddings API (a hosted provider, a local server, or one of
Strait's own routes), over aiohttp.

Every failure (connection refused, timeout, a non-200 status, a body that is not the expected JSON, a
vector of the wrong size, too few vectors) is an `EmbedderError`, which the cache stage counts as a miss.
The answer's size is bounded before it is parsed, and the key is never part of an error message.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import msgspec

from gateway.cache.embedders.spec import EmbedderSpec
from gateway.cache.errors import CacheDependencyError, EmbedderError

if TYPE_CHECKING:
    import aiohttp
    import numpy as np
    import numpy.typing as npt

# An answer larger than this per input is refused: about 20 bytes of JSON a float leaves room for 3,072-d vectors.
MAX_ANSWER_BYTES_PER_TEXT = 64 * 1024
# Texts per request: keeps each answer bounded.
BATCH = 64


class _Item(msgspec.Struct):
    embedding: list[float]
    index: int = 0


class _Answer(msgspec.Struct):
    data: list[_Item]


_DECODER = msgspec.json.Decoder(_Answer)


async def _read_at_most(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, or its first `limit` bytes when it is longer (`read(n)` alone may stop at any chunk)."""
    chunks: list[bytes] = []
    total = 0
    while total < limit:
        chunk = await resp.content.read(limit - total)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def resolve_key(ref: str | None, environ: Mapping[str, str]) -> str | None:
    if ref is None:
        return None
    if not ref.startswith("env:") or len(ref) == 4:
        raise ValueError("api_key must be an env:NAME reference, never the secret itself")
    name = ref.removeprefix("env:")
    value = environ.get(name)
    if not value:
        raise ValueError(f"environment variable {name} (api_key: {ref}) is not set")
    return value


class RemoteEmbedder:
    """`Embedder` over POST `{base_url}/embeddings`. `dims` is the spec's, or 0 until the first answer
    fixes it; after that every answer must have that size."""

    def __init__(self, spec: EmbedderSpec, *, environ: Mapping[str, str] | None = None) -> None:
        try:
            import numpy  # noqa: F401  (the vectors are numpy arrays)
        except ImportError as exc:
            raise CacheDependencyError("numpy", what="the remote embedder") from exc
        if not spec.base_url:
            raise ValueError(f"embedder {spec.name!r}: a remote embedder needs base_url")
        if not spec.model:
            raise ValueError(f"embedder {spec.name!r}: a remote embedder needs model")
        if spec.timeout_s <= 0:
            raise ValueError(f"embedder {spec.name!r}: timeout_s must be positive")
        self._url = spec.base_url.rstrip("/") + "/embeddings"
        self._model = spec.model
        self._timeout_s = spec.timeout_s
        key = resolve_key(spec.api_key, os.environ if environ is None else environ)
        self._headers = {"content-type": "application/json"}
        if key:
            self._headers["authorization"] = f"Bearer {key}"
        self.id = f"remote-{spec.model}"
        # The vector space is the backend's model at that address: another URL or model is another space.
        self.version = hashlib.sha256(f"{self._url}\n{spec.model}".encode()).hexdigest()[:16]
        self.dims = spec.dims or 0
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout_s),
                connector=aiohttp.TCPConnector(limit=32),
            )
        return self._session

    async def _post(self, texts: list[str]) -> list[list[float]]:
        import aiohttp

        body = msgspec.json.encode({"model": self._model, "input": texts, "encoding_format": "float"})
        limit = MAX_ANSWER_BYTES_PER_TEXT * max(1, len(texts))
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._client().post(self._url, data=body, headers=self._headers) as resp:
                    if resp.status != 200:
                        raise EmbedderError(f"remote embedder {self.id}: HTTP {resp.status}")
                    raw = await _read_at_most(resp, limit + 1)
        except TimeoutError as exc:
            raise EmbedderError(f"remote embedder {self.id}: no answer within {self._timeout_s}s") from exc
        except aiohttp.ClientError as exc:
            raise EmbedderError(f"remote embedder {self.id}: {type(exc).__name__}") from exc
        if len(raw) > limit:
            raise EmbedderError(f"remote embedder {self.id}: answer larger than {limit} bytes")
        try:
            answer = _DECODER.decode(raw)
        except msgspec.DecodeError as exc:
            raise EmbedderError(f"remote embedder {self.id}: not an embeddings answer ({exc})") from exc
        if len(answer.data) != len(texts):
            raise EmbedderError(f"remote embedder {self.id}: {len(answer.data)} vectors for {len(texts)} inputs")
        if sorted(item.index for item in answer.data) != list(range(len(texts))):
            raise EmbedderError(f"remote embedder {self.id}: answer indexes are not 0..{len(texts) - 1}")
        return [item.embedding for item in sorted(answer.data, key=lambda item: item.index)]

    async def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        import numpy as np

        batch = list(texts)
        rows: list[list[float]] = []
        for start in range(0, len(batch), BATCH):
            rows.extend(await self._post(batch[start : start + BATCH]))
        if not rows:
            return np.empty((0, self.dims), dtype=np.float32)
        sizes = {len(r) for r in rows}
        size = sizes.pop()
        if sizes or size == 0 or (self.dims and size != self.dims):
            raise EmbedderError(
                f"remote embedder {self.id}: vectors of size {size}, expected {self.dims or 'one size'}"
            )
        matrix: npt.NDArray[np.float32] = np.asarray(rows, dtype=np.float32)
        if not np.isfinite(matrix).all():
            raise EmbedderError(f"remote embedder {self.id}: vectors with NaN or infinity")
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        if (norms == 0).any():
            raise EmbedderError(f"remote embedder {self.id}: a zero vector")
        self.dims = size
        normalised: npt.NDArray[np.float32] = (matrix / norms).astype(np.float32)
        return normalised

    async def warm(self) -> None:
        """Nothing to load; the connection opens with the first request."""

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def factory(spec: EmbedderSpec, environ: Mapping[str, str]) -> RemoteEmbedder:
    """Entry point `strait.embedders` `remote`."""
    return RemoteEmbedder(spec, environ=environ)
