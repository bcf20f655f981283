"""Extension points: the small Protocols plugins implement (adapters, stream taps). Every implementation
runs one contract suite."""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from gateway.canonical import Operation as Operation
from gateway.canonical import Request
from gateway.errors import ErrorBody
from gateway.errors import UpstreamResponseTooLarge as UpstreamResponseTooLarge
from gateway.passthrough import ASKS_FOR_STREAM_USAGE, splice, with_prefill
from gateway.policy.model import Backend
from gateway.upstream.wire import Usage

if TYPE_CHECKING:
    from gateway.context import RequestContext
    from gateway.policy.index import Target


@dataclass(slots=True)
class UpstreamCall:
    """One attempt against one deployment: the canonical request (its `model` is the client's route name)
    and `model`, the deployment's upstream model name, which is what the upstream must be asked for.

    An adapter that speaks the client's protocol sends `passthrough(protocol)`: the client's own bytes with
    only the model replaced (Strait's `strait` field removed; for an OpenAI stream, usage asked for), never
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
    # The JSON `input` (embeddings) or `prompt` (completions) to send instead of the client's: token arrays
    # decoded to text for a model of another vocabulary (gateway.upstream.token_inputs); `request.inputs`
    # holds the same texts.
    inputs: bytes | None = None
    # Mid-stream rescue: the text the client already has, to be continued as the assistant's prefix
    # (gateway.passthrough.with_prefill), and the tokens already produced (off the max_tokens).
    prefill: str | None = None
    prefill_tokens: int = 0

    def passthrough(self, protocol: str) -> bytes | None:
        """The client's body for an upstream speaking `protocol`, or None if the client spoke another."""
        source = self.request.original
        if source is None or source.protocol != protocol:
            return None
        inputs = None if self.inputs is None else ("input" if self.operation == "embeddings" else "prompt", self.inputs)
        stream_usage = self.stream and protocol in ASKS_FOR_STREAM_USAGE
        body = splice(source, self.model, stream_usage=stream_usage, inputs=inputs)
        if self.prefill is not None:
            return with_prefill(body, self.prefill, self.prefill_tokens)
        return body


@dataclass(slots=True)
class NativeAnswer:
    """An answer's own wire format, beside the OpenAI translation the pipeline reads: what an adapter that
    translated a *passthrough* request's answer (the client's protocol is the upstream's) keeps so the
    edge can give the client the upstream's own bytes (the fidelity rule: signatures, unknown fields and
    event order survive exactly), while the taps (accounting, limits, cache, commit) read the translation.

    `body`: a JSON answer's bytes. For a stream, `frames` gets `(event name, data payload)` of every event
    the adapter read, in order, before the translated batch that followed it is yielded (never an `error`
    event: the pipeline reports those itself, redacted); the edge `take`s them as it relays each batch.
    """

    protocol: str
    body: bytes = b""
    frames: deque[tuple[bytes, bytes]] = field(default_factory=deque)

    def take(self) -> list[tuple[bytes, bytes]]:
        out = list(self.frames)
        self.frames.clear()
        return out


@dataclass(slots=True)
class UpstreamResponse:
    """What an adapter got back, already in OpenAI's wire format.

    Non-streaming (or any error status): `body` holds the JSON bytes. Streaming success: `batches`
    yields, per read from the upstream, the SSE `data` payloads it completed (JSON bytes of one chunk
    each; never an empty list): the relay forwards a batch to the client in one write. The terminal
    `[DONE]` may end the last batch (nothing follows it; the relay then sends that batch with the end
    of the answer, in one write) or not be yielded at all. A simple adapter may set `events` instead, one payload at a time. `close`
    releases the upstream connection; it is always called, also when the client leaves. It may be a
    plain function (aiohttp's release and close do not wait: nothing to schedule) or return an
    awaitable, then awaited shielded from the client's cancellation.
    """

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    events: AsyncIterator[bytes] | None = None
    batches: AsyncIterator[list[bytes]] | None = None
    close: Callable[[], Awaitable[None] | None] | None = None
    # Events already received but not yet yielded, without waiting (those buffered when the connection
    # failed included): what a client that left, or a stream that broke, cost too. Called once, after
    # the stream stopped and before `close`.
    drain: Callable[[], list[bytes]] | None = None
    # Set by the dispatcher, not the adapter: the events it read before committing the client's answer
    # to this upstream (up to the first content event: gateway.upstream.commit), relayed first.
    head: list[bytes] | None = None
    # The upstream's own answer for a client of its protocol (NativeAnswer), when the adapter keeps it.
    native: NativeAnswer | None = None

    @property
    def streaming(self) -> bool:
        """A stream (`batches` or `events`): it holds its upstream until closed."""
        return self.batches is not None or self.events is not None


