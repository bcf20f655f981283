"""The capture store Protocol, its query, and `open_capture_store(url)` (SQLite or PostgreSQL).

Every implementation runs one contract suite (tests/capture/test_store_contract.py). All reads are
scoped: a feedback lookup names its tenant, so no tenant can reach another's record by guessing an id.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Protocol

import msgspec

from gateway.capture.records import Captured, CaptureRecord, Feedback

MAX_PAGE = 5000


class CaptureQuery(msgspec.Struct, frozen=True, kw_only=True):
    """Filters of a page of captures (each None: any). `since_ms` inclusive, `until_ms` exclusive, epoch
    milliseconds; `after` is the (ts_ms, request_id) of the last record of the previous page."""

    tenant: str | None = None
    route: str | None = None
    model: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    after: tuple[int, str] | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_PAGE)] = 500


class CaptureStore(Protocol):
    """Where captured records and their feedback live."""

    kind: str

    async def write(self, records: Sequence[CaptureRecord], feedback: Sequence[Feedback] = ()) -> None:
        """Store a batch in one transaction. A record whose request_id is stored already, or feedback whose
        id is, is left as it was (a retried batch writes nothing twice)."""
        ...

    async def get(self, tenant: str, request_id: str) -> Captured | None:
        """The tenant's record of this request with its feedback; None if absent or another tenant's."""
        ...

    async def resolve(
        self,
        tenant: str,
        *,
        request_id: str | None = None,
        client_id: str | None = None,
        response_id: str | None = None,
    ) -> str | None:
        """The request id of the tenant's capture named by the gateway's request id or, else, by the
        client's own `x-request-id`, or else by the answer's id (`chatcmpl-...`), the latest of each;
        None when the tenant has no such capture."""
        ...

    async def query(self, query: CaptureQuery) -> list[Captured]:
        """One page of captures matching the query, in (ts_ms, request_id) order, each with its feedback."""
        ...

    async def tenants(self) -> list[str]:
        """The tenants with records stored (for retention)."""
        ...

    async def delete_before(self, tenant: str, before_ms: int) -> int:
        """Delete the tenant's records older than `before_ms` and their feedback; how many records went."""
        ...

    async def counts(self) -> tuple[int, int]:
        """(records, feedback) stored, every tenant together."""
        ...

    async def aclose(self) -> None: ...


async def scan(store: CaptureStore, query: CaptureQuery) -> AsyncIterator[Captured]:
    """Every capture matching `query` (its `after` and `limit` ignored), a page at a time."""
    after: tuple[int, str] | None = None
    while True:
        page = await store.query(msgspec.structs.replace(query, after=after))
        for item in page:
            yield item
        if len(page) < query.limit:
            return
        last = page[-1].record
        after = (last.ts_ms, last.request_id)


def sqlite_path(url: str) -> str:
    """`sqlite:///relative/path.db` or `sqlite:////absolute/path.db` (SQLAlchemy's spelling)."""
    path = url.removeprefix("sqlite:///")
    if not path or path == url:
        raise ValueError(f"STRAIT_CAPTURE: a SQLite URL is sqlite:///path/to/capture.db, not {url!r}")
    return path


def check_capture_url(url: str) -> None:
    """Refuse a STRAIT_CAPTURE that names no supported store (at startup, not at the first capture)."""
    if url == "off":
        return
    if url.startswith("sqlite:"):
        sqlite_path(url)
        return
    if url.startswith(("postgresql://", "postgres://")):
        return
    raise ValueError(f"STRAIT_CAPTURE must be sqlite:///path, postgresql://... or off, not {url.split(':')[0]!r}...")


async def open_capture_store(url: str) -> CaptureStore:
    """The store `url` names, its schema created if missing."""
    check_capture_url(url)
    if url.startswith("sqlite:"):
        from gateway.capture.sqlite_store import SqliteCaptureStore

        return await SqliteCaptureStore.open(sqlite_path(url))
    if url.startswith(("postgresql://", "postgres://")):
        from gateway.capture.postgres_store import PostgresCaptureStore

        return await PostgresCaptureStore.open(url)
    raise ValueError("capture is off (STRAIT_CAPTURE=off)")
