"""Running one Lua script several times in one pipeline, without redis-py's extra round trip.

A pipeline that queues a `Script` makes redis-py send `SCRIPT EXISTS` (and wait for it) before every
`execute`: one more round trip and command per batch. Here the pipeline sends plain EVALSHAs; if Redis
no longer knows the script (restarted, `SCRIPT FLUSH`), those calls are answered NOSCRIPT without
running, and are sent again through the `Script` object, which loads it.
"""

from __future__ import annotations

import asyncio
from collections import deque
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
    transport is handed to this protocol, which pipelines the callers' packed commands and parses the
    replies with hiredis as they arrive.

    Commands given during one turn of the event loop leave together in one write at its end (the
    admissions of the requests that arrived together: one send and one reply read for all of them, and
    one read and one write for Redis), and each caller's replies are handed to its own future in order.
    redis-py's read path (a StreamReader, a read coroutine and a parser call per reply, `wait_for`
    around each write, one connection per call in flight) cost more CPU per admission than everything
    else in it (loadtest/README.md, "Issue 8 cost, second pass").

    A caller that leaves (cancelled) just drops its future: its replies still arrive in their place
    and are discarded, so the connection stays in step. redis-py's socket_timeout bounds the wait of the
    oldest call still unanswered; past it, or on a protocol error or a lost connection, every waiting
    call fails and the connection is closed.
    """

    def __init__(self, conn: Any, transport: asyncio.Transport, reader: Any) -> None:
        self.conn = conn  # the redis-py connection it came from (for its final disconnect)
        self.transport = transport
        self.alive = True
        self._reader = reader
        self._loop = asyncio.get_running_loop()
        # Callers in the order their commands were written: [replies wanted, replies so far, future, sent at].
        self._waiting: deque[tuple[int, list[Any], asyncio.Future[list[Any]], float]] = deque()
        self._out: list[bytes] = []  # commands of this loop turn, written together by _flush
        self._timeout_s: float | None = conn.socket_timeout
        self._timer: asyncio.TimerHandle | None = None

    def request(self, data: bytes, replies: int) -> asyncio.Future[list[Any]]:
        """Queue `data` (that many commands) for this turn's write; the future of their replies, in order."""
        waiter: asyncio.Future[list[Any]] = self._loop.create_future()
        if not self.alive:
            waiter.set_exception(ConnectionError("Connection closed by server."))
            return waiter
        now = self._loop.time()
        self._waiting.append((replies, [], waiter, now))
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out.append(data)
        if self._timeout_s is not None and self._timer is None:
            self._timer = self._loop.call_at(now + self._timeout_s, self._on_timer)
        return waiter

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self.alive and out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        waiting = self._waiting
        try:
            while waiting:
                want, got, waiter, _ = waiting[0]
                while len(got) < want:
                    reply = self._reader.gets()
                    if reply is _NOT_ENOUGH_DATA:
                        return
                    got.append(reply)
                waiting.popleft()
                if not waiter.done():  # else its caller left: the replies are dropped
                    waiter.set_result(got)
            if self._reader.has_data():
                # Bytes with no call waiting for them: the connection is out of step (a later call must
                # never take them for its reply).
                raise InvalidResponse("Redis sent a reply no call was waiting for")
        except (InvalidResponse, hiredis.HiredisError) as exc:  # a protocol error: out of step
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError("Connection closed by server."))

    def _on_timer(self) -> None:
        self._timer = None
        if not self._waiting:
            return
        assert self._timeout_s is not None
        due = self._waiting[0][3] + self._timeout_s
        if self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._on_timer)  # the oldest call is younger than that
            return
        self._fail(TimeoutError(f"Timeout reading from Redis ({self._timeout_s:g} s)"))

    def abandoned(self) -> bool:
        """Calls are waiting for replies and every one of their callers has left (timed out, cancelled)."""
        return bool(self._waiting) and all(waiter.done() for _, _, waiter, _ in self._waiting)

    def waiting_since(self) -> float:
        """When the oldest unanswered call was queued (loop time; infinity when none is waiting)."""
        return self._waiting[0][3] if self._waiting else float("inf")

    def close_failing(self, exc: Exception) -> None:
        """Close it; every call still waiting fails with `exc`."""
        self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        self.close()
        waiting, self._waiting = self._waiting, deque()
        for _, _, waiter, _ in waiting:
            if not waiter.done():
                waiter.set_exception(exc)

    def close(self) -> None:
        self.alive = False
        self._out = []
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
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
    """EVALSHA on a connection of our own, for the single-Redis hot path (admission, reconcile, renew).

    redis-py's `Script.__call__` -> `execute_command` -> pool costs ~30 us of CPU per call here (argument
    encoding item by item, pool locks, retry wrapper, observability events on every acquire/release):
    about as much as everything else in an admission. Here a command arrives packed (its constant
    part packed once per binding) and goes out pipelined on one connection (_Wire: the calls of one loop
    turn in one write, replies parsed by hiredis as they arrive). The connection is opened by redis-py
    from the client pool's settings (address, auth, db, TLS), again after it failed. NOSCRIPT (Redis
    restarted or flushed its scripts) loads the script and runs those commands again, once.
    Without hiredis, calls go through redis-py's own connections (one per call in flight).
    """

    __slots__ = ("_connecting", "_idle", "_plain", "_pool", "_wire")

    def __init__(self, client: Redis) -> None:
        self._pool = client.connection_pool
        self._wire: _Wire | None = None
        self._connecting: asyncio.Future[_Wire | None] | None = None
        self._idle: list[Any] = []  # redis-py connections, when they cannot be handed to a _Wire
        self._plain = False  # set once a connection could not be handed over: redis-py's path from then on

    async def call(self, packed: bytes, script: str | None = None) -> Any:
        """Send one packed command and return its reply (an error reply raises). `script`: the source of
        the script the command EVALSHAs, loaded and run again on NOSCRIPT."""
        reply = (await self.call_many([packed], script))[0]
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def call_many(self, commands: Sequence[bytes], script: str | None = None) -> list[Any]:
        """Send packed commands together and read their replies, in order; an error reply is returned
        as its exception. EVALSHAs answered NOSCRIPT are run again after loading `script` (if given)."""
        if self._plain:
            return await self._call_many_redis_py(commands, script)
        wire = self._wire
        if wire is None or not wire.alive:
            wire = await self._connect()
            if wire is None:
                return await self._call_many_redis_py(commands, script)
        replies = await wire.request(commands[0] if len(commands) == 1 else b"".join(commands), len(commands))
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing and script is not None:
            (loaded,) = await wire.request(pack(["SCRIPT", "LOAD", script]), 1)
            if isinstance(loaded, Exception):
                raise loaded
            again = await wire.request(b"".join(commands[i] for i in missing), len(missing))
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def _connect(self) -> _Wire | None:
        """The pipelined connection, opened once for every caller waiting for it (None: no hiredis)."""
        connecting = self._connecting
        if connecting is None:
            connecting = self._connecting = asyncio.ensure_future(self._open())
            # Forgotten as soon as it is done, even if every caller waiting for it has left: a later
            # call connects afresh, never receives an old failure.
            connecting.add_done_callback(self._opened)
        return await asyncio.shield(connecting)

    def _opened(self, connecting: asyncio.Future[_Wire | None]) -> None:
        if self._connecting is connecting:
            self._connecting = None
        if not connecting.cancelled():
            connecting.exception()  # retrieved: the callers that waited got it; none is logged unseen

    async def _open(self) -> _Wire | None:
        old = self._wire
        if old is not None:
            self._wire = None
            await old.conn.disconnect(nowait=True)
        conn = self._pool.make_connection()  # type: ignore[no-untyped-call]
        try:
            await conn.connect()
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        wire = _hijack(conn)
        if wire is None:
            self._plain = True
            self._idle.append(conn)
            return None
        self._wire = wire
        return wire

    async def _call_many_redis_py(self, commands: Sequence[bytes], script: str | None) -> list[Any]:
        """`call_many` through redis-py's own connections (a parser other than hiredis)."""
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

    def reset(self, stuck_s: float) -> None:
        """A call timed out in Redis: close the connection if its oldest unanswered call has waited at
        least `stuck_s`, or if every call waiting on it was given up (a connection opened since, with
        fresh calls still waited for, is left alone). The calls waiting on it fail now, what it sent is
        never read as anything else's, and the next call opens a new one (as redis-py's per-call
        connections did). A frozen Redis leaves no given-up connection open behind it."""
        wire = self._wire
        if wire is None or not wire.alive:
            return
        if wire.waiting_since() > asyncio.get_running_loop().time() - stuck_s and not wire.abandoned():
            return
        self._wire = None
        wire.close_failing(TimeoutError("Redis did not answer in time; the connection was reset"))
        wire.conn._writer = None  # its transport is closed above; redis-py's own close is not needed
        wire.conn._reader = None

    async def close(self) -> None:
        wire, self._wire = self._wire, None
        if wire is not None:
            wire.close()
            await wire.conn.disconnect(nowait=True)
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.disconnect()
