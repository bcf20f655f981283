"""Reply: what the pipeline hands back to the edge, a whole body or a stream of events.

Here, below api/, so that stages (a refusal, a cache hit, the upstream terminal) and the pipeline can
build one without importing the HTTP layer; gateway.api.asgi_send sends it, framing a stream's events
with the client protocol's codec (gateway.api.openai.sse_encode).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Protocol

from gateway.contracts import End, Outcome

JSON = "application/json"


def id_headers(request_id: str, client_request_id: str | None) -> dict[str, str]:
    """`x-request-id` echoes the client's id when it sent one; `x-strait-request-id` is always ours."""
    return {"x-request-id": client_request_id or request_id, "x-strait-request-id": request_id}


class EventStream(Protocol):
    """A streamed answer, pulled by its consumer: the upstream stage's event source, and the relay the
    pipeline wraps around it (the taps). Events are the payloads of the upstream's chunks (OpenAI chunk
    JSON), unframed; the edge frames them.

    Ending is two steps, so that the part that must happen exactly once cannot be cut short by a
    cancellation: `stop` (a plain function: how it ended; the relay's taps run in it) and `release`
    (the upstream connection; an awaitable only when that has to wait)."""

    async def next(self) -> list[bytes]:
        """The next events for the client, as many as are ready (one write); [] once the stream is over."""
        ...

    @property
    def finished(self) -> bool:
        """The stream ended by itself with the batch `next` just returned (its end came in the same
        read): the next `next` returns [] at once, so that batch can go out with the end, in one write."""
        ...

    def stop(self, outcome: Outcome | None = None) -> End:
        """End the stream (idempotent: the first call decides, later ones return the same End). None:
        as the stream itself ended (after `next` returned []); an outcome: it stops there (the client
        left: `client_gone`)."""
        ...

    def release(self) -> Awaitable[None] | None:
        """Release the upstream, after `stop` (idempotent): None when done at once, else what to await."""
        ...


async def close_stream(stream: EventStream, outcome: Outcome | None = None) -> End:
    """Stop the stream and release its upstream, the release shielded from the caller's cancellation."""
    end = stream.stop(outcome)
    releasing = stream.release()
    if releasing is not None:
        await asyncio.shield(releasing)
    return end


@dataclass(slots=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    stream: EventStream | None = None
    media_type: str = "application/json"
    # Header pairs already encoded (once per policy), sent after `headers`.
    extra: list[tuple[bytes, bytes]] = field(default_factory=list)
    # A whole answer from the upstream stage: how it ended (usage, status), for the taps. A stream's
    # End comes from the stream when it is over.
    end: End | None = None
