"""The capture store's SQL, one text for SQLite and PostgreSQL (only the placeholder differs: `?` / `%s`).

Two tables: `strait_captures` (one row per captured request: a few indexed columns and the record's JSON)
and `strait_feedback` (one row per signal, keyed to a capture by `request_id`). Pages are read by keyset
(`ts_ms`, `request_id`), so an export of millions of rows never holds more than a page.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from gateway.capture.records import CaptureRecord, Feedback

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS strait_captures (
        request_id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        ts_ms BIGINT NOT NULL,
        route TEXT NOT NULL,
        model TEXT,
        client_request_id TEXT,
        response_id TEXT,
        record TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS strait_captures_ts ON strait_captures (ts_ms, request_id)",
    "CREATE INDEX IF NOT EXISTS strait_captures_tenant ON strait_captures (tenant, ts_ms, request_id)",
    "CREATE INDEX IF NOT EXISTS strait_captures_route ON strait_captures (route, ts_ms, request_id)",
    "CREATE INDEX IF NOT EXISTS strait_captures_model ON strait_captures (model, ts_ms, request_id)",
    "CREATE INDEX IF NOT EXISTS strait_captures_client ON strait_captures (tenant, client_request_id)",
    "CREATE INDEX IF NOT EXISTS strait_captures_response ON strait_captures (tenant, response_id)",
    """CREATE TABLE IF NOT EXISTS strait_feedback (
        id TEXT PRIMARY KEY,
        request_id TEXT NOT NULL,
        tenant TEXT NOT NULL,
        ts_ms BIGINT NOT NULL,
        kind TEXT NOT NULL,
        record TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS strait_feedback_request ON strait_feedback (request_id, ts_ms)",
)

INSERT_CAPTURE = (
    "INSERT INTO strait_captures (request_id, tenant, ts_ms, route, model, client_request_id, response_id, record) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (request_id) DO NOTHING"
)
INSERT_FEEDBACK = (
    "INSERT INTO strait_feedback (id, request_id, tenant, ts_ms, kind, record) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING"
)
GET = "SELECT record FROM strait_captures WHERE tenant = ? AND request_id = ?"
BY_CLIENT_ID = (
    "SELECT request_id FROM strait_captures WHERE tenant = ? AND client_request_id = ? "
    "ORDER BY ts_ms DESC, request_id DESC LIMIT 1"
)
BY_RESPONSE_ID = (
    "SELECT request_id FROM strait_captures WHERE tenant = ? AND response_id = ? "
    "ORDER BY ts_ms DESC, request_id DESC LIMIT 1"
)
TENANTS = "SELECT DISTINCT tenant FROM strait_captures"
DELETE_FEEDBACK_BEFORE = (
    "DELETE FROM strait_feedback WHERE request_id IN "
    "(SELECT request_id FROM strait_captures WHERE tenant = ? AND ts_ms < ?)"
)
DELETE_BEFORE = "DELETE FROM strait_captures WHERE tenant = ? AND ts_ms < ?"
COUNT_CAPTURES = "SELECT count(*) FROM strait_captures"
COUNT_FEEDBACK = "SELECT count(*) FROM strait_feedback"


def capture_rows(records: Sequence[CaptureRecord]) -> list[tuple[object, ...]]:
    return [
        (
            r.request_id,
            r.tenant,
            r.ts_ms,
            r.route,
            r.model,
            r.client_request_id,
            r.response_id,
            msgspec.json.encode(r).decode(),
        )
        for r in records
    ]


def feedback_rows(items: Sequence[Feedback]) -> list[tuple[object, ...]]:
    return [(f.id, f.request_id, f.tenant, f.ts_ms, f.kind, msgspec.json.encode(f).decode()) for f in items]


def select_page(
    *,
    tenant: str | None,
    route: str | None,
    model: str | None,
    since_ms: int | None,
    until_ms: int | None,
    after: tuple[int, str] | None,
    limit: int,
) -> tuple[str, list[object]]:
    """A page of captures matching every given filter, in (ts_ms, request_id) order."""
    where: list[str] = []
    params: list[object] = []
    for column, value in (("tenant", tenant), ("route", route), ("model", model)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if since_ms is not None:
        where.append("ts_ms >= ?")
        params.append(since_ms)
    if until_ms is not None:
        where.append("ts_ms < ?")
        params.append(until_ms)
    if after is not None:
        where.append("(ts_ms > ? OR (ts_ms = ? AND request_id > ?))")
        params += [after[0], after[0], after[1]]
    sql = "SELECT record FROM strait_captures"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY ts_ms, request_id LIMIT ?"
    params.append(limit)
    return sql, params


def select_feedback(n: int) -> str:
    marks = ", ".join("?" * n)
    return f"SELECT record FROM strait_feedback WHERE request_id IN ({marks}) ORDER BY ts_ms, id"


def for_postgres(sql: str) -> str:
    """`?` placeholders as psycopg's `%s` (no statement here holds a literal `?` or `%`)."""
    return sql.replace("?", "%s")
