"""RequestContext: what one request carries through the pipeline. Each field names its writer and readers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.accounting.counts import TokenCounts
from gateway.canonical import Request
from gateway.contracts import NativeAnswer, Operation
from gateway.policy.engine import RoutePlan
from gateway.policy.index import Principal, Target
from gateway.policy.model import Route
from gateway.state.base import Ticket
from gateway.tokens import PromptTokens
from gateway.upstream.redact import NO_SECRETS, Redactor

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from gateway.stages.cache import CacheTicket
    from gateway.stages.capture import StreamCapture
    from gateway.upstream.retry import BudgetClaim


@dataclass(slots=True, frozen=True)
class ContinuedAttempt:
    """A stream that broke after sending content, continued on another deployment (`resume: continue`)
    or, held whole and never shown to the client, restarted there (`resume: restart`): what it produced
    is billed at its own deployment's price (estimated when it sent no usage)."""

    target: Target
    status: int
    seconds: float
    # What it produced, by kind (the provider's usage, or the prompt and the relayed text counted).
    tokens: TokenCounts
    estimated: bool
    # Restarted (`resume: restart`): `seconds` is the attempt's own duration and the client's first
    # token is the answering deployment's; continued: `seconds` runs from the request's start.
    restarted: bool = False


@dataclass(slots=True)
class RequestContext:
    # Written by the API edge; read by every stage. Minted by the gateway (gateway.api.identity): the
    # only key of records, slots, reservations, tickets and decisions.
    request_id: str
    operation: Operation
    started: float
    headers: dict[str, str]
    # The client's protocol (the edge's endpoint): which codec decodes the body and encodes the answer
    # ("openai"; "anthropic" for /v1/messages and "responses" for /v1/responses, whose answers the edge
    # translates back).
    protocol: str = "openai"
    # Written by `decode` for a protocol whose answer repeats the request's own data (Responses: its
    # gateway.api.responses.decode.Exchange); read only by that protocol's encoder at the edge.
    protocol_state: object | None = None
    # The body as it arrives and the announced Content-Length; written by the edge, read (once, then
    # set to None) by `decode`, which runs after `auth`: an unauthenticated client costs no parsing.
    body: AsyncIterator[bytes] | None = None
    content_length: str | None = None
    # Written by `decode`: the canonical request (the client's bytes kept in it for passthrough), the
    # route it names (`model`), and whether it streams; read by route, limits and upstream.
    request: Request | None = None
    route_name: str = ""
    stream: bool = False
    # The client's own well-formed `x-request-id`: echoed and recorded, never a key.
    client_request_id: str | None = None
    # Written by `decode`: whether the client asked for the usage chunk (stream_options.include_usage);
    # read by the relay.
    include_usage: bool = False
    # Written by `auth`; read by `route` and later by limits and accounting.
    principal: Principal | None = None
    # Short id of the routing decision (x-strait-decision); written by the edge.
    decision_id: str = ""
    # Written by `decode`: the prompt's tokens, counted only when a reader needs them (`await
    # ctx.prompt_tokens.count()`: route for a rule on prompt size, a context window or cost ranking;
    # limits for a token limit or budget; accounting when the upstream reported no usage).
    prompt_tokens: PromptTokens = field(default_factory=PromptTokens)
    # Written by `route`: the policy route, the ordered fallback plan and the decision table (for
    # explain); read by upstream, limits and accounting. `limits` rewrites route, plan, route_plan
    # and route_name when a spent budget switches to the plan's downgrade.
    route: Route | None = None
    plan: tuple[Target, ...] = ()
    route_plan: RoutePlan | None = None
    # Written by `upstream`: the target that answered.
    target: Target | None = None
    # Written by `upstream` (gateway.stages.respond): the answering upstream's own wire format, kept by an
    # adapter of the client's protocol (contracts.NativeAnswer); read by that protocol's edge, which
    # relays it instead of re-encoding the translation. None for a cache hit or a continued stream.
    native: NativeAnswer | None = None
    # Written by `limits`: what to hand back to the store once the usage is known.
    ticket: Ticket | None = None
    # While a stream lasts: the timer that renews the ticket's lease; written and cancelled by accounting.
    lease_timer: asyncio.Handle | None = None
    # Written by `upstream` (the runtime's, knowing its backends' secrets); read by the relay, which
    # redacts upstream error text with it.
    redact: Redactor = NO_SECRETS
    # Written by `upstream`: attempts that failed before the one that answered (target, outcome, seconds).
    failed_attempts: list[tuple[Target, int, float]] = field(default_factory=list)
    # Written by `upstream`: this request's share of its route's retry budget (active, and its retry in
    # flight), from dispatch until the upstream stage's tap ends it with the answer.
    retry_claim: BudgetClaim | None = None
    # Written by `upstream`: the plan index of `target` and the attempts made so far (a mid-stream
    # rescue goes on from there), and the streams that broke after sending content and were continued
    # or restarted on another deployment (billed for what they produced: written by the relay for a
    # continued one, by the dispatcher for a restarted one; read by accounting).
    plan_index: int = 0
    attempts: int = 0
    continued: list[ContinuedAttempt] = field(default_factory=list)
    # Written by accounting: the release of this request's concurrency slots, to be awaited by the edge
    # before the answer's last byte (a sequential client must find its slot free).
    settling: asyncio.Future[None] | None = None
    # Written by `limits`: every concurrency limit of the ticket had ample free slots at admission
    # (gateway.stages.limits.release_can_wait), so accounting may batch its release instead.
    release_can_wait: bool = False
    # Tracing (only when configured): the request's SERVER span, written by the pipeline and ended by its
    # span tap (gateway.spans.SpanTap) when the answer is over; the usage it reports, by accounting.
    span: Span | None = None
    usage_in: int | None = None
    usage_out: int | None = None
    ttft_s: float | None = None
    # Set by accounting once the request is recorded (its log line written); read by the refusal path.
    accounted: bool = False
    # Headers any stage adds to the response (rate-limit state, budget downgrade).
    extra_headers: dict[str, str] = field(default_factory=dict)
    # Written by taps at the end of an answer (the shadow's: queue a copy of the request), run by the edge
    # once the answer's last byte is sent (`answered`): work that must never delay or touch the client's answer.
    after_answer: list[Callable[[], None]] | None = None
    # Written by `cache` on a miss it may store (its scope, settings and the query's vector); read by its
    # `on_response`. None: the cache is not in play for this request.
    cache: CacheTicket | None = None
    # Written by the pipeline for a whole answer (not a stream), before the taps' `on_end`: its body (the
    # OpenAI JSON every tap reads); read by capture.
    answer_body: bytes | None = None
    # Written by the capture tap when a consenting tenant's stream starts (its chunks as relayed; read by
    # the same tap at the end), and at the end of a captured JSON answer (no chunks): the consent it was
    # captured under, which the shadow sink reads (gateway.capture.shadow_sink). None: not captured.
    capture: StreamCapture | None = None


def answered(ctx: RequestContext) -> None:
    """The client has the whole answer: run what taps left for this moment, each once; one that fails is
    logged and does not stop the others (the answer is already sent: nothing here may reach the client)."""
    callbacks, ctx.after_answer = ctx.after_answer, None
    for callback in callbacks or ():
        try:
            callback()
        except Exception:
            logging.getLogger("strait").exception("request %s: after-answer work failed", ctx.request_id)
