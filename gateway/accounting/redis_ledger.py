"""The ledger on Redis: a Stream per tenant (the record log) and a hash per tenant and day (aggregates).

Keys carry the tenant as a hash tag, `strait:{t:<tenant>}:...`, so each record's script touches one
slot (Redis Cluster) and tenants never share a key. A batch's records of one tenant and day go through
one Lua call: the records it has not seen before (a marker per record, as a field of one hash per
tenant and day, with a TTL longer than any retry or spool replay) are appended to the stream and summed
into the day's aggregates with one HMGET + one HSET. Every key has a TTL. A batch is one round trip
(a pipeline of plain EVALSHAs when it spans several tenants or days), off the request path.

    strait:{t:<tenant>}:ledger             stream, one entry {r: <record JSON>} per record
    strait:{t:<tenant>}:usage:<day>        hash `<dimension>|<value>|<metric>` -> sum, and `~` (created);
                                           metrics: requests, prompt, completion, cost (micro-USD), hits,
                                           saved, cached, cache_write, reasoning
    strait:{t:<tenant>}:v2:seen:<day>      hash `<request id>|<attempt>` -> 1, and `~` (created)

Rolling upgrade: the stream and aggregates are as before (the `cached`, `cache_write` and `reasoning`
metrics are new: a replica of an older version neither writes nor reads them, so a day's token kinds
count only the records newer replicas wrote) (old readers skip the `~` field); the markers
moved from one key per record (`...:rec:<id>:<attempt>`) to the per-day hash, so a record written by
an old replica and retried by a new one (or the reverse) during the rollout could count twice.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from importlib import resources
from typing import Any

import msgspec
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import RedisError

from gateway.accounting.ledger import LedgerUnavailable, finish
from gateway.accounting.records import DIMENSIONS, Dimension, UsageRecord, UsageRow, days_between
from gateway.state.keys import _enc, tenant_tag
from gateway.state.scripts import DirectConnections, pack, run_script_many

MARKER_TTL_S = 8 * 24 * 3600
AGGREGATE_TTL_S = 400 * 24 * 3600
STREAM_MAXLEN = 1_000_000
_encode = msgspec.json.encode


def tenant_prefix(tenant: str) -> str:
    # The same percent-encoded hash tag as the state keys: a `}` in a name cannot break out of it.
    return tenant_tag(tenant)


def _record_args(r: UsageRecord) -> list[Any]:
    return [
        f"{_enc(r.request_id)}|{r.attempt}",
        _encode(r),
        1 if r.final else 0,
        r.prompt_tokens,
        r.completion_tokens,
        r.cost_micro_usd,
        1 if r.cache_hit else 0,
        r.tokens_saved,
        r.cached_tokens,
        r.cache_write_tokens,
        r.reasoning_tokens,
        *(r.dimension(d) for d in DIMENSIONS),
    ]


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


# Small integers (flags, token counts, costs) framed once; the four names of a record (route, model,
# deployment, key) framed once per combination (bounded: the policy's names).
_SMALL = [_bulk(b"%d" % i) for i in range(4096)]
_DIMS: dict[tuple[str, str, str, str], bytes] = {}
_MAX_DIMS = 4096


def _int_frame(value: int) -> bytes:
    return _SMALL[value] if 0 <= value < 4096 else _bulk(b"%d" % value)


def _record_frames(r: UsageRecord) -> bytes:
    """`_record_args(r)` as RESP bulk strings, byte for byte what `pack` makes of them, with what repeats
    from record to record framed once (bytes formatting per argument was most of a batch's CPU)."""
    dims = (r.route, r.model, r.deployment, r.key_id)
    framed = _DIMS.get(dims)
    if framed is None:
        framed = b"".join([_bulk(d.encode()) for d in dims])
        if len(_DIMS) < _MAX_DIMS:
            _DIMS[dims] = framed
    return b"".join(
        [
            _bulk(f"{_enc(r.request_id)}|{r.attempt}".encode()),
            _bulk(_encode(r)),
            _SMALL[1] if r.final else _SMALL[0],
            _int_frame(r.prompt_tokens),
            _int_frame(r.completion_tokens),
            _int_frame(r.cost_micro_usd),
            _SMALL[1] if r.cache_hit else _SMALL[0],
            _int_frame(r.tokens_saved),
            _int_frame(r.cached_tokens),
            _int_frame(r.cache_write_tokens),
            _int_frame(r.reasoning_tokens),
            framed,
        ]
    )


_RECORD_ARGS = 15  # len(_record_args(r))


def _command(sha: str, keys: list[str], fixed: list[Any], records: Sequence[UsageRecord]) -> bytes:
    """EVALSHA of the record script over `records`: `pack(["EVALSHA", sha, len(keys), *keys, *fixed,
    *args of each record])`, byte for byte."""
    head = pack(["EVALSHA", sha, len(keys), *keys, *fixed])
    count = 3 + len(keys) + len(fixed) + _RECORD_ARGS * len(records)
    start = head.index(b"\r\n") + 2  # after pack's `*<count>`
    return b"*%d\r\n%b%b" % (count, head[start:], b"".join([_record_frames(r) for r in records]))


class RedisLedger:
    def __init__(self, client: Redis | RedisCluster, *, timeout_s: float = 2.0) -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._source = resources.files("gateway.accounting").joinpath("lua/record.lua").read_text()
        self._script = client.register_script(self._source)
        # One Redis: batches go out packed on connections of our own (redis-py's per-argument encoding
        # was most of a batch's CPU: ~10 arguments per record); Cluster keeps redis-py's client.
        self._direct = DirectConnections(client) if isinstance(client, Redis) else None

    async def write(self, records: Sequence[UsageRecord]) -> int:
        if not records:
            return 0
        # One script call per (tenant, day): its keys share the tenant's hash tag (one Cluster slot).
        groups: dict[tuple[str, str], list[UsageRecord]] = {}
        days: dict[int, str] = {}  # UTC day number -> its name (a batch spans one or two days)
        for r in records:
            n = r.ts_ms // 86_400_000
            day = days.get(n)
            if day is None:
                day = days[n] = r.day
            groups.setdefault((r.tenant, day), []).append(r)
        calls: list[tuple[list[str], list[Any]]] = []
        commands: list[bytes] = []
        for (tenant, day), group in groups.items():
            prefix = tenant_prefix(tenant)
            keys = [f"{prefix}:ledger", f"{prefix}:usage:{day}", f"{prefix}:v2:seen:{day}"]
            args: list[Any] = [MARKER_TTL_S, AGGREGATE_TTL_S, STREAM_MAXLEN]
            if self._direct is not None:
                commands.append(_command(self._script.sha, keys, args, group))
                continue
            for r in group:
                args += _record_args(r)
            calls.append((keys, args))
        try:
            if self._direct is not None:
                results = await self._direct.call_many(commands, self._source)
                for result in results:
                    if isinstance(result, Exception):
                        raise result
            else:
                results = await run_script_many(self._client, self._script, calls)
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
                    row.cost_micro_usd += amount
                elif metric == "hits":
                    row.cache_hits += amount
                elif metric == "saved":
                    row.tokens_saved += amount
                elif metric == "cached":
                    row.cached_tokens += amount
                elif metric == "cache_write":
                    row.cache_write_tokens += amount
                elif metric == "reasoning":
                    row.reasoning_tokens += amount
        return finish(rows.values())

    async def close(self) -> None:
        if self._direct is not None:
            await self._direct.close()
