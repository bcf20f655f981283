"""The cache store on Redis (one server or Redis Cluster; redis-py asyncio).

Key space (`ns` is the namespace, `key` the entry's exact key, both hex digests from `scope.py`; any
other text is replaced by its SHA-256 so a key never breaks the hash tag). Every key of a namespace
carries the hash tag `{ns}`, so a namespace lives on one cluster slot and its scripts run atomically:

    strait:cache:{ns}:e:<key>   string  the msgpack CacheEntry       PXAT its expires_ms (absolute, set once)
    strait:cache:{ns}:seq       zset    key -> insertion sequence    PXAT the latest expiry among its entries
    strait:cache:{ns}:exp       zset    key -> expires_ms            same
    strait:cache:{ns}:size      hash    key -> bytes counted         same
    strait:cache:{ns}:vec       hash    key -> msgpack VectorRecord  same (entries with a vector only)
                                        (query, float32 vector, expires_ms), so vectors load without bodies
    strait:cache:{ns}:dels      zset    deleted key -> its deletion  same (the last 256 deletions)
                                        number (`removed` after it)
    strait:cache:{ns}:meta      hash    born (random id of this life of the namespace), removed
                                        (deletions), next (last sequence), floor (every sequence below
                                        it was evicted), bytes, until (the index's expiry)   same
    strait:cache:{ns}:bad       string  bad-hit reports              PEXPIRE NX `bad_hit_ttl_s` (set once)
    strait:cache:served:{t}:<r> string  msgpack (tenant, ns, key)    PX the caller's ttl_s
                                        t = sha256(tenant), r = sha256(response id): tenant-scoped

No key is ever written without a TTL, and no read moves one. An entry's vector is kept twice (in the
entry and in `vec`): about 1.5 KB per entry for 384 dimensions, counted in the namespace's bytes.

Coherence of the in-process vectors across replicas: each replica keeps, per namespace, the rows it
has plus (born, removed, highest sequence seen). `vectors()` sends those to one script call (one round
trip), which answers with the namespace's current (born, removed, next, floor), the keys deleted since
the replica's `removed` (from the deletion log), and the rows added after the sequence seen, at most
`sync_page` of them (a replica new to a big namespace catches up over a few lookups, each reply
bounded, with the rows it has so far). So: new entries arrive incrementally; an overwrite arrives as a
new sequence for the same key; eviction (always oldest first) raises `floor` and replicas drop rows
below it without fetching anything; expiry needs no message (each replica drops expired rows by its
clock, and `get` checks expiry again); a `delete` (rare: bad-hit feedback) is logged, and replicas
remove that row. Only a new life of the namespace (`born`: it expired or was lost whole) or a replica
more than 256 deletions behind starts over. A replica whose copy is current pays one small reply. A
stale row can at worst name an entry that is gone: its `get` is then a miss.

Deployment: give the cache its own Redis (or at least its own `maxmemory` with `allkeys-lru` or
`volatile-lru`; every cache key has a TTL) so cache entries can never evict limiter or ledger state;
the limiter's Redis must run `noeviction`. If Redis evicts part of a namespace under memory pressure,
the result is misses (a missing `meta` starts a new life; a missing entry is a miss), never errors.

Failure mode: every call is bounded by a hard `Deadline(timeout_s)` and a circuit breaker
(gateway/state/breaker.py); a failed, timed-out or skipped call is a miss / no-op, never an exception.
Failures and garbage reads are counted in `errors`, breaker skips in `skipped`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import msgspec
from redis.asyncio import Redis, RedisCluster

from gateway.cache.entry import CacheEntry, decode_entry, decode_record, encode_entry, encode_record, vector_record
from gateway.cache.scripts import DELETE, PUT, SYNC
from gateway.cache.vectors import EMPTY, VectorIndex, VectorSet
from gateway.state.base import BreakerState, Clock
from gateway.state.breaker import Breaker, BreakerConfig
from gateway.state.deadline import Deadline
from gateway.state.memory import wall_clock_ms
from gateway.state.scripts import DirectConnections, pack

log = logging.getLogger(__name__)
T = TypeVar("T")

PREFIX = "strait:cache:"
DEFAULT_BAD_HIT_TTL_S = 7 * 86_400
# In-process vector copies: at most this many namespaces and rows in total (least recently used
# namespaces go first; they reload on their next lookup).
DEFAULT_MAX_VIEWS = 1024
DEFAULT_MAX_ROWS = 200_000
# Rows per sync reply: a replica loading a big namespace catches up over several lookups, each reply
# small enough to arrive well within the timeout (512 x 384 dims: about 0.8 MB).
DEFAULT_SYNC_PAGE = 512
# Deletions each namespace logs for replicas; one further behind reloads the namespace.
DELETION_LOG = 256
_SAFE = re.compile(r"[0-9A-Za-z_.\-]{1,128}")
_served_decoder = msgspec.msgpack.Decoder(tuple[str, str, str])
_encode = msgspec.msgpack.encode


def safe_part(text: str) -> str:
    """`text` if it cannot break a key (digests can't), else its SHA-256."""
    return text if _SAFE.fullmatch(text) else hashlib.sha256(text.encode()).hexdigest()


def namespace_prefix(namespace: str) -> str:
    return f"{PREFIX}{{{safe_part(namespace)}}}:"


def served_key(tenant: str, response_id: str) -> str:
    tenant_tag = hashlib.sha256(tenant.encode()).hexdigest()[:32]
    rid = hashlib.sha256(response_id.encode()).hexdigest()[:32]
    return f"{PREFIX}served:{{{tenant_tag}}}:{rid}"


def _index_keys(prefix: str) -> list[str]:
    return [prefix + "meta", prefix + "seq", prefix + "exp", prefix + "size", prefix + "vec", prefix + "dels"]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisCacheStore:
    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        timeout_s: float = 0.05,
        clock: Clock | None = None,
        breaker: BreakerConfig | Breaker | None = None,
        max_connections: int = 32,
        bad_hit_ttl_s: int = DEFAULT_BAD_HIT_TTL_S,
        max_views: int = DEFAULT_MAX_VIEWS,
        max_rows: int = DEFAULT_MAX_ROWS,
        sync_page: int = DEFAULT_SYNC_PAGE,
    ) -> None:
        self._client = client
        # One Redis: the commands of every lookup and hit (GET, SET) go out packed on a pipelined
        # connection of our own, as the limiter's scripts do (gateway.state.scripts.DirectConnections).
        # redis-py's `execute_command` (pool, per-item encoding, observability hooks) made a hit's two
        # calls cost more CPU than a miss's whole upstream call (loadtest/README.md, "Cache hits").
        self._direct = DirectConnections(client) if isinstance(client, Redis) else None
        self._timeout_s = timeout_s
        self._clock: Clock = clock or wall_clock_ms
        self._breaker = breaker if isinstance(breaker, Breaker) else Breaker(breaker or BreakerConfig())
        self._bad_hit_ttl_ms = bad_hit_ttl_s * 1000
        self._put = client.register_script(PUT)
        self._delete = client.register_script(DELETE)
        self._sync = client.register_script(SYNC)
        self._inflight = asyncio.Semaphore(max_connections)
        self._views: OrderedDict[str, VectorIndex] = OrderedDict()  # least recently used first
        self._rows = 0  # rows across views
        self._max_views = max_views
        self._max_rows = max_rows
        self._sync_page = max(1, sync_page)
        self._syncing: dict[str, asyncio.Future[VectorSet]] = {}  # one sync per namespace at a time
        self.errors = 0
        self.skipped = 0  # calls not made: breaker open
        self.saturated = 0  # calls that ran out of time waiting for a connection slot (our overload)

    @property
    def breaker_state(self) -> BreakerState:
        return self._breaker.state

    # -- the contract --------------------------------------------------------------------------------

    async def get(self, namespace: str, key: str) -> CacheEntry | None:
        entry_key = namespace_prefix(namespace) + "e:" + safe_part(key)
        raw = await self._call(self._get(entry_key))
        if not raw:
            return None
        entry = decode_entry(raw) if isinstance(raw, bytes) else None
        if entry is None:
            self._garbage("entry", entry_key)
            return None
        if entry.expires_ms <= self._clock():
            return None
        return entry

    async def vectors(self, namespace: str) -> VectorSet:
        ns = safe_part(namespace)
        task = self._syncing.get(ns)
        if task is None:
            # Concurrent lookups of one namespace share one sync (one round trip, applied once).
            task = asyncio.ensure_future(self._synced(ns))
            self._syncing[ns] = task
            task.add_done_callback(lambda _: self._syncing.pop(ns, None))
        return await asyncio.shield(task)

    async def put(self, namespace: str, key: str, entry: CacheEntry, *, max_entries: int, max_bytes: int) -> None:
        now = self._clock()
        if entry.expires_ms <= now or max_entries < 1:
            return
        prefix = namespace_prefix(namespace)
        safe_key = safe_part(key)
        record = vector_record(entry)
        args: list[str | int | bytes] = [
            prefix + "e:",
            safe_key,
            encode_entry(entry),
            encode_record(record) if record is not None else b"",
            entry.expires_ms,
            now,
            max_entries,
            max_bytes,
            secrets.token_hex(8),
        ]
        keys = [*_index_keys(prefix), prefix + "e:" + safe_key]
        await self._call(lambda: self._put(keys=keys, args=args))

    async def delete(self, namespace: str, key: str) -> None:
        prefix = namespace_prefix(namespace)
        safe_key = safe_part(key)
        keys = [*_index_keys(prefix), prefix + "e:" + safe_key]
        await self._call(lambda: self._delete(keys=keys, args=[prefix + "e:", safe_key, DELETION_LOG]))

    async def add_bad_hit(self, namespace: str, *, ttl_s: int | None = None) -> int:
        counter = namespace_prefix(namespace) + "bad"
        ttl_ms = ttl_s * 1000 if ttl_s is not None else self._bad_hit_ttl_ms

        async def report() -> Any:
            pipe = self._client.pipeline(transaction=False)
            pipe.incr(counter)
            pipe.pexpire(counter, ttl_ms, nx=True)  # the count's expiry is set once, by its first report
            return await pipe.execute()

        raw = await self._call(report)
        return int(raw[0]) if raw else 0

    async def bad_hits(self, namespace: str) -> int:
        counter = namespace_prefix(namespace) + "bad"
        raw = await self._call(self._get(counter))
        try:
            return int(raw) if raw else 0
        except (TypeError, ValueError):
            self._garbage("bad-hit counter", counter)
            return 0

    async def remember_served(self, tenant: str, response_id: str, namespace: str, key: str, ttl_s: int) -> None:
        if ttl_s <= 0:
            return
        value = _encode((tenant, namespace, key))
        served = served_key(tenant, response_id)
        if self._direct is not None:
            await self._call(partial(self._direct.call, pack(["SET", served, value, "PX", ttl_s * 1000])))
        else:
            await self._call(lambda: self._client.set(served, value, px=ttl_s * 1000))

    async def served(self, tenant: str, response_id: str) -> tuple[str, str] | None:
        served = served_key(tenant, response_id)
        raw = await self._call(self._get(served))
        if not raw:
            return None
        try:
            owner, namespace, key = _served_decoder.decode(raw if isinstance(raw, bytes) else b"")
        except (msgspec.DecodeError, msgspec.ValidationError, TypeError):
            self._garbage("served mapping", served)
            return None
        # The key is tenant-scoped already; the stored owner is checked too (a digest collision or a
        # bug in the key scheme must still never hand one tenant another's mapping).
        if owner != tenant:
            return None
        return namespace, key

    async def aclose(self) -> None:
        for task in list(self._syncing.values()):
            task.cancel()
        if self._syncing:
            await asyncio.gather(*self._syncing.values(), return_exceptions=True)
        # Bounded: closing must not hang a shutdown on a frozen server.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(max(1.0, self._timeout_s)):
                if self._direct is not None:
                    await self._direct.close()
                await self._client.aclose()

    # -- vectors ----------------------------------------------------------------------------------------

    async def _synced(self, ns: str) -> VectorSet:
        view = self._views.get(ns)
        if view is None:
            view = self._views[ns] = VectorIndex()
        self._views.move_to_end(ns)
        prefix = f"{PREFIX}{{{ns}}}:"
        keys = _index_keys(prefix)
        args: list[str | int] = [view.born, view.removed, view.seen, self._sync_page]
        raw = await self._call(lambda: self._sync(keys=keys, args=args))
        if not isinstance(raw, list) or len(raw) < 6:
            if raw is not None:
                self._garbage("sync reply", prefix)
            return EMPTY  # the store failed: a miss (a stale copy could only name entries we cannot fetch)
        before = len(view.rows)
        try:
            born, removed, floor, full, gone = _text(raw[0]), _text(raw[1]), int(raw[3]), int(raw[4]), int(raw[5])
            rows = raw[6 + gone :]
            if len(rows) % 3:
                raise ValueError("sync rows come in threes")
            if full:
                view.reset(born, removed)
            for deleted in raw[6 : 6 + gone]:
                view.remove(_text(deleted))
            view.removed = removed
            view.drop_below(floor)
            for i in range(0, len(rows), 3):
                blob = rows[i + 2]
                record = decode_record(blob) if blob else None
                if blob and record is None:
                    self._garbage("vector record", prefix)
                view.put(_text(rows[i]), int(rows[i + 1]), record)
        except (ValueError, TypeError, UnicodeDecodeError):
            self._garbage("sync reply", prefix)
            view.reset("", "")
        snapshot = view.snapshot(self._clock())
        self._rows += len(view.rows) - before
        self._bound_views(ns)
        return snapshot

    def _bound_views(self, current: str) -> None:
        while len(self._views) > 1 and (len(self._views) > self._max_views or self._rows > self._max_rows):
            oldest = next(iter(self._views))
            if oldest == current:
                break
            if oldest in self._syncing:  # being applied right now: its task will account for it
                self._views.move_to_end(oldest)
                continue
            self._rows -= len(self._views.pop(oldest).rows)

    # -- plumbing ---------------------------------------------------------------------------------------

    def _get(self, key: str) -> Callable[[], Awaitable[Any]]:
        """A GET, on the pipelined connection when there is one Redis."""
        if self._direct is not None:
            return partial(self._direct.call, pack(["GET", key]))
        return lambda: self._client.get(key)

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T | None:
        """One store call under the deadline and the breaker; None when it failed or was skipped."""
        if not self._breaker.allow():
            self.skipped += 1
            return None
        loop = asyncio.get_running_loop()
        in_redis_since = 0.0
        try:
            async with Deadline(self._timeout_s), self._inflight:
                in_redis_since = loop.time()
                result = await fn()
        except asyncio.CancelledError:
            self._breaker.abandon()
            raise
        except Exception as exc:
            if isinstance(exc, TimeoutError) and self._direct is not None:
                # The pipelined connection is suspect: reset if still stuck (gateway/state/redis_store.py).
                self._direct.reset(self._timeout_s / 2)
            # Timed out mostly waiting for a connection slot: our overload, not Redis failing; it must
            # not open the breaker (as in gateway/state/redis_store.py).
            if not in_redis_since or (
                isinstance(exc, TimeoutError) and loop.time() - in_redis_since < self._timeout_s / 2
            ):
                self.saturated += 1
                self._breaker.abandon()
                return None
            self.errors += 1
            if self._breaker.failure():
                log.warning("cache store unreachable (%s): lookups miss, writes are dropped", type(exc).__name__)
            log.debug("cache store call failed", exc_info=True)
            return None
        if self._breaker.state != "closed":
            log.warning("cache store reachable again")
        self._breaker.success()
        return result

    def _garbage(self, what: str, where: str) -> None:
        self.errors += 1
        log.debug("cache store: undecodable %s under %s (a miss)", what, where)
