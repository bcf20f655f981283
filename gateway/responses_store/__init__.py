"""Stored responses (`POST /v1/responses` with `store`, read back by `previous_response_id`,
`GET /v1/responses/{id}` and removed by `DELETE`): the `ResponseStore` protocol and `open_response_store(url)`.

    memory                    in process (one replica; `make run`), bounded in total (oldest evicted first)
    redis://host:port/db      the state's Redis (rediss:// for TLS; redis+cluster:// too): every replica
                              reads what any replica stored, so a conversation survives pooled gateways

Contract, for every implementation:
- Entries are keyed by (tenant, response id): a tenant never reads, lists or deletes another's; to the
  caller an id of another tenant and an unknown id are the same `None`.
- `put` stores a blob for `ttl_s` (absolute, never renewed by a read), then keeps at most
  `max_per_tenant` entries for the tenant, evicting its oldest first. A blob over `max_bytes` is not
  stored (False); so is one the store could not take (down, timed out: False, logged).
- `get` is the blob or None (unknown, expired, deleted, another tenant's); a store that cannot answer
  raises `ResponseStoreUnavailable` (a 503 to the client, never a misleading 404).
- `delete` says whether there was an entry to delete.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["ResponseStore", "ResponseStoreUnavailable", "open_response_store"]

# Each call's bound: a stored conversation can be megabytes, more than a limiter call's budget.
DEFAULT_TIMEOUT_S = 2.0


class ResponseStoreUnavailable(Exception):
    """The store could not be read (down, timed out)."""


class ResponseStore(Protocol):
    async def put(self, tenant: str, response_id: str, blob: bytes, *, ttl_s: int, max_per_tenant: int) -> bool: ...

    async def get(self, tenant: str, response_id: str) -> bytes | None: ...

    async def delete(self, tenant: str, response_id: str) -> bool: ...

    async def aclose(self) -> None: ...


def open_response_store(url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> ResponseStore:
    """The store a state URL names (`memory`, or a Redis one). Nothing connects here."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else url.lower()
    if scheme == "memory":
        from gateway.responses_store.memory import MemoryResponseStore

        return MemoryResponseStore()
    from gateway.responses_store.redis_store import RedisResponseStore
    from gateway.state import StoreConfigError, redis_client

    found = redis_client(url, timeout_s=timeout_s, max_connections=16)
    if found is None:
        raise StoreConfigError(
            f"unknown state URL scheme {scheme!r}: use memory, redis://, rediss:// or redis+cluster://"
        )
    return RedisResponseStore(found[0], timeout_s=timeout_s)
