"""The ledger on Redis: a Stream per tenant (the record log) and a hash per tenant and day (aggregates).

Keys carry the tenant as a hash tag, `strait:{t:<tenant>}:...`, so each record's script touches one
slot (Redis Cluster) and tenants never share a key. A batch's records of one tenant and day go through
one Lua call; each record is guarded by a `SET NX` marker with a TTL longer than any retry or spool
replay, so writes are idempotent, and the new ones are summed into one HINCRBY per aggregate field.
Every key has a TTL. A batch is one pipeline: one round trip, off the request path.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from importlib import resources
from typing import Any

import msgspec
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import RedisError

from gateway.accounting.ledger import LedgerUnavailable
from gateway.accounting.records import DIMENSIONS, Dimension, UsageRecord, UsageRow, days_between
from gateway.state.keys import tenant_tag

MARKER_TTL_S = 8 * 24 * 3600
AGGREGATE_TTL_S = 400 * 24 * 3600
STREAM_MAXLEN = 1_000_000
_encode = msgspec.json.encode


def tenant_prefix(tenant: str) -> str:
    # The same percent-encoded hash tag as the state keys: a `}` in a name cannot break out of it.
    return tenant_tag(tenant)


def _record_args(r: UsageRecord) -> list[Any]:
    return [
        _encode(r),
        1 if r.final else 0,
        r.prompt_tokens,
        r.completion_tokens,
        r.cost_micro_usd,
        *(r.dimension(d) for d in DIMENSIONS),
    ]


class RedisLedger:
    def __init__(self, client: Redis | RedisCluster, *, timeout_s: float = 2.0) -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._script = client.register_script(
            resources.files("gateway.accounting").joinpath("lua/record.lua").read_text()
        )

    async def write(self, records: Sequence[UsageRecord]) -> int:
        if not records:
            return 0
        # One script call per (tenant, day): its keys share the tenant's hash tag (one Cluster slot).
        groups: dict[tuple[str, str], list[UsageRecord]] = {}
        for r in records:
            groups.setdefault((r.tenant, r.day), []).append(r)
        try:
            pipe = self._client.pipeline(transaction=False)
            for (tenant, day), group in groups.items():
                prefix = tenant_prefix(tenant)
                keys = [f"{prefix}:ledger", f"{prefix}:usage:{day}"]
                keys += [f"{prefix}:rec:{r.request_id}:{r.attempt}" for r in group]
                args: list[Any] = [MARKER_TTL_S, AGGREGATE_TTL_S, STREAM_MAXLEN]
                for r in group:
                    args += _record_args(r)
                await self._script(keys=keys, args=args, client=pipe)  # type: ignore[arg-type]  # a pipeline queues the call
            results = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            raise LedgerUnavailable(str(exc) or type(exc).__name__) from None
        return sum(int(x) for x in results)

    async def totals(self, tenants: Sequence[str], since: dt.date, until: dt.date, by: Dimension) -> list[UsageRow]:
        assert by in DIMENSIONS
        days = days_between(since, until)
        try:
            pipe = self._client.pipeline(transaction=False)
            order = [(t, d) for t in tenants for d in days]
            for tenant, day in order:
                pipe.hgetall(f"{tenant_prefix(tenant)}:usage:{day}")
            hashes = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            raise LedgerUnavailable(str(exc) or type(exc).__name__) from None
        rows: dict[tuple[str, str], UsageRow] = {}
        for (tenant, _day), h in zip(order, hashes, strict=True):
            for raw_field, raw_value in h.items():
                field = raw_field.decode() if isinstance(raw_field, bytes) else str(raw_field)
                dim, _, rest = field.partition("|")
                value, _, metric = rest.rpartition("|")
                if dim != by:
                    continue
                row = rows.get((tenant, value))
                if row is None:
                    row = rows[(tenant, value)] = UsageRow(tenant=tenant, dimension=by, value=value)
                amount = int(raw_value)
                if metric == "requests":
                    row.requests += amount
                elif metric == "prompt":
                    row.prompt_tokens += amount
                elif metric == "completion":
                    row.completion_tokens += amount
                elif metric == "cost":
                    row.cost_usd += amount / 1e6
        return sorted(rows.values(), key=lambda row: (row.tenant, row.value))

    async def close(self) -> None:
        return None
