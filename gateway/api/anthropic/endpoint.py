"""The edge of the Anthropic Messages API: what `POST /v1/messages` adds around the shared pipeline (the
answer translated back, errors in Anthropic's envelope, the `request-id` header) and
`POST /v1/messages/count_tokens`, which runs outside it (auth, decode, count: nothing reaches an upstream).
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from gateway.api.anthropic.decode import decode_messages
from gateway.api.anthropic.encode import gateway_error, messages_response, translated_error
from gateway.api.anthropic.sse_encode import MessagesStream
from gateway.api.asgi_send import Receive, Send, body_chunks
from gateway.api.decode import read_body
from gateway.api.identity import request_id_of, scope_id_headers
from gateway.api.inbound import InboundLimits
from gateway.context import RequestContext
from gateway.errors import GatewayError, MethodNotAllowed, ModelNotFound
from gateway.reply import JSON, Reply
from gateway.runtime import Gateway
from gateway.tokens import PromptTokens

log = logging.getLogger("strait")


def messages_reply(reply: Reply, ctx: RequestContext) -> MessagesStream | None:
    """Turn the pipeline's answer (OpenAI's wire format) into Anthropic's, in place; a stream gets the
    encoder that frames its events (returned)."""
    reply.headers["request-id"] = ctx.request_id
    model = ctx.request.model if ctx.request is not None else ctx.route_name
    if reply.stream is not None:
        return MessagesStream(ctx, model)
    if 200 <= reply.status < 300 and ctx.native is not None and ctx.native.body:
        reply.body = ctx.native.body  # the upstream spoke Messages: its own answer, byte for byte
    elif 200 <= reply.status < 300:
        try:
            stops = ctx.request.stop if ctx.request is not None else ()
            reply.body = messages_response(reply.body, model, ctx.request_id, stops)
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.warning("request %s: the upstream's answer is not a chat completion", ctx.request_id)
            reply.status, reply.body = translated_error(502, b"", ctx.request_id)
    else:
        reply.status, reply.body = translated_error(reply.status, reply.body, ctx.request_id)
    reply.media_type = JSON
    return None


async def send_error(exc: GatewayError, scope: Any, send: Send) -> None:
    """A refusal raised before the answer started, in Anthropic's envelope."""
    ids = scope_id_headers(scope)
    request_id = request_id_of(scope)
    status, body = gateway_error(exc, request_id)
    headers = {**ids, **exc.headers, "request-id": request_id, "content-type": JSON, "content-length": str(len(body))}
    raw = [(k.encode("latin-1"), v.encode("latin-1", "replace")) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _headers(scope: Any) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}


async def count_message_tokens(
    gateway: Gateway, limits: InboundLimits, scope: Any, receive: Receive, send: Send
) -> None:
    """`{"input_tokens": N}`: the prompt's tokens as the gateway counts them (gateway.tokens, the same
    count limits and accounting use), the tool definitions included."""
    if scope["method"] != "POST":
        raise MethodNotAllowed(f"Method {scope['method']} is not allowed on {scope['path']}.")
    runtime = gateway.runtime
    headers = _headers(scope)
    principal = runtime.auth.authenticate(headers)
    chunks = body_chunks(receive, limits.body_idle_timeout_s, limits.body_timeout_s)
    body = await read_body(chunks, headers.get("content-length"), runtime.index.policy.server.max_body_bytes)
    request = decode_messages(body, limits, count_only=True)
    if request.model not in runtime.index.routes or not principal.may_use(request.model):
        raise ModelNotFound(f"model: {request.model}", param="model")

    def texts() -> list[str]:
        tools = [f"{t.name} {t.description or ''} {bytes(t.parameters or b'').decode()}" for t in request.tools]
        return request.prompt_texts() + tools

    tokens = await PromptTokens(texts, chat=True).count()
    out = msgspec.json.encode({"input_tokens": tokens})
    ids = scope_id_headers(scope)
    request_id = request_id_of(scope)
    sent = {**ids, "request-id": request_id, "content-type": JSON, "content-length": str(len(out))}
    raw = [(k.encode("latin-1"), v.encode("latin-1", "replace")) for k, v in sent.items()]
    await send({"type": "http.response.start", "status": 200, "headers": raw})
    await send({"type": "http.response.body", "body": out})
