"""The capture store in one SQLite file (WAL): the embedded default. One connection, used from one
worker thread (every call runs there, in order), so the event loop never waits on the disk."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import msgspec

from gateway.capture import sql
from gateway.capture.records import Captured, CaptureRecord, Feedback
from gateway.capture.store import CaptureQuery

T = TypeVar("T")
_record = msgspec.json.Decoder(CaptureRecord).decode
_feedback = msgspec.json.Decoder(Feedback).decode


class SqliteCaptureStore:
    kind = "sqlite"

    def __init__(self, conn: sqlite3.Connection, executor: ThreadPoolExecutor) -> None:
        self._conn = conn
        self._executor = executor

    @classmethod
    async def open(cls, path: str) -> SqliteCaptureStore:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="strait-capture-sqlite")

        def connect() -> sqlite3.Connection:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10.0)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("BEGIN")
            for statement in sql.SCHEMA:
                conn.execute(statement)
            conn.execute("COMMIT")
            return conn

        conn = await asyncio.get_running_loop().run_in_executor(executor, connect)
        return cls(conn, executor)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, self._conn)

    async def write(self, records: Sequence[CaptureRecord], feedback: Sequence[Feedback] = ()) -> None:
        rows = sql.capture_rows(records)
        fb_rows = sql.feedback_rows(feedback)

        def write(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN")
            try:
                conn.executemany(sql.INSERT_CAPTURE, rows)
                conn.executemany(sql.INSERT_FEEDBACK, fb_rows)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

        await self._run(write)

    @staticmethod
    def _with_feedback(conn: sqlite3.Connection, records: list[CaptureRecord]) -> list[Captured]:
        if not records:
            return []
        by_id: dict[str, list[Feedback]] = {r.request_id: [] for r in records}
        rows = conn.execute(sql.select_feedback(len(by_id)), list(by_id)).fetchall()
        for (text,) in rows:
            f = _feedback(text)
            by_id[f.request_id].append(f)
        return [Captured(record=r, feedback=tuple(by_id[r.request_id])) for r in records]

    async def get(self, tenant: str, request_id: str) -> Captured | None:
        def get(conn: sqlite3.Connection) -> Captured | None:
            row = conn.execute(sql.GET, (tenant, request_id)).fetchone()
            if row is None:
                return None
            return self._with_feedback(conn, [_record(row[0])])[0]

        return await self._run(get)

    async def resolve(
        self,
        tenant: str,
        *,
        request_id: str | None = None,
        client_id: str | None = None,
        response_id: str | None = None,
    ) -> str | None:
        def resolve(conn: sqlite3.Connection) -> str | None:
            if request_id is not None:
                row = conn.execute(sql.GET, (tenant, request_id)).fetchone()
                if row is not None:
                    return request_id
            if client_id is not None:
                row = conn.execute(sql.BY_CLIENT_ID, (tenant, client_id)).fetchone()
                if row is not None:
                    return str(row[0])
            if response_id is not None:
                row = conn.execute(sql.BY_RESPONSE_ID, (tenant, response_id)).fetchone()
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

        def page(conn: sqlite3.Connection) -> list[Captured]:
            records = [_record(text) for (text,) in conn.execute(statement, params).fetchall()]
            return self._with_feedback(conn, records)

        return await self._run(page)

    async def tenants(self) -> list[str]:
        return await self._run(lambda conn: [str(t) for (t,) in conn.execute(sql.TENANTS).fetchall()])

    async def delete_before(self, tenant: str, before_ms: int) -> int:
        def delete(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN")
            try:
                conn.execute(sql.DELETE_FEEDBACK_BEFORE, (tenant, before_ms))
                n = conn.execute(sql.DELETE_BEFORE, (tenant, before_ms)).rowcount
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return int(n)

        return await self._run(delete)

    async def counts(self) -> tuple[int, int]:
        def counts(conn: sqlite3.Connection) -> tuple[int, int]:
            (records,) = conn.execute(sql.COUNT_CAPTURES).fetchone()
            (feedback,) = conn.execute(sql.COUNT_FEEDBACK).fetchone()
            return int(records), int(feedback)

        return await self._run(counts)

    async def aclose(self) -> None:
        await self._run(lambda conn: conn.close())
        self._executor.shutdown(wait=False)
