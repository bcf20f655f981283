"""Shared state for limits and budgets: the `Store` protocol, its memory and Redis implementations.

`open_store(url)` is the one constructor the app calls (from `create_app`); the URL selects:

    memory                        in-process, one replica (the embedded default)
    redis://host:port/db          one Redis (rediss:// for TLS); one connection pool per store
    redis+cluster://host:port     Redis Cluster (rediss+cluster:// for TLS), any node to discover from

Nothing connects here: a store opened while Redis is down works (degraded) and recovers by itself.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from redis.asyncio import ConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.state.base import (
    Admission,
    AdmissionRequest,
    BudgetLimit,
    CheckResult,
    Clock,
    ConcurrencyLimit,
    Limits,
    RateLimit,
    Reconciliation,
    Store,
    StoreConfigError,
    StoreKind,
    StoreStatus,
    Ticket,
    Usage,
)
from gateway.state.breaker import Breaker, BreakerConfig
from gateway.state.memory import MemoryStore
from gateway.state.redis_store import RedisStore

__all__ = [
    "Admission",
    "AdmissionRequest",
    "BreakerConfig",
    "BudgetLimit",
    "CheckResult",
    "ConcurrencyLimit",
    "Limits",
    "MemoryStore",
    "RateLimit",
    "Reconciliation",
    "RedisStore",
    "Store",
    "StoreConfigError",
    "StoreStatus",
    "Ticket",
    "Usage",
    "open_store",
    "redis_client",
]

DEFAULT_TIMEOUT_S = 0.08
_DEFAULT_BREAKER = BreakerConfig()


def redis_client(url: str, *, timeout_s: float, max_connections: int) -> tuple[Redis | RedisCluster, StoreKind] | None:
    """The redis-py client a redis://, rediss://, redis+cluster:// or rediss+cluster:// URL names (None
    for any other scheme), built for calls bounded by the caller's own deadline: no retries, and on one
    Redis no socket timeout (the state and cache stores share this). Nothing connects here."""
    scheme = url.split("://", 1)[0].lower()
    no_retry = Retry(NoBackoff(), 0)
    if scheme in ("redis", "rediss"):
        # No socket timeout: the store's Deadline bounds each whole call (a cancelled call drops its
        # connection). With one, redis-py wraps every send in asyncio.wait_for (a Task per command on
        # Python 3.11) and every read in a timeout context: CPU on every admission for nothing.
        pool = ConnectionPool.from_url(
            url,
            max_connections=max_connections,
            socket_timeout=None,  # explicitly: redis-py 8 otherwise defaults to 5 s
            socket_connect_timeout=timeout_s,
            retry=no_retry,
        )
        return Redis.from_pool(pool), "redis"
    if scheme in ("redis+cluster", "rediss+cluster"):
        parts = urlsplit(url)
        if not parts.hostname:
            raise StoreConfigError(f"cluster URL needs host:port: {url!r}")
        cluster = RedisCluster(
            host=parts.hostname,
            port=parts.port or 6379,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            ssl=scheme == "rediss+cluster",
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            max_connections=max_connections,
            retry=no_retry,
        )
        return cluster, "redis-cluster"
    return None


def open_store(
    url: str,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    replicas_hint: int = 1,
    breaker: BreakerConfig = _DEFAULT_BREAKER,
    max_connections: int = 64,
    clock: Clock | None = None,
) -> Store:
    """Build the store a state URL names.

    `timeout_s` bounds every call (connect, handshake and reply together). `replicas_hint` is how many
    gateway processes share the limits: it sizes the local budget share used while Redis is away, and
    `memory` refuses it above 1 (per-process limits would silently multiply by the replica count).
    `clock` (epoch ms) is for tests: the memory store runs on it, the Redis scripts take it instead of `TIME`.
    """
    if timeout_s <= 0:
        raise StoreConfigError("timeout_s must be > 0")
    scheme = url.split("://", 1)[0].lower() if "://" in url else url.lower()
    if scheme == "memory":
        if replicas_hint > 1:
            raise StoreConfigError(
                f"state 'memory' is per process but replicas_hint={replicas_hint}: every replica would enforce "
                "its own limits (limit x replicas). Use a redis:// or redis+cluster:// state URL."
            )
        return MemoryStore(clock=clock) if clock is not None else MemoryStore()
    found = redis_client(url, timeout_s=timeout_s, max_connections=max_connections)
    if found is None:
        raise StoreConfigError(
            f"unknown state URL scheme {scheme!r}: use memory, redis://, rediss:// or redis+cluster://"
        )
    client, kind = found
    return RedisStore(
        client,
        kind=kind,
        timeout_s=timeout_s,
        replicas_hint=replicas_hint,
        breaker=Breaker(breaker),
        clock=clock,
        max_connections=max_connections,
    )