class UpstreamConnectError(Exception):
    """The upstream could not be reached or did not answer in time; safe to try the next target.

    `reset`: the connection was made and then dropped (RST or FIN) before the answer was read, as opposed
    to one never made (refused, unreachable): the dispatcher may retry the same deployment after a reset."""

    def __init__(self, message: str, *, timeout: bool = False, reset: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout
        self.reset = reset


class UpstreamStreamBroken(Exception):
    """An upstream stream failed or ended without `[DONE]`; the client must not be told it completed.

    The message is for the log; `client_message` and `code` go into the client's error event."""

    def __init__(
        self,
        message: str,
        *,
        client_message: str = "The upstream stream ended unexpectedly.",
        code: str = "upstream_stream_broken",
        timeout: bool = False,
        clean_end: bool = False,
    ) -> None:
        super().__init__(message)
        self.client_message = client_message
        self.code = code
        # The upstream went silent longer than the backend's read timeout (the stream `timed_out`).
        self.timeout = timeout
        # The connection ended cleanly (no error, no cut event), only the `[DONE]` line was missing: the
        # relay calls the stream complete if every choice had already finished (finish_reason seen).
        self.clean_end = clean_end


class Adapter(Protocol):
    """Speaks one upstream wire protocol for one backend."""

    async def send(self, call: UpstreamCall) -> UpstreamResponse: ...

    async def aclose(self) -> None: ...


class AdapterFactory(Protocol):
    """Entry point `strait.adapters`: builds the adapter for one backend of the policy. Called when a
    policy is loaded: at start-up before the event loop serves, and on a reload in a worker thread
    (gateway.runtime.compile_runtime), so it only builds: connections, tasks and anything bound to the
    running loop are opened on the adapter's first request."""

    def __call__(self, backend: Backend) -> Adapter: ...


# ---- stream taps: how an answered request ended, told once to every tap ----

# completed: the upstream finished the answer (a JSON body, or a stream up to `[DONE]`);
# client_gone: the client left (or the request was cancelled) before the answer was over;
# upstream_failed: the upstream answered an error, broke the stream, or could not be reached;
# timed_out: the upstream went silent past its read timeout mid-stream.
Outcome = Literal["completed", "client_gone", "upstream_failed", "timed_out"]


@dataclass(slots=True)
class End:
    """How a request that reached the upstream stage ended: what every tap's `on_end` is told, once."""

    outcome: Outcome
    # The status the request is recorded with (a stream that started is 200 unless the upstream
    # failed: 502, or timed out: 504; a client that left while waiting for the upstream: 499).
    status: int
    # The provider's usage, when it sent one (a usage chunk among drained events included).
    usage: Usage | None = None
    # Without provider usage: a stream's own count of what the upstream produced (the meter), or a
    # JSON body to count (`produced`).
    completion_tokens: int | None = None
    # Of those, the reasoning text's (counted with them; 0 when the stream had none).
    reasoning_tokens: int = 0
    produced: Sequence[bytes] = ()
    ttft_s: float | None = None
    # The answer was cut short after the upstream started on it (a stream that did not complete, a
    # client that left while waiting): charged for what was produced, flagged in the usage record.
    partial: bool = False
    # The answer was a stream (its upstream connection was held until now).
    stream: bool = False
    # What the client is told instead of `[DONE]` (already redacted), for a stream that failed.
    error: ErrorBody | None = None
    # The stream's last event: the model of a usage chunk the client asked for and the upstream never sent.
    last_event: bytes | None = None
    # A stream continued after a break (mid-stream rescue): the billed tokens of the attempts before
    # the one this End describes, added to the usage the client is shown (never to this attempt's bill).
    earlier: Usage | None = None
    # Answered from the cache (no upstream ran): "hit" (exact) or "semantic-hit"; `saved` is the cached
    # answer's own usage (the tokens not spent again), `hit_price` the share of its cost charged.
    cache: Literal["hit", "semantic-hit"] | None = None
    saved: Usage | None = None
    hit_price: float = 0.0


class Tap(Protocol):
    """Observes an answer as it goes. Stages (and the pipeline itself) contribute taps; the pipeline
    composes them into one relay per request.

    `on_start` runs when the upstream stage answered with a stream, `on_event` for each event relayed
    (only for taps that define it: a tap that does not costs nothing per event), and `on_end` exactly
    once per request that reached the upstream stage, whichever way it ended (JSON answer, error,
    stream completed or broken, client gone, cancelled). All three are plain functions: they run to
    completion in one turn of the event loop, so a cancellation cannot cut them short; a tap with I/O
    to do queues it (as accounting does)."""

    def on_start(self, ctx: RequestContext) -> None: ...

    def on_event(self, ctx: RequestContext, event: bytes) -> None: ...

    def on_end(self, ctx: RequestContext, end: End) -> None: ...


# ---- capture redactors: run over every captured text before anything is written ----


class TextRedactor(Protocol):
    """Replaces what must not be stored in a captured text (gateway.capture.redact; entry point
    `strait.redactors`, named in a tenant's `capture.redact`). A plain function of the text, called off
    the request path: a plugin's in a worker thread (it may be slow, a model), the built-in pattern
    redactor's a few records per turn of the event loop. It must be pure. Contract (one suite over
    every implementation: tests/capture/test_redactor_contract.py): it returns a str; it is idempotent
    (redacting its own output changes nothing); text with nothing to redact comes back unchanged; it
    never raises on any str."""

    name: str

    def redact(self, text: str) -> str: ...


class RedactorFactory(Protocol):
    """Entry point `strait.redactors`: builds the named redactor (no arguments: it is configured by name)."""

    def __call__(self) -> TextRedactor: ...


# ---- shadow copies: where a candidate's answer goes (gateway.stages.shadow) ----

ShadowOutcome = Literal["failed", "timed_out"]


@dataclass(slots=True, frozen=True)
class ShadowFailure:
    """A shadow copy that brought no answer: how it failed, the candidate's status if it sent one, and a
    short reason for the log (never upstream text: it could hold secrets or internal hosts)."""

    outcome: ShadowOutcome
    status: int | None
    reason: str


class ShadowSink(Protocol):
    """Receives each shadow copy's result next to the live request it copied (its `ctx`: request id,
    tenant, route, the deployment that answered the client, decision id): the place capture stores the
    candidate's answer beside the live one. `answer` is the candidate's OpenAI JSON body (2xx) or how it
    failed; `usage` its reported usage, if any. Called on the event loop after the copy ended, never on a
    client's path: like a tap it must not block (queue any I/O); an exception is logged and counted."""

    def record(
        self,
        live: RequestContext,
        target: Target,
        answer: bytes | ShadowFailure,
        latency_s: float,
        usage: Usage | None,
    ) -> None: ...
