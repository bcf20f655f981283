"""Request bodies: size-limited reading, protocol-neutral (each codec decodes what it read: the OpenAI one
is gateway.api.openai.decode, re-exported here).

A body over the limit is a 413 as soon as that is known (from Content-Length, or while reading).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from gateway.api.asgi_send import BodyChunks
from gateway.api.openai.decode import decode as decode
from gateway.errors import InvalidRequest, PayloadTooLarge


async def read_body(chunks: AsyncIterator[bytes], content_length: str | None, limit: int) -> bytes:
    """Read the body, refusing with 413 as soon as it is known to exceed `limit` (before reading it whole)."""
    if content_length is not None:
        try:
            announced = int(content_length)
        except ValueError:
            raise InvalidRequest("Invalid Content-Length header.") from None
        if announced < 0:
            raise InvalidRequest("Invalid Content-Length header.")
        if announced > limit:
            raise PayloadTooLarge(f"Request body of {announced} bytes exceeds the limit of {limit} bytes.")
    if isinstance(chunks, BodyChunks):
        return await chunks.read_all(limit)  # one coroutine for the whole body (closed after)
    parts: list[bytes] = []
    total = 0
    try:
        async for chunk in chunks:
            total += len(chunk)
            if total > limit:
                raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
            parts.append(chunk)
    finally:
        # Closed now, not when collected: the reader's timeout timer must not outlive the read.
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
    return b"".join(parts)
