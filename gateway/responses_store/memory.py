"""Stored responses in process (one replica: `make run`, tests). Same contract as the Redis store.

Bounded per tenant (the caller's `max_per_tenant`) and in total (`max_total_bytes`, oldest evicted first,
whatever the tenant). Expired entries go when read and when the oldest are evicted. No method awaits
between its reads and writes, so each is atomic on the event loop.
"""

from __future__ import annotations

from collections import OrderedDict

from gateway.state.base import Clock
from gateway.state.memory import wall_clock_ms

DEFAULT_MAX_TOTAL_BYTES = 256 * 1024 * 1024


class MemoryResponseStore:
    def __init__(self, *, clock: Clock | None = None, max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES) -> None:
        self._clock: Clock = clock or wall_clock_ms
        self._max_total_bytes = max_total_bytes
        # Every entry in insertion order (oldest first): (tenant, id) -> (expires at, ms; blob).
        self._entries: OrderedDict[tuple[str, str], tuple[int, bytes]] = OrderedDict()
        # Each tenant's ids, oldest first (for its own bound).
        self._tenants: dict[str, OrderedDict[str, None]] = {}
        self._bytes = 0

    async def put(self, tenant: str, response_id: str, blob: bytes, *, ttl_s: int, max_per_tenant: int) -> bool:
        if ttl_s <= 0 or max_per_tenant < 1 or len(blob) > self._max_total_bytes:
            return False
        self._drop(tenant, response_id)
        self._entries[(tenant, response_id)] = (self._clock() + ttl_s * 1000, blob)
        self._tenants.setdefault(tenant, OrderedDict())[response_id] = None
        self._bytes += len(blob)
        own = self._tenants[tenant]
        while len(own) > max_per_tenant:
            self._drop(tenant, next(iter(own)))
        while self._bytes > self._max_total_bytes:
            oldest_tenant, oldest_id = next(iter(self._entries))
            self._drop(oldest_tenant, oldest_id)
        return True

    async def get(self, tenant: str, response_id: str) -> bytes | None:
        found = self._entries.get((tenant, response_id))
        if found is None:
            return None
        if found[0] <= self._clock():
            self._drop(tenant, response_id)
            return None
        return found[1]

    async def delete(self, tenant: str, response_id: str) -> bool:
        return await self.get(tenant, response_id) is not None and self._drop(tenant, response_id)

    async def aclose(self) -> None:
        return None

    def _drop(self, tenant: str, response_id: str) -> bool:
        found = self._entries.pop((tenant, response_id), None)
        if found is None:
            return False
        self._bytes -= len(found[1])
        own = self._tenants[tenant]
        del own[response_id]
        if not own:
            del self._tenants[tenant]
        return True
