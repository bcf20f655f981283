"""Reply: what the pipeline hands back to the edge, a whole body or an SSE iterator.

Here, below api/, so that stages (a refusal, a cache hit, the upstream terminal) and the pipeline can
build one without importing the HTTP layer; gateway.api.asgi_send sends it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

JSON = "application/json"


def id_headers(request_id: str, client_request_id: str | None) -> dict[str, str]:
    """`x-request-id` echoes the client's id when it sent one; `x-strait-request-id` is always ours."""
    return {"x-request-id": client_request_id or request_id, "x-strait-request-id": request_id}


@dataclass(slots=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None
    media_type: str = "application/json"
    extra: list[tuple[bytes, bytes]] = field(default_factory=list)
