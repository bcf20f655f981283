"""The edge of the Responses API: what `POST /v1/responses` adds around the shared pipeline (the answer
translated back, stored when asked) and the stored responses' own endpoints, which run outside it (auth,
then the tenant's store: nothing reaches an upstream):

    GET    /v1/responses/{id}               the stored response object
    DELETE /v1/responses/{id}               {"id", "object": "response.deleted", "deleted": true}
    GET    /v1/responses/{id}/input_items   the items that led to it (`limit`, `order`, `after`)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import msgspec
from litestar import Request, Response, delete, get
from litestar.handlers import BaseRouteHandler

from gateway.api.identity import scope_id_headers
from gateway.api.responses.decode import Exchange
from gateway.api.responses.encode import response_id, responses_object
from gateway.api.responses.native import NativeResponsesStream
from gateway.api.responses.sse_encode import ResponsesStream
from gateway.api.responses.stored import Conversations, storable
from gateway.context import RequestContext
from gateway.errors import InvalidRequest, UpstreamUnavailable
from gateway.reply import JSON, Reply
from gateway.runtime import Gateway

log = logging.getLogger("strait")
_encode = msgspec.json.encode
_decode = msgspec.json.decode
MAX_LIST = 100


async def responses_reply(
    reply: Reply, ctx: RequestContext, conversations: Conversations
) -> ResponsesStream | NativeResponsesStream | None:
    """Turn the pipeline's answer (OpenAI chat's wire format) into a Responses object, in place, and store
    it when the client asked to (before the answer goes out: a next request may name it at once); a stream
    gets the encoder that frames its events and stores its end (returned). Errors are already OpenAI's."""
    exchange = ctx.protocol_state
    if not isinstance(exchange, Exchange) or not 200 <= reply.status < 300:
        return None
    tenant = ctx.principal.tenant if ctx.principal is not None else ""

    async def save(response: dict[str, Any]) -> None:
        # Never at the answer's expense: a response that could not be stored is still answered (logged).
        try:
            record = _encode({"response": response, "input": exchange.input_items})
            await conversations.save(tenant, response_id(ctx.request_id), record)
        except Exception:
            log.exception("request %s: storing the response failed", ctx.request_id)

    native = ctx.native
    if reply.stream is not None:
        stream = ResponsesStream(ctx, exchange, save if exchange.store else None)
        if native is None:
            return stream

        async def keep(body: bytes) -> None:
            await save_native(body, exchange, tenant, conversations, ctx.request_id)

        return NativeResponsesStream(native, stream, keep if exchange.store else None)
    if native is not None and native.body:
        # The upstream spoke Responses: its own answer, byte for byte, stored under its own id.
        reply.body = native.body
        if exchange.store:
            await save_native(native.body, exchange, tenant, conversations, ctx.request_id)
        return None
    try:
        response = responses_object(reply.body, exchange, ctx.request_id)
    except (msgspec.DecodeError, msgspec.ValidationError):
        log.warning("request %s: the upstream's answer is not a chat completion", ctx.request_id)
        error = UpstreamUnavailable("The upstream's answer could not be read.")
        reply.status, reply.body = error.status, error.body()
        return None
    if exchange.store:
        await save(response)
    reply.body = _encode(response)
    reply.media_type = JSON
    return None


class _Id(msgspec.Struct):
    id: str = ""


async def save_native(
    body: bytes, exchange: Exchange, tenant: str, conversations: Conversations, request_id: str
) -> None:
    """Store an upstream's own response object (JSON bytes) under its own id, the one its client was
    given: a later `previous_response_id` or GET names it. Never at the answer's expense (logged)."""
    try:
        rid = msgspec.json.decode(body, type=_Id).id
        if not storable(rid):
            log.warning("request %s: the upstream's response id cannot be stored here; not stored", request_id)
            return
        record = _encode({"response": msgspec.Raw(body), "input": exchange.input_items})
        if not await conversations.save(tenant, rid, record):
            log.warning("request %s: the upstream's response was not stored", request_id)
    except Exception:
        log.exception("request %s: storing the upstream's response failed", request_id)


def _list_args(request: Request[Any, Any, Any]) -> tuple[int, str, str | None]:
    query = request.query_params
    try:
        limit = int(query.get("limit", "20"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIST:
        raise InvalidRequest(f"limit: must be an integer between 1 and {MAX_LIST}.", param="limit")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest("order: must be 'asc' or 'desc'.", param="order")
    return limit, order, query.get("after")


def build_responses_handlers(
    gateway: Gateway, conversations: Callable[[], Conversations], headers_of: Callable[[Any], dict[str, str]]
) -> list[BaseRouteHandler]:
    """`conversations`: the stored responses under the policy in force (its TTL and bounds)."""

    def tenant_of(request: Request[Any, Any, Any]) -> str:
        return gateway.runtime.auth.authenticate(headers_of(request.scope)).tenant

    def answer(request: Request[Any, Any, Any], body: bytes) -> Response[bytes]:
        return Response(body, media_type=JSON, headers=scope_id_headers(request.scope))

    paths = ["/v1/responses/{response_id:str}", "/responses/{response_id:str}"]

    @get(paths)
    async def get_response(request: Request[Any, Any, Any]) -> Response[bytes]:
        tenant = tenant_of(request)
        record = await conversations().record(tenant, str(request.path_params["response_id"]))
        return answer(request, bytes(record.response))

    @delete(paths, status_code=200)
    async def delete_response(request: Request[Any, Any, Any]) -> Response[bytes]:
        tenant = tenant_of(request)
        rid = str(request.path_params["response_id"])
        await conversations().delete(tenant, rid)
        return answer(request, _encode({"id": rid, "object": "response.deleted", "deleted": True}))

    @get([p + "/input_items" for p in paths])
    async def input_items(request: Request[Any, Any, Any]) -> Response[bytes]:
        tenant = tenant_of(request)
        limit, order, after = _list_args(request)
        rid = str(request.path_params["response_id"])
        record = await conversations().record(tenant, rid)
        items: list[dict[str, Any]] = []
        for i, raw in enumerate(record.input):
            item = _decode(raw)
            if isinstance(item, dict):
                # An item the client sent without an id gets a stable one (its place), for `after`.
                item.setdefault("id", f"item_{rid}_{i}")
                item.setdefault("type", "message")
                items.append(item)
        if order == "desc":
            items.reverse()
        if after is not None:
            at = next((i for i, item in enumerate(items) if item["id"] == after), None)
            items = items[at + 1 :] if at is not None else []
        page = items[:limit]
        out = {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit,
        }
        return answer(request, _encode(out))

    return [get_response, delete_response, input_items]
