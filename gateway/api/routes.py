"""Litestar handlers for the OpenAI-compatible API, the Anthropic Messages API and the operational endpoints."""

from __future__ import annotations

import logging
import time
from asyncio import CancelledError, current_task
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, asgi, get, post
from litestar.handlers import BaseRouteHandler

from gateway.api.anthropic.endpoint import count_message_tokens, messages_reply, send_error
from gateway.api.asgi_send import Receive, Send, StreamCodec, body_chunks, send_reply
from gateway.api.bearer import check_bearer
from gateway.api.feedback import build_feedback_handlers, record_bad_hit
from gateway.api.identity import client_request_id_of, request_id_of, scope_id_headers
from gateway.api.inbound import DEFAULT_LIMITS, InboundLimits
from gateway.api.responses.endpoint import build_responses_handlers, responses_reply
from gateway.api.responses.stored import Conversations
from gateway.api.usage import build_usage_handlers
from gateway.api.wire import model_card, model_list
from gateway.context import RequestContext, answered
from gateway.contracts import Operation
from gateway.errors import (
    GatewayError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    PayloadTooLarge,
    ShuttingDown,
)
from gateway.randomness import random_hex
from gateway.reply import JSON
from gateway.runtime import Gateway

_encode = msgspec.json.encode
log = logging.getLogger("strait")
ASGIEndpoint = Callable[[Any, Receive, Send], Awaitable[None]]
FEEDBACK_MAX_BYTES = 4096


class CacheFeedback(msgspec.Struct, forbid_unknown_fields=False):
    """`POST /v1/cache/feedback`: the response id a cache hit was served with; a reason, optionally."""

    id: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    reason: Annotated[str, msgspec.Meta(max_length=1000)] | None = None


_decode_feedback = msgspec.json.Decoder(CacheFeedback).decode


def _headers(scope: Any) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}


def model_endpoints(gateway: Gateway, limits: InboundLimits = DEFAULT_LIMITS) -> dict[str, ASGIEndpoint]:
    """The model endpoints as plain ASGI callables, by path: Litestar routes them (build_handlers), and
    the app's front (gateway.app) calls them directly for the hot path, before Litestar's router."""

    inflight = gateway.inflight

    def conversations() -> Conversations:
        return stored_responses(gateway)

    async def handle(scope: Any, receive: Receive, send: Send, operation: Operation, protocol: str = "openai") -> None:
        started = time.perf_counter()
        if scope["method"] != "POST":
            raise MethodNotAllowed(f"Method {scope['method']} is not allowed on {scope['path']}.")
        # Counted from here to the last byte (load shedding reads the count; a shutdown cuts what is left).
        task = current_task()
        assert task is not None
        inflight.enter(task)
        # One snapshot of the runtime for the whole request: a reload never mixes two policies in it; held
        # to the last byte, so a reload does not take it apart meanwhile (gateway.teardown).
        runtime = gateway.runtime
        runtime.held.count += 1
        reply = None
        try:
            headers = _headers(scope)
            ctx = RequestContext(
                request_id=request_id_of(scope),
                client_request_id=client_request_id_of(scope),
                operation=operation,
                started=started,
                headers=headers,
                # Read by `decode`, after `auth`: not a byte is parsed for an unauthenticated client.
                body=body_chunks(receive, limits.body_idle_timeout_s, limits.body_timeout_s),
                content_length=headers.get("content-length"),
                decision_id=random_hex(5),
            )
            codec: StreamCodec | None = None
            if protocol != "openai":
                ctx.protocol = protocol
            reply = await runtime.pipeline.run(ctx)
            if protocol == "anthropic":
                codec = messages_reply(reply, ctx)
            elif protocol == "responses":
                codec = await responses_reply(reply, ctx, conversations())
            await send_reply(reply, receive, send, ctx, inflight.was_cut, codec)
            # The answer's last byte is sent: only now may a shadow copy of it start.
            answered(ctx)
            if inflight.draining and inflight.was_cut(task):
                gateway.metrics.child(gateway.metrics.shutdown_cut, "true").inc()  # ended with an error event
        except CancelledError:
            # The shutdown's grace period ran out before the answer began (a stream that had begun is
            # ended by send_reply with an error event): a 503 the client can retry elsewhere.
            if reply is not None or not inflight.was_cut(task):
                raise
            task.uncancel()
            gateway.metrics.child(gateway.metrics.shutdown_cut, "false").inc()
            raise ShuttingDown(
                "The gateway is shutting down and its grace period ran out before the answer began; retry.",
                headers={"retry-after": "1", "connection": "close"},
            ) from None
        finally:
            runtime.held.count -= 1
            inflight.leave(task)

    async def chat_completions(scope: Any, receive: Receive, send: Send) -> None:
        await handle(scope, receive, send, "chat")

    async def completions(scope: Any, receive: Receive, send: Send) -> None:
        await handle(scope, receive, send, "completions")

    async def embeddings(scope: Any, receive: Receive, send: Send) -> None:
        await handle(scope, receive, send, "embeddings")

    async def messages(scope: Any, receive: Receive, send: Send) -> None:
        try:
            await handle(scope, receive, send, "chat", "anthropic")
        except GatewayError as exc:  # raised before the answer started: in Anthropic's envelope
            await send_error(exc, scope, send)
        except Exception:
            # A bug, not the client's doing: the same 500 the app's handler sends, in Anthropic's envelope
            # when the answer has not started (the front's `send` says; anything else re-raises to it).
            if getattr(send, "started", True):
                raise
            log.exception("request %s failed", request_id_of(scope))
            await send_error(InternalError("The gateway failed to process the request."), scope, send)

    async def responses(scope: Any, receive: Receive, send: Send) -> None:
        await handle(scope, receive, send, "chat", "responses")

    async def count_tokens(scope: Any, receive: Receive, send: Send) -> None:
        try:
            await count_message_tokens(gateway, limits, scope, receive, send)
        except GatewayError as exc:
            await send_error(exc, scope, send)

    by_path: dict[str, ASGIEndpoint] = {
        "/v1/chat/completions": chat_completions,
        "/v1/completions": completions,
        "/v1/embeddings": embeddings,
        # Anthropic Messages (gateway.api.anthropic): the same pipeline, translated at both ends.
        "/v1/messages": messages,
        "/v1/messages/count_tokens": count_tokens,
        # OpenAI Responses (gateway.api.responses): the same pipeline, translated at both ends; errors in
        # OpenAI's envelope like the rest of /v1.
        "/v1/responses": responses,
    }
    # A `base_url` without `/v1` (`http://gateway:8080`) is a common misconfiguration that llama.cpp and
    # vLLM accept: the model endpoints answer there too, the same as under /v1.
    return by_path | {path.removeprefix("/v1"): endpoint for path, endpoint in by_path.items()}


