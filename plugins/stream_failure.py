"""What a failed read of an upstream's stream becomes, the same for every HTTP adapter: the exception the
relay turns into the client's error event (an oversize event, a stall past the read timeout, a broken
connection)."""

from __future__ import annotations

from gateway.contracts import UpstreamStreamBroken
from gateway.upstream.sse import SSELineTooLong


def stream_broken(backend: str, exc: BaseException) -> UpstreamStreamBroken:
    """`exc` is an SSELineTooLong, a TimeoutError or a connection error (aiohttp's or the OS's)."""
    if isinstance(exc, SSELineTooLong):
        return UpstreamStreamBroken(
            f"{backend}: {exc}",
            client_message=(
                f"The upstream sent a stream event larger than the gateway's limit of {exc.limit} bytes "
                "(max_event_bytes of the backend's upstream limits)."
            ),
            code="upstream_event_too_large",
        )
    if isinstance(exc, TimeoutError):
        return UpstreamStreamBroken(
            f"{backend}: stream stalled past the read timeout",
            client_message="The upstream stopped sending before the answer was complete.",
            code="upstream_timeout",
            timeout=True,
        )
    return UpstreamStreamBroken(f"{backend}: stream failed ({type(exc).__name__})")
