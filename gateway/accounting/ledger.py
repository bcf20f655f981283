"""Where usage records go. `write` is idempotent by (request id, attempt): a retried write never
double counts. `totals` answers usage queries from per-day aggregates."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Protocol

from gateway.accounting.records import DIMENSIONS, Dimension, UsageRecord, UsageRow, days_between


class LedgerUnavailable(Exception):
    """The ledger could not be written or read now; the writer spools and retries."""


class Ledger(Protocol):
    async def write(self, records: Sequence[UsageRecord]) -> int:
        """Write what is new; returns how many records were new (duplicates are skipped)."""
        ...

    async def totals(self, tenants: Sequence[str], since: dt.date, until: dt.date, by: Dimension) -> list[UsageRow]: ...

    async def close(self) -> None: ...


def add_to_rows(rows: dict[tuple[str, str], UsageRow], tenant: str, by: Dimension, value: str, r: UsageRecord) -> None:
    row = rows.get((tenant, value))
    if row is None:
        row = rows[(tenant, value)] = UsageRow(tenant=tenant, dimension=by, value=value)
    row.requests += 1 if r.final else 0
    row.prompt_tokens += r.prompt_tokens
    row.completion_tokens += r.completion_tokens
    row.cost_usd += r.cost_micro_usd / 1e6


class MemoryLedger:
    """In-process ledger (the embedded default): records kept per day, for one replica."""

    def __init__(self) -> None:
        self._seen: set[tuple[str, int]] = set()
        self._by_day: dict[tuple[str, str], list[UsageRecord]] = {}

    async def write(self, records: Sequence[UsageRecord]) -> int:
        new = 0
        for r in records:
            key = (r.request_id, r.attempt)
            if key in self._seen:
                continue
            self._seen.add(key)
            self._by_day.setdefault((r.tenant, r.day), []).append(r)
            new += 1
        return new

    async def totals(self, tenants: Sequence[str], since: dt.date, until: dt.date, by: Dimension) -> list[UsageRow]:
        assert by in DIMENSIONS
        rows: dict[tuple[str, str], UsageRow] = {}
        for tenant in tenants:
            for day in days_between(since, until):
                for r in self._by_day.get((tenant, day), ()):
                    add_to_rows(rows, tenant, by, r.dimension(by), r)
        return sorted(rows.values(), key=lambda row: (row.tenant, row.value))

    async def close(self) -> None:
        return None
