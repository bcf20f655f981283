"""Stored responses in Redis: the state's Redis, so every replica reads what any replica stored.

Key space, per tenant (one hash tag: a tenant's keys live on one Redis Cluster slot):

    strait:resp:{<tenant digest>}:e:<response id>   the blob, with its TTL (PX)
    strait:resp:{<tenant digest>}:ids               sorted set of the tenant's ids by time stored (the bound)

The tenant's name is hashed into the key (names are the policy's, but any character may be in one).
Putting is one script (store, index, drop expired index rows, evict the tenant's oldest beyond its bound).
Every call is bounded by `timeout_s`; a failed write is False (logged), a failed read raises
`ResponseStoreUnavailable`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.asyncio import Redis, RedisCluster

from gateway.responses_store import ResponseStoreUnavailable
from gateway.state.deadline import Deadline

log = logging.getLogger("strait")
T = TypeVar("T")

# KEYS: 1 the entry, 2 the tenant's index. ARGV: 1 id, 2 blob, 3 ttl ms, 4 now ms, 5 max per tenant,
# 6 the tenant's entry key prefix.
_PUT = """
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
local now, ttl = tonumber(ARGV[4]), tonumber(ARGV[3])
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - ttl)
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[5])
if over > 0 then
  local oldest = redis.call('ZRANGE', KEYS[2], 0, over - 1)
  for _, id in ipairs(oldest) do
    redis.call('DEL', ARGV[6] .. id)
  end
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, over - 1)
end
redis.call('PEXPIRE', KEYS[2], ttl)
return 1
"""


def tenant_prefix(tenant: str) -> str:
    digest = hashlib.sha256(tenant.encode()).hexdigest()[:24]
    return f"strait:resp:{{{digest}}}:"


class RedisResponseStore:
    def __init__(self, client: Redis | RedisCluster, *, timeout_s: float) -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._put = client.register_script(_PUT)

    async def put(self, tenant: str, response_id: str, blob: bytes, *, ttl_s: int, max_per_tenant: int) -> bool:
        if ttl_s <= 0 or max_per_tenant < 1:
            return False
        prefix = tenant_prefix(tenant)
        keys = [prefix + "e:" + response_id, prefix + "ids"]
        args: list[Any] = [response_id, blob, ttl_s * 1000, int(time.time() * 1000), max_per_tenant, prefix + "e:"]
        try:
            await self._call(lambda: self._put(keys=keys, args=args))
        except ResponseStoreUnavailable:
            log.warning("stored responses: writing %s failed; it cannot be read back", response_id)
            return False
        return True

    async def get(self, tenant: str, response_id: str) -> bytes | None:
        found = await self._call(lambda: self._client.get(tenant_prefix(tenant) + "e:" + response_id))
        return found if isinstance(found, bytes) else None

    async def delete(self, tenant: str, response_id: str) -> bool:
        prefix = tenant_prefix(tenant)
        deleted = await self._call(lambda: self._client.delete(prefix + "e:" + response_id))
        await self._call(lambda: self._client.zrem(prefix + "ids", response_id))
        return bool(deleted)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            async with Deadline(self._timeout_s):
                return await fn()
        except Exception as exc:
            log.debug("stored responses: store call failed", exc_info=True)
            raise ResponseStoreUnavailable(type(exc).__name__) from None
