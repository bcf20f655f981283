"""Usage queries: `GET /v1/usage` (a tenant's own, with its API key) and `GET /admin/usage` (every
tenant, with an admin key from `server.admin_keys`). Both read the ledger's per-day aggregates."""

from __future__ import annotations

import datetime as dt
from typing import Any, get_args

import msgspec
from litestar import Request, Response, get
from litestar.handlers import HTTPRouteHandler

from gateway.accounting.ledger import LedgerUnavailable
from gateway.accounting.records import Dimension, UsageRow
from gateway.errors import AuthenticationFailed, GatewayError, InvalidRequest
from gateway.policy.index import key_digest
from gateway.reply import JSON
from gateway.runtime import Gateway
from gateway.stages.auth import bearer_key

MAX_DAYS = 366


class UsageList(msgspec.Struct, kw_only=True):
    data: list[UsageRow]
    since: str
    until: str
    by: str
    object: str = "list"


def _date(value: str | None, default: dt.date, name: str) -> dt.date:
    if value is None:
        return default
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"'{name}' must be a date as YYYY-MM-DD.", param=name) from None


def parse_query(query: Any) -> tuple[dt.date, dt.date, Dimension]:
    today = dt.datetime.now(dt.UTC).date()
    since = _date(query.get("since"), today, "since")
    until = _date(query.get("until"), today, "until")
    by = query.get("by", "route")
    if by not in get_args(Dimension):
        raise InvalidRequest(f"'by' must be one of {', '.join(get_args(Dimension))}.", param="by")
    if until < since or (until - since).days > MAX_DAYS:
        raise InvalidRequest(f"'since'..'until' must be an ordered range of at most {MAX_DAYS} days.", param="since")
    return since, until, by


class LedgerDown(GatewayError):
    status = 503
    type = "server_error"
    code = "ledger_unavailable"


def build_usage_handlers(gateway: Gateway, id_headers_of: Any, headers_of: Any) -> list[HTTPRouteHandler]:
    async def answer(request: Request[Any, Any, Any], tenants: list[str]) -> Response[bytes]:
        since, until, by = parse_query(request.query_params)
        try:
            rows = await gateway.ledger.totals(tenants, since, until, by)
        except LedgerUnavailable:
            raise LedgerDown("Usage is not readable right now; records are kept and will be counted.") from None
        body = msgspec.json.encode(UsageList(data=rows, since=since.isoformat(), until=until.isoformat(), by=by))
        return Response(body, media_type=JSON, headers=id_headers_of(request.scope))

    @get("/v1/usage")
    async def own_usage(request: Request[Any, Any, Any]) -> Response[bytes]:
        principal = gateway.runtime.auth.authenticate(headers_of(request.scope))
        # A tenant sees its own usage only (object-level check: no tenant parameter is honoured here).
        return await answer(request, [principal.tenant])

    @get("/admin/usage")
    async def all_usage(request: Request[Any, Any, Any]) -> Response[bytes]:
        index = gateway.runtime.index
        key = bearer_key(headers_of(request.scope))
        if key is None or key_digest(key) not in index.admin_digests:
            raise AuthenticationFailed("An admin key is required (server.admin_keys in the policy).")
        tenant = request.query_params.get("tenant")
        tenants = [tenant] if tenant else sorted(index.tenants) or [index.open_tenant.name]
        return await answer(request, tenants)

    return [own_usage, all_usage]