def stored_responses(gateway: Gateway) -> Conversations:
    """The stored responses under the policy in force (its `server.responses` bounds)."""
    store = gateway.services.responses
    assert store is not None, "create_app opens the response store"
    return Conversations(store, gateway.runtime.index.policy.server.responses)


def _both(path: str) -> list[str]:
    """A model endpoint's path under /v1 and without it (see model_endpoints)."""
    return [path, path.removeprefix("/v1")]


def build_handlers(
    gateway: Gateway,
    limits: InboundLimits = DEFAULT_LIMITS,
    *,
    metrics_token: str | None = None,
    endpoints: dict[str, ASGIEndpoint] | None = None,
) -> list[BaseRouteHandler]:
    endpoints = model_endpoints(gateway, limits) if endpoints is None else endpoints
    inflight = gateway.inflight

    # The model endpoints are raw ASGI handlers: Litestar routes them and renders their errors (raised
    # before the response starts), but does not parse signatures or build responses for them.
    @asgi(_both("/v1/chat/completions"), copy_scope=False)
    async def chat_completions(scope: Any, receive: Receive, send: Send) -> None:
        await endpoints["/v1/chat/completions"](scope, receive, send)

    @asgi(_both("/v1/completions"), copy_scope=False)
    async def completions(scope: Any, receive: Receive, send: Send) -> None:
        await endpoints["/v1/completions"](scope, receive, send)

    @asgi(_both("/v1/embeddings"), copy_scope=False)
    async def embeddings(scope: Any, receive: Receive, send: Send) -> None:
        await endpoints["/v1/embeddings"](scope, receive, send)

    def visible_routes(request: Request[Any, Any, Any]) -> list[str]:
        runtime = gateway.runtime
        principal = runtime.auth.authenticate(_headers(request.scope))
        return [name for name in runtime.index.routes if principal.may_use(name)]

    @asgi(_both("/v1/messages"), copy_scope=False)
    async def messages(scope: Any, receive: Receive, send: Send) -> None:
        await endpoints["/v1/messages"](scope, receive, send)

    @asgi(_both("/v1/messages/count_tokens"), copy_scope=False)
    async def count_tokens(scope: Any, receive: Receive, send: Send) -> None:
        await endpoints["/v1/messages/count_tokens"](scope, receive, send)

    @asgi(_both("/v1/responses"), copy_scope=False)
    async def responses(scope: Any, receive: Receive, send: Send) -> None:
        await endpoints["/v1/responses"](scope, receive, send)

    @get(_both("/v1/models"))
    async def list_models(request: Request[Any, Any, Any]) -> Response[bytes]:
        cards = [model_card(name, gateway.started_at) for name in visible_routes(request)]
        return Response(_encode(model_list(cards)), media_type=JSON, headers=scope_id_headers(request.scope))

    @get(_both("/v1/models/{model_id:path}"))
    async def get_model(request: Request[Any, Any, Any]) -> Response[bytes]:
        # Read from the request, not declared as a handler parameter (Litestar deprecates inferred ones).
        name = str(request.path_params["model_id"]).lstrip("/")
        if name not in visible_routes(request):
            raise ModelNotFound(f"The model '{name}' does not exist or you do not have access to it.", param="model")
        card = model_card(name, gateway.started_at)
        return Response(_encode(card), media_type=JSON, headers=scope_id_headers(request.scope))

    @get("/admin/decisions/{decision_id:str}")
    async def get_decision(request: Request[Any, Any, Any]) -> Response[bytes]:
        """The full filter/rank table of a decision made with `x-strait-explain: 1`; only its own tenant sees it."""
        principal = gateway.runtime.auth.authenticate(_headers(request.scope))
        decision_id = str(request.path_params["decision_id"])
        decision = gateway.decisions.get(principal.tenant, decision_id)
        if decision is None:
            raise NotFound(f"No decision '{decision_id}' is kept for your tenant (ask with x-strait-explain: 1).")
        return Response(_encode(decision), media_type=JSON, headers=scope_id_headers(request.scope))

    @post("/v1/cache/feedback", status_code=200)
    async def cache_feedback(request: Request[Any, Any, Any]) -> Response[bytes]:
        """Report a cached answer as wrong (by the response id a hit was served with): it leaves the cache
        and its namespace's threshold goes up. Only the tenant it was served to can report it."""
        runtime = gateway.runtime
        principal = runtime.auth.authenticate(_headers(request.scope))
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > FEEDBACK_MAX_BYTES:
                raise PayloadTooLarge(f"A feedback body is at most {FEEDBACK_MAX_BYTES} bytes.")
        try:
            report = _decode_feedback(bytes(body))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise InvalidRequest(f"Invalid feedback body: {exc}", param="id") from None
        cache = runtime.cache
        # A hit served to a /v1/messages client carries the same id as `msg_...` (gateway.api.anthropic), to a
        # /v1/responses client as `resp_...` (gateway.api.responses).
        served_id = report.id
        for prefix in ("msg_", "resp_"):
            if report.id.startswith(prefix):
                served_id = "chatcmpl-" + report.id.removeprefix(prefix)
        served = await cache.store.served(principal.tenant, served_id) if cache is not None else None
        if cache is None or served is None:
            raise NotFound(f"No cached answer '{report.id}' was served to your tenant recently.")
        reports = await cache.report_bad("feedback", served[0], served[1])
        # The hit's capture, if its tenant captures, gets the report as implicit feedback.
        await record_bad_hit(gateway, principal.tenant, principal.key_id, served_id, report.reason)
        out = {"object": "cache.feedback", "id": report.id, "recorded": True, "namespace_reports": reports}
        return Response(_encode(out), media_type=JSON, headers=scope_id_headers(request.scope))

    @get("/healthz")
    async def healthz(request: Request[Any, Any, Any]) -> Response[bytes]:
        return Response(b'{"status":"ok"}', media_type=JSON, headers=scope_id_headers(request.scope))

    @get("/readyz")
    async def readyz(request: Request[Any, Any, Any]) -> Response[bytes]:
        index = gateway.runtime.index
        draining = inflight.draining
        ready = bool(index.routes) and bool(index.backends) and not draining
        status = gateway.store.status()
        body = _encode(
            {
                # `draining`: shutting down (SIGTERM), in-flight requests finishing; take it out of rotation.
                "status": "ready" if ready else ("draining" if draining else "not_ready"),
                "policy_version": index.version,
                "routes": len(index.routes),
                "backends": len(index.backends),
                # Informational: with Redis away the gateway still serves (declared failure modes).
                "state": {"kind": status.kind, "shared": status.shared, "breaker": status.breaker},
                "usage_queued": gateway.writer.queued(),
                "usage_spooled": gateway.writer.spool.pending(),
            }
        )
        return Response(
            body,
            status_code=200 if ready else 503,
            media_type=JSON,
            headers=scope_id_headers(request.scope),
        )

    @get("/metrics")
    async def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
        if metrics_token is not None:
            check_bearer(request.headers.get("authorization"), metrics_token)
        return Response(gateway.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    handlers = [
        chat_completions,
        completions,
        embeddings,
        messages,
        count_tokens,
        responses,
        list_models,
        get_model,
        get_decision,
        cache_feedback,
        healthz,
        readyz,
        metrics,
    ]
    responses_handlers = build_responses_handlers(gateway, lambda: stored_responses(gateway), _headers)
    return (
        handlers
        + responses_handlers
        + build_usage_handlers(gateway, scope_id_headers, _headers)
        + build_feedback_handlers(gateway, scope_id_headers, _headers)
    )
