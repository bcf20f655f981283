"""The in-process cache store (one replica: `make run`, tests). Same contract as the Redis store.

Bounded three ways: per namespace (the caller's `max_entries` / `max_bytes`), in total
(`max_total_entries` / `max_total_bytes` across namespaces, oldest evicted first), and the feedback maps
(bad-hit counters and served mappings) by count. Every method runs without an `await` between reads and
writes, so each is atomic on the event loop. Expired entries go lazily on access, when their namespace
is written, and oldest-first when the global bound needs room.
"""

from __future__ import annotations

from collections import OrderedDict

from gateway.cache.entry import CacheEntry, encode_entry, encode_record, vector_record
from gateway.cache.vectors import VectorIndex, VectorSet
from gateway.state.base import Clock
from gateway.state.memory import wall_clock_ms

DEFAULT_MAX_TOTAL_ENTRIES = 20_000
DEFAULT_MAX_TOTAL_BYTES = 256 * 1024 * 1024
DEFAULT_BAD_HIT_TTL_S = 7 * 86_400
_MAX_COUNTERS = 100_000  # bad-hit counters and served mappings each


class _Stored:
    __slots__ = ("entry", "seq", "size")

    def __init__(self, entry: CacheEntry, seq: int, size: int) -> None:
        self.entry = entry
        self.seq = seq
        self.size = size


class _Namespace:
    __slots__ = ("bytes", "entries", "index", "next_expiry")

    def __init__(self) -> None:
        self.entries: OrderedDict[str, _Stored] = OrderedDict()  # insertion (= sequence) order
        self.bytes = 0
        self.index = VectorIndex()
        self.next_expiry = 2**62  # no entry expires before this (so most puts skip the sweep)


class MemoryCacheStore:
    def __init__(
        self,
        *,
        clock: Clock | None = None,
        max_total_entries: int = DEFAULT_MAX_TOTAL_ENTRIES,
        max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
        bad_hit_ttl_s: int = DEFAULT_BAD_HIT_TTL_S,
    ) -> None:
        self._clock: Clock = clock or wall_clock_ms
        self._max_total_entries = max_total_entries
        self._max_total_bytes = max_total_bytes
        self._bad_hit_ttl_ms = bad_hit_ttl_s * 1000
        self._namespaces: dict[str, _Namespace] = {}
        # Every entry across namespaces in insertion order, for the global bound.
        self._order: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._total_bytes = 0
        self._seq = 0
        self._bad: OrderedDict[str, tuple[int, int]] = OrderedDict()  # namespace -> (count, expires_ms)
        self._served: OrderedDict[tuple[str, str], tuple[str, str, int]] = OrderedDict()
        self.errors = 0  # never fails; the attribute is the protocol's

    @property
    def total_entries(self) -> int:
        return len(self._order)

    @property
    def total_bytes(self) -> int:
        return self._total_bytes

    async def get(self, namespace: str, key: str) -> CacheEntry | None:
        ns = self._namespaces.get(namespace)
        stored = ns.entries.get(key) if ns is not None else None
        if stored is None:
            return None
        if stored.entry.expires_ms <= self._clock():
            self._drop(namespace, key)
            return None
        return stored.entry

    async def vectors(self, namespace: str) -> VectorSet:
        ns = self._namespaces.get(namespace)
        if ns is None:
            return VectorSet()
        return ns.index.snapshot(self._clock())

    async def put(self, namespace: str, key: str, entry: CacheEntry, *, max_entries: int, max_bytes: int) -> None:
        now = self._clock()
        # Sized as the Redis store sizes it (entry + vector record + key), so the two bound alike.
        record = vector_record(entry)
        size = len(encode_entry(entry)) + (len(encode_record(record)) if record is not None else 0) + len(key)
        if entry.expires_ms <= now or max_entries < 1 or size > max_bytes or size > self._max_total_bytes:
            return
        self._drop(namespace, key)
        ns = self._namespaces.setdefault(namespace, _Namespace())
        self._purge_expired(namespace, ns, now)
        while ns.entries and (len(ns.entries) + 1 > max_entries or ns.bytes + size > max_bytes):
            self._drop(namespace, next(iter(ns.entries)))
        while self._order and (
            len(self._order) + 1 > self._max_total_entries or self._total_bytes + size > self._max_total_bytes
        ):
            self._drop(*next(iter(self._order)))
        ns = self._namespaces.setdefault(namespace, _Namespace())  # the global bound may have emptied it
        self._seq += 1
        ns.entries[key] = _Stored(entry, self._seq, size)
        ns.bytes += size
        ns.index.put(key, self._seq, record)
        ns.next_expiry = min(ns.next_expiry, entry.expires_ms)
        self._order[(namespace, key)] = None
        self._total_bytes += size

    async def delete(self, namespace: str, key: str) -> None:
        self._drop(namespace, key)

    async def add_bad_hit(self, namespace: str, *, ttl_s: int | None = None) -> int:
        now = self._clock()
        count, expires = self._bad.get(namespace, (0, 0))
        if expires <= now:
            # A new count starts with its own absolute expiry; later reports do not move it.
            count, expires = 0, now + (ttl_s * 1000 if ttl_s is not None else self._bad_hit_ttl_ms)
        self._bad[namespace] = (count + 1, expires)
        if len(self._bad) > _MAX_COUNTERS:
            self._bad.popitem(last=False)
        return count + 1

    async def bad_hits(self, namespace: str) -> int:
        count, expires = self._bad.get(namespace, (0, 0))
        return count if expires > self._clock() else 0

    async def remember_served(self, tenant: str, response_id: str, namespace: str, key: str, ttl_s: int) -> None:
        if ttl_s <= 0:
            return
        slot = (tenant, response_id)
        self._served.pop(slot, None)
        self._served[slot] = (namespace, key, self._clock() + ttl_s * 1000)
        if len(self._served) > _MAX_COUNTERS:
            self._served.popitem(last=False)

    async def served(self, tenant: str, response_id: str) -> tuple[str, str] | None:
        found = self._served.get((tenant, response_id))
        if found is None or found[2] <= self._clock():
            return None
        return found[0], found[1]

    async def aclose(self) -> None:
        return None

    # -- internals -----------------------------------------------------------------------------------

    def _drop(self, namespace: str, key: str) -> None:
        ns = self._namespaces.get(namespace)
        if ns is None:
            return
        stored = ns.entries.pop(key, None)
        if stored is None:
            return
        ns.bytes -= stored.size
        ns.index.remove(key)
        self._order.pop((namespace, key), None)
        self._total_bytes -= stored.size
        if not ns.entries:
            del self._namespaces[namespace]

    def _purge_expired(self, namespace: str, ns: _Namespace, now: int) -> None:
        if now < ns.next_expiry:
            return
        for key in [k for k, s in ns.entries.items() if s.entry.expires_ms <= now]:
            self._drop(namespace, key)
        ns.next_expiry = min((s.entry.expires_ms for s in ns.entries.values()), default=2**62)
