"""CPU per request of the candidate upstream HTTP clients, in isolation (no gateway).

    python -m loadtest.client_bench [--requests 3000] [--concurrency 32]

Starts the fast upstream (`nice -n 10`) and, in this process, sends the same POST /v1/chat/completions
through: aiohttp.ClientSession directly (what the `openai` adapter uses now), httpx.AsyncClient on the
httpx_aiohttp transport (the adapter before it dropped httpx), and httpx.AsyncClient on its own transport
(httpcore). httpx and httpx_aiohttp are dev dependencies only, kept here to show why the adapter moved.
Reports this process's CPU ms per request (time.process_time over the measured window) for JSON answers
and for streamed answers read chunk by chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

from loadtest.overhead import upstream

BODY = b'{"model":"m","messages":[{"role":"user","content":"Write one short sentence about rivers."}],"max_tokens":64}'
STREAM_BODY = BODY[:-1] + b',"stream":true,"stream_options":{"include_usage":true}}'
HEADERS = {"content-type": "application/json", "accept": "application/json, text/event-stream"}

Send = Callable[[bool], Awaitable[int]]


async def _drive(send: Send, stream: bool, requests: int, concurrency: int) -> float:
    """CPU ms per request of `requests` sends at `concurrency` (after a warm-up)."""
    remaining = concurrency * 4

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await send(stream)

    await asyncio.gather(*(worker() for _ in range(concurrency)))  # warm-up: open the connections
    remaining = requests
    cpu0 = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.process_time() - cpu0) * 1000 / requests


async def bench(base: str, requests: int, concurrency: int) -> list[tuple[str, float, float]]:
    url = base + "/chat/completions"
    rows: list[tuple[str, float, float]] = []

    connector = aiohttp.TCPConnector(limit=512)
    async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as session:

        async def send_aiohttp(stream: bool) -> int:
            async with session.post(url, data=STREAM_BODY if stream else BODY, headers=HEADERS) as resp:
                n = 0
                if stream:
                    async for chunk in resp.content.iter_any():
                        n += len(chunk)
                else:
                    n = len(await resp.read())
                return n

        rows.append(
            (
                "aiohttp.ClientSession",
                await _drive(send_aiohttp, False, requests, concurrency),
                await _drive(send_aiohttp, True, requests, concurrency),
            )
        )

    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    for label, transport in (
        ("httpx + httpx_aiohttp transport", AiohttpTransport(limits=limits, trust_env=False)),
        ("httpx (httpcore)", None),
    ):
        async with httpx.AsyncClient(base_url=base, transport=transport, limits=limits, trust_env=False) as client:

            async def send_httpx(stream: bool, client: httpx.AsyncClient = client) -> int:
                request = client.build_request(
                    "POST", "/chat/completions", content=STREAM_BODY if stream else BODY, headers=HEADERS
                )
                response = await client.send(request, stream=True)
                n = 0
                try:
                    if stream:
                        async for chunk in response.aiter_raw():
                            n += len(chunk)
                    else:
                        n = len(await response.aread())
                finally:
                    await response.aclose()
                return n

            rows.append(
                (
                    label,
                    await _drive(send_httpx, False, requests, concurrency),
                    await _drive(send_httpx, True, requests, concurrency),
                )
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="CPU per request of upstream HTTP clients.")
    parser.add_argument("--requests", "-n", type=int, default=3000)
    parser.add_argument("--concurrency", "-c", type=int, default=32)
    args = parser.parse_args(argv)
    import uvloop

    with tempfile.TemporaryDirectory(prefix="strait-clients-") as tmp, upstream(Path(tmp), 0.0, 0.0) as (_, port):
        rows = uvloop.run(bench(f"http://127.0.0.1:{port}/v1", args.requests, args.concurrency))
    print(f"client CPU per request, {args.requests} requests at concurrency {args.concurrency}\n")
    print("| client | JSON (ms CPU/request) | stream (ms CPU/stream) |")
    print("|---|---:|---:|")
    for label, json_ms, stream_ms in rows:
        print(f"| {label} | {json_ms:.3f} | {stream_ms:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
