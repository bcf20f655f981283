"""Extension points: the small Protocols plugins implement. Every implementation runs one contract suite."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from gateway.canonical import Operation as Operation
from gateway.canonical import Request
from gateway.errors import UpstreamResponseTooLarge as UpstreamResponseTooLarge
from gateway.passthrough import splice
from gateway.policy.model import Backend


@dataclass(slots=True)
class UpstreamCall:
    """One attempt against one deployment: the canonical request (its `model` is the client's route name)
    and `model`, the deployment's upstream model name, which is what the upstream must be asked for.

    An adapter that speaks the client's protocol sends `passthrough(protocol)`: the client's own bytes with
    only the model replaced (Strait's `strait` field removed; for a stream, usage asked for), never
    re-encoded. Any other adapter translates `request`. A stream always asks the upstream for usage: the
    relay accounts every token and strips the usage chunk if the client did not ask for it.
    """

    operation: Operation
    request: Request
    model: str
    stream: bool
    request_id: str
    # Extra headers for the upstream: the trace context (`traceparent`) when tracing is on.
    headers: dict[str, str] | None = None

    def passthrough(self, protocol: str) -> bytes | None:
        """The client's body for an upstream speaking `protocol`, or None if the client spoke another."""
        source = self.request.original
        if source is None or source.protocol != protocol:
            return None
        return splice(source, self.model, stream_usage=self.stream)


@dataclass(slots=True)
class UpstreamResponse:
    """What an adapter got back, already in OpenAI's wire format.

    Non-streaming (or any error status): `body` holds the JSON bytes. Streaming success: `events`
    yields each SSE `data` payload (JSON bytes of one chunk; the terminal `[DONE]` is not yielded),
    and `close` releases the upstream connection; it is always awaited, also when the client leaves.
    """

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    events: AsyncIterator[bytes] | None = None
    close: Callable[[], Awaitable[None]] | None = None
    # Events already received but not yet yielded, without waiting (those buffered when the connection
    # failed included): what a client that left, or a stream that broke, cost too. Called once, after
    # `events` stopped and before `close`.
    drain: Callable[[], list[bytes]] | None = None


class UpstreamConnectError(Exception):
    """The upstream could not be reached or did not answer in time; safe to try the next target."""

    def __init__(self, message: str, *, timeout: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout


class UpstreamStreamBroken(Exception):
    """An upstream stream failed or ended without `[DONE]`; the client must not be told it completed.

    The message is for the log; `client_message` and `code` go into the client's error event."""

    def __init__(
        self,
        message: str,
        *,
        client_message: str = "The upstream stream ended unexpectedly.",
        code: str = "upstream_stream_broken",
    ) -> None:
        super().__init__(message)
        self.client_message = client_message
        self.code = code


class Adapter(Protocol):
    """Speaks one upstream wire protocol for one backend."""

    async def send(self, call: UpstreamCall) -> UpstreamResponse: ...

    async def aclose(self) -> None: ...


class AdapterFactory(Protocol):
    """Entry point `strait.adapters`: builds the adapter for one backend of the policy."""

    def __call__(self, backend: Backend) -> Adapter: ...
