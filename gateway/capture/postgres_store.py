"""The capture store on PostgreSQL (psycopg 3, async): for several replicas sharing one store.

One connection, its calls serialised by a lock: the capture writer sends a batch at a time and
feedback lookups are rare, so a pool would buy nothing. A connection found broken is opened again on
the next call (the failed call raises; the writer counts its batch failed)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import msgspec
import psycopg

from gateway.capture import sql
from gateway.capture.records import Captured, CaptureRecord, Feedback
from gateway.capture.store import CaptureQuery

T = TypeVar("T")
_record = msgspec.json.Decoder(CaptureRecord).decode
_feedback = msgspec.json.Decoder(Feedback).decode
pg = sql.for_postgres


class PostgresCaptureStore:
    kind = "postgresql"

    def __init__(self, url: str, conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
        self._url = url
        self._conn = conn
        self._lock = asyncio.Lock()

    @staticmethod
    async def _connect(url: str) -> psycopg.AsyncConnection[tuple[object, ...]]:
        return await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=10)

    @classmethod
    async def open(cls, url: str) -> PostgresCaptureStore:
        conn = await cls._connect(url)
        async with conn.transaction():
            # Two replicas starting together must not race on CREATE ... IF NOT EXISTS.
            await conn.execute("SELECT pg_advisory_xact_lock(7451003)")
            for statement in sql.SCHEMA:
                await conn.execute(statement)
        return cls(url, conn)

    async def _run(self, fn: Callable[[psycopg.AsyncConnection[tuple[object, ...]]], Awaitable[T]]) -> T:
        async with self._lock:
            if self._conn.closed:
                self._conn = await self._connect(self._url)
            return await fn(self._conn)

    async def write(self, records: Sequence[CaptureRecord], feedback: Sequence[Feedback] = ()) -> None:
        rows = sql.capture_rows(records)
        fb_rows = sql.feedback_rows(feedback)

        async def write(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
            async with conn.transaction(), conn.cursor() as cur:
                if rows:
                    await cur.executemany(pg(sql.INSERT_CAPTURE), rows)
                if fb_rows:
                    await cur.executemany(pg(sql.INSERT_FEEDBACK), fb_rows)

        await self._run(write)

    @staticmethod
    async def _with_feedback(
        conn: psycopg.AsyncConnection[tuple[object, ...]], records: list[CaptureRecord]
    ) -> list[Captured]:
        if not records:
            return []
        by_id: dict[str, list[Feedback]] = {r.request_id: [] for r in records}
        cur = await conn.execute(pg(sql.select_feedback(len(by_id))), list(by_id))
        for (text,) in await cur.fetchall():
            f = _feedback(str(text))
            by_id[f.request_id].append(f)
        return [Captured(record=r, feedback=tuple(by_id[r.request_id])) for r in records]

    async def get(self, tenant: str, request_id: str) -> Captured | None:
        async def get(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> Captured | None:
            row = await (await conn.execute(pg(sql.GET), (tenant, request_id))).fetchone()
            if row is None:
                return None
            return (await self._with_feedback(conn, [_record(str(row[0]))]))[0]

        return await self._run(get)

    async def resolve(
        self,
        tenant: str,
        *,
        request_id: str | None = None,
        client_id: str | None = None,
        response_id: str | None = None,
    ) -> str | None:
        async def resolve(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> str | None:
            if request_id is not None:
                row = await (await conn.execute(pg(sql.GET), (tenant, request_id))).fetchone()
                if row is not None:
                    return request_id
            if client_id is not None:
                row = await (await conn.execute(pg(sql.BY_CLIENT_ID), (tenant, client_id))).fetchone()
                if row is not None:
                    return str(row[0])
            if response_id is not None:
                row = await (await conn.execute(pg(sql.BY_RESPONSE_ID), (tenant, response_id))).fetchone()
                if row is not None:
                    return str(row[0])
            return None

        return await self._run(resolve)

    async def query(self, query: CaptureQuery) -> list[Captured]:
        statement, params = sql.select_page(
            tenant=query.tenant,
            route=query.route,
            model=query.model,
            since_ms=query.since_ms,
            until_ms=query.until_ms,
            after=query.after,
            limit=query.limit,
        )

        async def page(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> list[Captured]:
            rows = await (await conn.execute(pg(statement), params)).fetchall()
            return await self._with_feedback(conn, [_record(str(text)) for (text,) in rows])

        return await self._run(page)

    async def tenants(self) -> list[str]:
        async def tenants(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> list[str]:
            return [str(t) for (t,) in await (await conn.execute(sql.TENANTS)).fetchall()]

        return await self._run(tenants)

    async def delete_before(self, tenant: str, before_ms: int) -> int:
        async def delete(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> int:
            async with conn.transaction():
                await conn.execute(pg(sql.DELETE_FEEDBACK_BEFORE), (tenant, before_ms))
                cur = await conn.execute(pg(sql.DELETE_BEFORE), (tenant, before_ms))
                return int(cur.rowcount)

        return await self._run(delete)

    async def counts(self) -> tuple[int, int]:
        async def counts(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> tuple[int, int]:
            row = await (await conn.execute(sql.COUNT_CAPTURES)).fetchone()
            fb = await (await conn.execute(sql.COUNT_FEEDBACK)).fetchone()
            assert row is not None and fb is not None
            return int(str(row[0])), int(str(fb[0]))

        return await self._run(counts)

    async def aclose(self) -> None:
        async with self._lock:
            await self._conn.close()
