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

import hiredis
from redis._parsers.hiredis import _AsyncHiredisParser
from redis.asyncio import Redis, RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError, InvalidResponse, NoScriptError, ResponseError, TimeoutError

_NOT_ENOUGH_DATA: Any = object()


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
    """A command in RESP, as redis-py would send it (strings UTF-8, integers in decimal). One pass that
    makes bytes and one that frames them: the ledger packs ~16 arguments per usage record."""
    raws = [item if isinstance(item, bytes) else str(item).encode() for item in items]
    return b"*%d\r\n" % len(raws) + b"".join([b"$%d\r\n%b\r\n" % (len(raw), raw) for raw in raws])


class _Wire(asyncio.Protocol):
    """One Redis connection of our own once redis-py has opened it (AUTH, SELECT, TLS done): its
    transport is handed to this protocol, which writes packed commands and parses the replies with
    hiredis as they arrive, one future per batch. redis-py's read path (a StreamReader, a read
    coroutine and a parser call per reply, `wait_for` around the write) cost more CPU per admission
    than everything else in it (loadtest/README.md, "Issue 8 cost, second pass")."""

    def __init__(self, conn: Any, transport: asyncio.Transport, reader: Any) -> None:
        self.conn = conn  # the redis-py connection it came from (for its final disconnect)
        self.transport = transport
        self.alive = True
        # redis-py's socket_timeout bounds the wait for the replies, as it did on redis-py's read path.
        self._timeout_s: float | None = conn.socket_timeout
        self._timer: asyncio.TimerHandle | None = None
        self._reader = reader
        self._replies: list[Any] = []
        self._want = 0
        self._waiter: asyncio.Future[list[Any]] | None = None

    def request(self, data: bytes, replies: int) -> asyncio.Future[list[Any]]:
        """Write `data` (that many commands) and return the future of their replies, in order."""
        waiter: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        if not self.alive:
            waiter.set_exception(ConnectionError("Connection closed by server."))
            return waiter
        self._replies = []
        self._want = replies
        self._waiter = waiter
        self.transport.write(data)
        if self._timeout_s is not None:
            self._timer = waiter.get_loop().call_later(self._timeout_s, self._on_timeout)
        return waiter

    def _on_timeout(self) -> None:
        self._timer = None
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(TimeoutError(f"Timeout reading from Redis ({self._timeout_s:g} s)"))
        self.close()

    def _settle(self) -> asyncio.Future[list[Any]] | None:
        """The waiting future, taken (its timer stopped)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiter, self._waiter = self._waiter, None
        return waiter

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        waiter = self._waiter
        if waiter is None:
            return  # nobody asked: the connection is closed by its caller (never reused)
        try:
            while len(self._replies) < self._want:
                reply = self._reader.gets()
                if reply is _NOT_ENOUGH_DATA:
                    return
                self._replies.append(reply)
        except (InvalidResponse, hiredis.HiredisError) as exc:  # a protocol error: out of step
            self._settle()
            if not waiter.done():
                waiter.set_exception(exc)
            self.close()
            return
        self._settle()
        if not waiter.done():
            waiter.set_result(self._replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        waiter = self._settle()
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionError("Connection closed by server."))

    def close(self) -> None:
        self.alive = False
        self._settle()
        self.transport.close()


def _hijack(conn: Any) -> _Wire | None:
    """A connected redis-py connection's transport, handed to a _Wire; None if it cannot be (a parser
    other than hiredis, or no stream transport): the connection is then used through redis-py."""
    writer = getattr(conn, "_writer", None)
    parser = getattr(conn, "_parser", None)
    transport = getattr(writer, "transport", None)
    if not isinstance(parser, _AsyncHiredisParser) or transport is None or not hasattr(transport, "set_protocol"):
        return None
    buffered = getattr(parser, "_reader", None)
    if buffered is None or buffered.has_data():
        return None
    kwargs: dict[str, Any] = {
        "protocolError": InvalidResponse,
        "replyError": parser.parse_error,
        "notEnoughData": _NOT_ENOUGH_DATA,
    }
    if conn.encoder.decode_responses:
        kwargs["encoding"] = conn.encoder.encoding
        kwargs["errors"] = conn.encoder.encoding_errors
    wire = _Wire(conn, transport, hiredis.Reader(**kwargs))
    transport.set_protocol(wire)
    return wire


class DirectConnections:
    """EVALSHA on connections of our own, for the single-Redis hot path (admission, reconcile, renew).

    redis-py's `Script.__call__` -> `execute_command` -> pool costs ~30 us of CPU per call here (argument
    encoding item by item, pool locks, retry wrapper, observability events on every acquire/release):
    about as much as everything else in an admission. Here a command arrives packed (its constant
    part packed once per binding), goes out on a connection from a plain free list and its reply is
    parsed by hiredis as it arrives (_Wire). Connections are opened by redis-py from the client pool's
    settings (address, auth, db, TLS); the store's semaphore caps how many exist.

    A connection goes back to the free list only after a complete request/reply; an error or a
    cancellation mid-call closes it, so no late reply can ever be read as another call's. NOSCRIPT
    (Redis restarted or flushed its scripts) loads the script and runs those commands again, once.
    """

    __slots__ = ("_idle", "_pool")

    def __init__(self, client: Redis) -> None:
        self._pool = client.connection_pool
        self._idle: list[Any] = []  # _Wire, or a redis-py connection that could not be handed over

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
        idle = self._idle
        while idle:
            wire = idle.pop()
            if not isinstance(wire, _Wire):
                return await self._call_many_redis_py(wire, commands, script)
            if wire.alive:
                break
            await wire.conn.disconnect(nowait=True)
        else:
            conn = self._pool.make_connection()  # type: ignore[no-untyped-call]
            try:
                await conn.connect()
            except BaseException:
                await conn.disconnect(nowait=True)
                raise
            hijacked = _hijack(conn)
            if hijacked is None:
                return await self._call_many_redis_py(conn, commands, script)
            wire = hijacked
        try:
            replies = await wire.request(b"".join(commands), len(commands))
            missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
            if missing and script is not None:
                (loaded,) = await wire.request(pack(["SCRIPT", "LOAD", script]), 1)
                if isinstance(loaded, Exception):
                    raise loaded
                again = await wire.request(b"".join(commands[i] for i in missing), len(missing))
                for i, reply in zip(missing, again, strict=True):
                    replies[i] = reply
        except BaseException:
            wire.close()
            await wire.conn.disconnect(nowait=True)
            raise
        idle.append(wire)
        return replies

    async def _call_many_redis_py(self, conn: Any, commands: Sequence[bytes], script: str | None) -> list[Any]:
        """`call_many` through redis-py's own connection (a parser other than hiredis)."""
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
        for item in idle:
            if isinstance(item, _Wire):
                item.close()
                await item.conn.disconnect(nowait=True)
            else:
                await item.disconnect()
