"""Where usage records go. `write` is idempotent by (tenant, request id, attempt): a retried write never
double counts. `totals` answers usage queries from per-day aggregates."""

from __future__ import annotations

import datetime as dt
from collections import OrderedDict
from collections.abc import Iterable, Sequence
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


def finish(rows: Iterable[UsageRow]) -> list[UsageRow]:
    """Rows in answer order, with USD derived once from the exact micro-USD sum: adding floats per record
    or per day would drift from the integer sum Redis keeps, and two ledgers would disagree in the last digit."""
    out = sorted(rows, key=lambda row: (row.tenant, row.value))
    for row in out:
        row.cost_usd = row.cost_micro_usd / 1e6
    return out


def _add(row: UsageRow, r: UsageRecord) -> None:
    row.requests += 1 if r.final else 0
    row.prompt_tokens += r.prompt_tokens
    row.completion_tokens += r.completion_tokens
    row.cached_tokens += r.cached_tokens
    row.cache_write_tokens += r.cache_write_tokens
    row.reasoning_tokens += r.reasoning_tokens
    row.cost_micro_usd += r.cost_micro_usd
    if r.cache_hit:
        row.cache_hits += 1
        row.tokens_saved += r.tokens_saved


class MemoryLedger:
    """In-process ledger (the embedded default, one replica): per-day aggregates only, so memory grows
    with tenants x days x distinct routes/models/keys, not with requests. Idempotency remembers the
    most recent record ids (a retried write comes within seconds, not after a million records)."""

    RECENT = 200_000
    KEEP_DAYS = 400

    def __init__(self) -> None:
        self._recent: OrderedDict[tuple[str, str, int], None] = OrderedDict()
        # (tenant, day) -> (dimension, value) -> row
        self._days: dict[tuple[str, str], dict[tuple[str, str], UsageRow]] = {}

    async def write(self, records: Sequence[UsageRecord]) -> int:
        new = 0
        for r in records:
            key = (r.tenant, r.request_id, r.attempt)
            if key in self._recent:
                continue
            self._recent[key] = None
            if len(self._recent) > self.RECENT:
                self._recent.popitem(last=False)
            day = self._days.setdefault((r.tenant, r.day), {})
            for dim in DIMENSIONS:
                value = r.dimension(dim)
                row = day.get((dim, value))
                if row is None:
                    row = day[(dim, value)] = UsageRow(tenant=r.tenant, dimension=dim, value=value)
                _add(row, r)
            new += 1
        if len(self._days) > self.KEEP_DAYS * 4:
            cutoff = (dt.date.today() - dt.timedelta(days=self.KEEP_DAYS)).isoformat()
            self._days = {k: v for k, v in self._days.items() if k[1] >= cutoff}
        return new

    async def totals(self, tenants: Sequence[str], since: dt.date, until: dt.date, by: Dimension) -> list[UsageRow]:
        assert by in DIMENSIONS
        rows: dict[tuple[str, str], UsageRow] = {}
        for tenant in tenants:
            for day in days_between(since, until):
                for (dim, value), src in self._days.get((tenant, day), {}).items():
                    if dim != by:
                        continue
                    row = rows.get((tenant, value))
                    if row is None:
                        row = rows[(tenant, value)] = UsageRow(tenant=tenant, dimension=by, value=value)
                    row.requests += src.requests
                    row.prompt_tokens += src.prompt_tokens
                    row.completion_tokens += src.completion_tokens
                    row.cached_tokens += src.cached_tokens
                    row.cache_write_tokens += src.cache_write_tokens
                    row.reasoning_tokens += src.reasoning_tokens
                    row.cost_micro_usd += src.cost_micro_usd
                    row.cache_hits += src.cache_hits
                    row.tokens_saved += src.tokens_saved
        return finish(rows.values())

    async def close(self) -> None:
        return None
