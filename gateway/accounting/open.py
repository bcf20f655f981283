"""The ledger a state URL names: in-process for `memory`, Redis for redis:// (its own small pool with a
longer timeout than the hot path's: ledger batches are background work)."""

from __future__ import annotations

from urllib.parse import urlsplit

from redis.asyncio import Redis, RedisCluster

from gateway.accounting.ledger import Ledger, MemoryLedger
from gateway.accounting.redis_ledger import RedisLedger

LEDGER_TIMEOUT_S = 2.0


def open_ledger(url: str) -> Ledger:
    scheme = url.split("://", 1)[0].lower() if "://" in url else url.lower()
    if scheme == "memory":
        return MemoryLedger()
    if scheme.endswith("+cluster"):
        parts = urlsplit(url)
        cluster = RedisCluster(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            password=parts.password,
            ssl=scheme.startswith("rediss"),
            socket_timeout=LEDGER_TIMEOUT_S,
            socket_connect_timeout=LEDGER_TIMEOUT_S,
        )
        return RedisLedger(cluster)
    client = Redis.from_url(
        url, socket_timeout=LEDGER_TIMEOUT_S, socket_connect_timeout=LEDGER_TIMEOUT_S, max_connections=4
    )
    return RedisLedger(client)
