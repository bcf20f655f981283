"""Running one Lua script several times in one pipeline, without redis-py's extra round trip.

A pipeline that queues a `Script` makes redis-py send `SCRIPT EXISTS` (and wait for it) before every
`execute`: one more round trip and command per batch. Here the pipeline sends plain EVALSHAs; if Redis
no longer knows the script (restarted, `SCRIPT FLUSH`), those calls are answered NOSCRIPT without
running, and are sent again through the `Script` object, which loads it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError


async def run_script_many(
    client: Redis | RedisCluster, script: AsyncScript, calls: Sequence[tuple[Sequence[Any], Sequence[Any]]]
) -> list[Any]:
    """Each (keys, args) through `script`, in order, in one round trip when there are several (on Redis
    Cluster: concurrently, one call each); raises the first error a call got (NOSCRIPT is retried)."""
    if len(calls) == 1:
        keys, args = calls[0]
        return [await script(keys=keys, args=args)]
    if isinstance(client, RedisCluster):
        # Calls of different tenants live in different slots, maybe on different nodes: one call each,
        # concurrently (the first error is raised once all are done).
        return list(await asyncio.gather(*(script(keys=keys, args=args) for keys, args in calls)))
    pipe = client.pipeline(transaction=False)
    for keys, args in calls:
        pipe.evalsha(script.sha, len(keys), *keys, *args)
    results: list[Any] = await pipe.execute(raise_on_error=False)
    for i, result in enumerate(results):
        if isinstance(result, NoScriptError):
            keys, args = calls[i]
            results[i] = await script(keys=keys, args=args)
        elif isinstance(result, Exception):
            raise result
    return results


def bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


def pack(items: Sequence[str | int | bytes]) -> bytes:
    """A command in RESP, as redis-py would send it (strings UTF-8, integers in decimal)."""
    out = [b"*%d\r\n" % len(items)]
    for item in items:
        raw = item if isinstance(item, bytes) else str(item).encode()
        out.append(bulk(raw))
    return b"".join(out)


class DirectConnections:
    """EVALSHA on connections of our own, for the single-Redis hot path (admission, reconcile, renew).

    redis-py's `Script.__call__` -> `execute_command` -> pool costs ~30 us of CPU per call here (argument
    encoding item by item, pool locks, retry wrapper, observability events on every acquire/release):
    about as much as everything else in an admission. Here a command arrives packed (its constant
    part packed once per binding), goes out on a connection from a plain free list and its reply is
    read with the same connection class and parser (hiredis). Connections are made from the client
    pool's settings (address, auth, db, TLS); the store's semaphore caps how many exist.

    A connection goes back to the free list only after a complete request/reply or disconnected (an
    error or cancellation mid-call: redis-py's send/read disconnect, and anything else is disconnected
    here), so no late reply can ever be read as another call's. NOSCRIPT (Redis restarted or flushed
    its scripts) falls back to the `Script` object once, which loads the script.
    """

    __slots__ = ("_idle", "_pool")

    def __init__(self, client: Redis) -> None:
        self._pool = client.connection_pool
        self._idle: list[Any] = []

    async def call(self, packed: bytes, script: str | None = None) -> Any:
        """Send one packed command and return its reply (an error reply raises). `script`: the source of
        the script the command EVALSHAs, loaded and run again on NOSCRIPT."""
        reply = (await self.call_many([packed], script))[0]
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def call_many(self, commands: Sequence[bytes], script: str | None = None) -> list[Any]:
        """Send packed commands in one write and read their replies, in order; an error reply is returned
        as its exception. EVALSHAs answered NOSCRIPT are run again after loading `script` (if given)."""
        conn = self._idle.pop() if self._idle else self._pool.make_connection()  # type: ignore[no-untyped-call]
        try:
            if not conn.is_connected:
                await conn.connect()
            await conn.send_packed_command(b"".join(commands), check_health=False)
            replies = [await self._reply(conn) for _ in commands]
            missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
            if missing and script is not None:
                await conn.send_packed_command(pack(["SCRIPT", "LOAD", script]), check_health=False)
                await self._reply(conn)
                await conn.send_packed_command(b"".join(commands[i] for i in missing), check_health=False)
                for i in missing:
                    replies[i] = await self._reply(conn)
            return replies
        except BaseException:
            if conn.is_connected:
                await conn.disconnect(nowait=True)
            raise
        finally:
            self._idle.append(conn)

    @staticmethod
    async def _reply(conn: Any) -> Any:
        try:
            return await conn.read_response()
        except ResponseError as exc:
            return exc  # an error reply: the connection is in step

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.disconnect()
