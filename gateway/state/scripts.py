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
from redis.exceptions import NoScriptError


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
