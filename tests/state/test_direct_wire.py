"""gateway.state.scripts.DirectConnections on a real redis-server: replies parsed off the hijacked transport."""

from __future__ import annotations

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
        assert len(direct._idle) == 1 and isinstance(direct._idle[0], _Wire)  # one connection, reused
        with pytest.raises(ResponseError):
            await direct.call(pack(["INCR", "k"]))
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
        with pytest.raises(RedisTimeoutError):
            await direct.call(pack(["PING"]))
        assert direct._idle == []  # closed, so the late PONG can never answer another call
        server.thaw()
        assert await direct.call(pack(["PING"])) == b"PONG"
        await direct.close()
        await client.aclose()
    finally:
        server.cleanup()
