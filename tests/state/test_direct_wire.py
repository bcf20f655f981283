"""gateway.state.scripts.DirectConnections on a real redis-server: replies parsed off the hijacked transport."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.state.scripts import DirectConnections, _Wire, pack
from tests.harness.redis_proc import RedisProc


async def test_replies_come_in_order_with_error_replies_as_values_and_the_connection_is_reused() -> None:
    server = RedisProc().start()
    try:
        client = Redis(port=server.port, socket_timeout=2)
        direct = DirectConnections(client)
        replies = await direct.call_many([pack(["SET", "k", "v"]), pack(["INCR", "k"]), pack(["GET", "k"])])
        assert replies[0] == b"OK" and isinstance(replies[1], ResponseError) and replies[2] == b"v"
        # A reply split across reads (a large one) is parsed once complete.
        big = "x" * 300_000
        assert await direct.call(pack(["SET", "big", big])) == b"OK"
        assert await direct.call(pack(["GET", "big"])) == big.encode()
        assert isinstance(direct._wire, _Wire) and direct._idle == []  # one connection, reused
        with pytest.raises(ResponseError):
            await direct.call(pack(["INCR", "k"]))
        await direct.close()
        await client.aclose()
    finally:
        server.cleanup()


async def test_calls_of_one_loop_turn_share_one_write_and_each_gets_its_own_replies() -> None:
    server = RedisProc().start()
    try:
        client = Redis(port=server.port, socket_timeout=2)
        direct = DirectConnections(client)
        assert await direct.call(pack(["PING"])) == b"PONG"  # connected
        wire = direct._wire
        assert wire is not None
        writes: list[bytes] = []
        real_write = wire.transport.write

        def counting(data: bytes) -> None:
            writes.append(data)
            real_write(data)

        wire.transport.write = counting  # type: ignore[method-assign]
        calls = [direct.call_many([pack(["INCRBY", "n", str(i)]), pack(["ECHO", f"e{i}"])]) for i in range(1, 6)]
        results = await asyncio.gather(*calls)
        assert len(writes) == 1  # five callers, one send
        totals = [r[0] for r in results]
        assert sorted(totals) == [1, 3, 6, 10, 15] and [r[1] for r in results] == [b"e1", b"e2", b"e3", b"e4", b"e5"]
        # A caller that leaves does not put the connection out of step: its replies are dropped.
        left = asyncio.ensure_future(direct.call(pack(["ECHO", "gone"])))
        stays = asyncio.ensure_future(direct.call(pack(["ECHO", "here"])))
        await asyncio.sleep(0)
        left.cancel()
        assert await stays == b"here"
        assert await direct.call(pack(["ECHO", "next"])) == b"next"
        await direct.close()
        await client.aclose()
    finally:
        server.cleanup()


async def test_a_silent_redis_times_out_and_the_connection_is_not_reused() -> None:
    server = RedisProc().start()
    try:
        client = Redis(port=server.port, socket_timeout=0.2)
        direct = DirectConnections(client)
        assert await direct.call(pack(["PING"])) == b"PONG"
        server.freeze()
        frozen = direct._wire
        with pytest.raises(RedisTimeoutError):
            await direct.call(pack(["PING"]))
        assert frozen is not None and not frozen.alive  # closed: the late PONG can never answer another call
        server.thaw()
        assert await direct.call(pack(["PING"])) == b"PONG"
        assert direct._wire is not frozen
        await direct.close()
        await client.aclose()
    finally:
        server.cleanup()


async def test_a_reset_closes_only_a_connection_whose_oldest_call_is_stuck() -> None:
    server = RedisProc().start()
    try:
        client = Redis(port=server.port, socket_timeout=5)
        direct = DirectConnections(client)
        assert await direct.call(pack(["PING"])) == b"PONG"
        first = direct._wire
        fresh = asyncio.ensure_future(direct.call(pack(["ECHO", "fresh"])))
        await asyncio.sleep(0)  # queued on the connection
        direct.reset(stuck_s=10.0)  # its oldest call is younger than that: left alone
        assert await fresh == b"fresh" and direct._wire is first
        stuck = asyncio.ensure_future(direct.call(pack(["ECHO", "stuck"])))
        await asyncio.sleep(0)
        direct.reset(stuck_s=0.0)
        with pytest.raises(RedisTimeoutError):
            await stuck
        assert first is not None and not first.alive
        assert await direct.call(pack(["ECHO", "again"])) == b"again" and direct._wire is not first
        await direct.close()
        await client.aclose()
    finally:
        server.cleanup()


async def test_a_reset_closes_a_connection_whose_callers_all_left_even_if_young() -> None:
    """A frozen Redis: callers that gave up (cancelled) must not leave their connection open behind them."""
    server = RedisProc().start()
    try:
        client = Redis(port=server.port, socket_timeout=5)
        direct = DirectConnections(client)
        assert await direct.call(pack(["PING"])) == b"PONG"
        first = direct._wire
        assert first is not None
        server.freeze()
        left = asyncio.ensure_future(direct.call(pack(["ECHO", "left"])))
        await asyncio.sleep(0)  # queued and written
        left.cancel()
        with pytest.raises(asyncio.CancelledError):
            await left
        assert first.abandoned()
        direct.reset(stuck_s=10.0)  # young, but nobody waits for it any more: closed
        assert not first.alive and direct._wire is None
        server.thaw()
        assert await direct.call(pack(["ECHO", "again"])) == b"again"
        await direct.close()
        await client.aclose()
    finally:
        if server.frozen:
            server.thaw()
        server.cleanup()


async def test_a_reply_nobody_asked_for_retires_the_connection_and_never_answers_a_later_call() -> None:
    server = RedisProc().start()
    try:
        client = Redis(port=server.port, socket_timeout=5)
        direct = DirectConnections(client)
        assert await direct.call(pack(["PING"])) == b"PONG"
        wire = direct._wire
        assert wire is not None
        # A reply with no caller waiting (what an out-of-step connection or a server push looks like).
        wire.transport.write(pack(["ECHO", "stray"]))
        deadline = asyncio.get_running_loop().time() + 10
        while wire.alive and not wire._reader.has_data():
            assert asyncio.get_running_loop().time() < deadline, "the stray reply never arrived"
            await asyncio.sleep(0.01)
        assert await direct.call(pack(["ECHO", "next"])) == b"next"
        await direct.close()
        await client.aclose()
    finally:
        server.cleanup()


async def test_a_failed_connect_nobody_waited_for_does_not_fail_the_next_call() -> None:
    server = RedisProc().start()
    try:
        server.kill()  # nothing listens: the connect fails
        client = Redis(port=server.port, socket_timeout=5)
        direct = DirectConnections(client)
        left = asyncio.ensure_future(direct.call(pack(["PING"])))
        await asyncio.sleep(0)  # the connect started
        connecting = direct._connecting
        assert connecting is not None
        left.cancel()  # its only caller leaves before it fails
        with pytest.raises(asyncio.CancelledError):
            await left
        await asyncio.wait([connecting])
        server.start()
        assert await direct.call(pack(["PING"])) == b"PONG"  # a fresh connect, not the old failure
        await direct.close()
        await client.aclose()
    finally:
        server.cleanup()
