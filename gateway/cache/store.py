"""The cache's storage: the `CacheStore` protocol and `open_cache_store(url)`.

    memory                   in process (one replica; `make run`), bounded per namespace and in total
    redis://host:port/db     one Redis (rediss:// for TLS): see redis_store.py for the key space
    redis+cluster://host:port  Redis Cluster (rediss+cluster://); a namespace lives on one slot

Contract, for every implementation:
- `get` is the exact tier: one round trip; an entry past its `expires_ms` is a miss even if the store
  still holds it.
- `put` stores with an absolute expiry (the entry's `expires_ms`, set once, never renewed by a read),
  then bounds the namespace to `max_entries` and `max_bytes`, evicting oldest first. An entry that
  alone exceeds `max_bytes`, or is already expired, is not stored.
- `vectors` is the namespace's searchable entries (those put with a query and a vector), loaded on
  first use, kept in process and brought up to date with at most one round trip per call.
- Every failure (store down, timeout, frozen server, garbage data) is a miss or a no-op, bounded by
  `timeout_s`, never an exception; failures are counted in `errors` (exported as a metric).
"""

from __future__ import annotations

from typing import Protocol

from gateway.cache.entry import CacheEntry
from gateway.cache.vectors import EMPTY, VectorSet
from gateway.state.base import Clock
from gateway.state.breaker import BreakerConfig

__all__ = [
    "EMPTY",
    "CacheEntry",
    "CacheStore",
    "CacheStoreConfigError",
    "VectorSet",
    "open_cache_store",
]

DEFAULT_TIMEOUT_S = 0.05
_DEFAULT_BREAKER = BreakerConfig()


class CacheStoreConfigError(ValueError):
    """A cache store URL or setting that cannot work (raised at start-up, never per request)."""


class CacheStore(Protocol):
    # Store calls that failed (error, timeout, garbage read); a metric. Calls skipped while the
    # breaker is open are not failures (the memory store never fails).
    errors: int

    async def get(self, namespace: str, key: str) -> CacheEntry | None: ...

    async def vectors(self, namespace: str) -> VectorSet: ...

    async def put(self, namespace: str, key: str, entry: CacheEntry, *, max_entries: int, max_bytes: int) -> None: ...

    async def delete(self, namespace: str, key: str) -> None: ...

    async def add_bad_hit(self, namespace: str, *, ttl_s: int | None = None) -> int:
        """Count one bad-hit report for the namespace; the count so far (0 when the store failed). The
        count expires `ttl_s` (default: the store's, 7 days) after its first report, never moved."""
        ...

    async def bad_hits(self, namespace: str) -> int: ...

    async def remember_served(self, tenant: str, response_id: str, namespace: str, key: str, ttl_s: int) -> None:
        """Which entry answered `response_id` (for feedback), readable by this tenant only."""
        ...

    async def served(self, tenant: str, response_id: str) -> tuple[str, str] | None: ...

    async def aclose(self) -> None: ...


def open_cache_store(
    url: str,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    clock: Clock | None = None,
    breaker: BreakerConfig = _DEFAULT_BREAKER,
    max_connections: int = 32,
) -> CacheStore:
    """Build the store a cache URL names. Nothing connects here: a store opened while Redis is down
    answers misses and recovers by itself. `clock` (epoch ms) is for tests."""
    if timeout_s <= 0:
        raise CacheStoreConfigError("cache timeout_s must be > 0")
    scheme = url.split("://", 1)[0].lower() if "://" in url else url.lower()
    if scheme == "memory":
        from gateway.cache.memory import MemoryCacheStore

        return MemoryCacheStore(clock=clock)
    from gateway.cache.redis_store import RedisCacheStore
    from gateway.state import StoreConfigError, redis_client

    try:
        found = redis_client(url, timeout_s=timeout_s, max_connections=max_connections)
    except StoreConfigError as exc:
        raise CacheStoreConfigError(f"cache: {exc}") from None
    if found is not None:
        return RedisCacheStore(
            found[0], timeout_s=timeout_s, clock=clock, breaker=breaker, max_connections=max_connections
        )
    raise CacheStoreConfigError(
        f"unknown cache store URL scheme {scheme!r}: use memory, redis://, rediss:// or redis+cluster://"
    )
