"""A lean reference proxy: the yardstick Strait's cost is compared with (issue 8, "Cost"). Not a product.

    python -m loadtest.reference_proxy --port P --upstream http://127.0.0.1:U/v1 --redis redis://127.0.0.1:R/0 \
        --key-digest sha256:HEX [--upstream-model m] [--rpm N] [--max-concurrency N] [--flush-ms 20]

aiohttp server + one pooled aiohttp client session (limit 512, keep-alive) on uvloop, one process, one
thread; redis-py asyncio with hiredis (admissions: a blocking pool of 64 connections, accounting: its own).
Per `POST /v1/chat/completions` it does, in order:
  1. auth: `Authorization: Bearer K`, sha256(K) compared (constant time) with the one `--key-digest`
     (401 otherwise);
  2. decode the JSON body (msgspec, to a dict), set `model` to `--upstream-model`, and for streams set
     `stream_options.include_usage` (remembering whether the client asked for it), encode again;
  3. ONE Redis round trip: an EVALSHA of `ADMIT` below: a GCRA rate limit (`--rpm`, burst 1 s) and a
     concurrency slot (a sorted-set member leased for 10 min, `--max-concurrency`), both on Redis `TIME`
     (429 + retry-after when refused; 503 when Redis fails: fail closed);
  4. forward to the upstream. JSON: read the whole answer, decode only its `usage`, relay status and
     body. SSE: relay event by event as they arrive (one `write` per event, no buffering beyond an
     incomplete event); an event holding `"usage":` is decoded for the token counts and dropped unless
     the client asked for usage;
  5. in a `finally` (also on client disconnect): queue the slot release and a usage record. Every
     `--flush-ms` one non-transactional pipeline writes the whole queue: one ZREM of the released slots,
     one ZREMRANGEBYSCORE of expired leases, one XADD per usage record (stream `ref:usage`, capped at
     about 1M), and HINCRBY of the batch's totals (requests, prompt and completion tokens) per day.
Redis commands per admitted request: EVALSHA + TIME, GET, ZCOUNT, ZADD, SET inside it, + 1 XADD, plus
per batch 2 + 3 per day. `GET /healthz` and `GET /readyz` answer 200.

What it does NOT do (so the comparison is read fairly): one tenant and one key; no routing, model
catalogue, fallback, retries, failover or health ejection; no token counting or estimates, no token
limits, no budgets or prices; no per-request deadline beyond aiohttp's socket timeouts (connect 5 s, read
60 s); no request validation beyond "a JSON object" and no size limits beyond 4 MiB; no error
normalisation (upstream answers relayed as they are, 502 on a connection failure); no request ids, no
metrics, no logs per request, no tracing; no spool: a failed accounting pipeline is dropped (logged).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import itertools
import logging
import os
import signal
import time

import aiohttp
import msgspec
import redis.asyncio as aioredis
import uvloop
from aiohttp import web

log = logging.getLogger("reference_proxy")

# KEYS: rate (GCRA theoretical arrival time, ms), slots (sorted set: member -> lease expiry ms).
# ARGV: interval ms per request, burst ms, max concurrency, slot member, lease ms.
# Returns {0, 0} admitted, {1, retry_ms} rate limited, {2, retry_ms} at max concurrency.
ADMIT = """
local t = redis.call('TIME')
local now = t[1] * 1000 + t[2] / 1000
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + tonumber(ARGV[1])
if new_tat - now > tonumber(ARGV[2]) then return {1, math.ceil(new_tat - now - tonumber(ARGV[2]))} end
if redis.call('ZCOUNT', KEYS[2], now, '+inf') >= tonumber(ARGV[3]) then return {2, 100} end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), ARGV[4])
redis.call('SET', KEYS[1], string.format('%.4f', new_tat), 'PX', math.ceil(new_tat - now) + 1000)
return {0, 0}
"""
RATE_KEY, SLOTS_KEY, USAGE_STREAM = "ref:rate:bench", "ref:slots:bench", "ref:usage"
LEASE_MS = 600_000


class Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class HasUsage(msgspec.Struct):
    usage: Usage | None = None


decode_usage = msgspec.json.Decoder(HasUsage).decode


class Proxy:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.digest = args.key_digest.removeprefix("sha256:")
        self.url = args.upstream.rstrip("/") + "/chat/completions"
        self.interval_ms = str(60_000 / args.rpm)
        self.ids = itertools.count()
        self.prefix = f"{os.getpid()}:"
        self.released: list[str] = []
        self.records: list[tuple[str, int, int, int, float]] = []  # slot, status, prompt, completion, ms
        # Admissions: at most 64 in flight (a caller waits up to 1 s for a connection); accounting: its own one.
        pool = aioredis.BlockingConnectionPool.from_url(args.redis, max_connections=64, timeout=1)
        self.redis = aioredis.Redis(connection_pool=pool)
        self.acct = aioredis.Redis.from_url(args.redis, max_connections=2)
        self.admit = self.redis.register_script(ADMIT)
        self.session: aiohttp.ClientSession | None = None
        self.flusher: asyncio.Task[None] | None = None

    async def start(self, _app: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=512, keepalive_timeout=60, ttl_dns_cache=None)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60)
        self.session = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)
        await self.redis.script_load(ADMIT)
        self.flusher = asyncio.get_running_loop().create_task(self.flush_forever())

    async def stop(self, _app: web.Application) -> None:
        if self.flusher is not None:
            self.flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.flusher
        await self.flush()
        if self.session is not None:
            await self.session.close()
        await self.redis.aclose()
        await self.acct.aclose()

    async def flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self.args.flush_ms / 1000)
            await self.flush()

    async def flush(self) -> None:
        if not self.records and not self.released:
            return
        released, self.released = self.released, []
        records, self.records = self.records, []
        day = time.strftime("%Y%m%d", time.gmtime())
        pipe = self.acct.pipeline(transaction=False)
        if released:
            pipe.zrem(SLOTS_KEY, *released)
        pipe.zremrangebyscore(SLOTS_KEY, "-inf", time.time() * 1000 - 60_000)  # leases leaked by a crash
        prompt = completion = 0
        for slot, status, p, c, ms in records:
            prompt, completion = prompt + p, completion + c
            fields = {"req": slot, "status": status, "prompt": p, "completion": c, "ms": f"{ms:.2f}"}
            pipe.xadd(USAGE_STREAM, fields, maxlen=1_000_000, approximate=True)
        if records:
            totals = f"ref:totals:bench:{day}"
            pipe.hincrby(totals, "requests", len(records))
            pipe.hincrby(totals, "prompt_tokens", prompt)
            pipe.hincrby(totals, "completion_tokens", completion)
        try:
            await pipe.execute()
        except (aioredis.RedisError, OSError) as exc:
            log.warning("accounting batch of %d records dropped: %s", len(records), exc)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or not hmac.compare_digest(
            hashlib.sha256(auth[7:].encode()).hexdigest(), self.digest
        ):
            return web.json_response({"error": {"message": "invalid API key", "type": "auth_error"}}, status=401)
        try:
            body = msgspec.json.decode(await request.read())
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except (msgspec.DecodeError, ValueError):
            return web.json_response({"error": {"message": "invalid JSON", "type": "invalid_request"}}, status=400)
        body["model"] = self.args.upstream_model
        stream = body.get("stream") is True
        client_usage = False
        if stream:
            opts = body.get("stream_options")
            client_usage = isinstance(opts, dict) and opts.get("include_usage") is True
            body["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
        slot = self.prefix + str(next(self.ids))
        a = self.args
        try:
            verdict, retry_ms = await self.admit(
                keys=[RATE_KEY, SLOTS_KEY], args=[self.interval_ms, 1000, a.max_concurrency, slot, LEASE_MS]
            )
        except (aioredis.RedisError, OSError):
            return web.json_response({"error": {"message": "state unavailable", "type": "unavailable"}}, status=503)
        if verdict:
            why = "rate limited" if verdict == 1 else "too many concurrent requests"
            err = {"error": {"message": why, "type": "rate_limit"}}
            return web.json_response(err, status=429, headers={"retry-after": str(max(1, retry_ms // 1000))})
        started, status, usage = time.perf_counter(), 502, Usage()
        try:
            assert self.session is not None
            headers = {"content-type": "application/json"}
            async with self.session.post(self.url, data=msgspec.json.encode(body), headers=headers) as up:
                status = up.status
                if not stream or status != 200:
                    data = await up.read()
                    if status == 200:
                        with contextlib.suppress(msgspec.DecodeError):
                            usage = decode_usage(data).usage or usage
                    ctype = up.headers.get("content-type", "application/json")
                    return web.Response(body=data, status=status, headers={"content-type": ctype})
                resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
                await resp.prepare(request)
                tail = b""
                async for chunk in up.content.iter_any():
                    buf = tail + chunk if tail else chunk
                    start, end = 0, buf.find(b"\n\n")
                    while end != -1:
                        event = buf[start : end + 2]
                        if b'"usage":' in event:
                            with contextlib.suppress(msgspec.DecodeError):
                                usage = decode_usage(event[event.index(b"{") :]).usage or usage
                            if not client_usage:
                                event = b""
                        if event:
                            await resp.write(event)
                        start, end = end + 2, buf.find(b"\n\n", end + 2)
                    tail = buf[start:]
                if tail:
                    await resp.write(tail)
                await resp.write_eof()
                return resp
        except (aiohttp.ClientError, TimeoutError, OSError):
            if request.transport is None or request.transport.is_closing():
                raise  # the client is gone: nothing to answer
            return web.json_response({"error": {"message": "upstream failed", "type": "upstream"}}, status=502)
        finally:
            self.released.append(slot)
            elapsed = (time.perf_counter() - started) * 1000
            self.records.append((slot, status, usage.prompt_tokens, usage.completion_tokens, elapsed))


async def ok(_request: web.Request) -> web.Response:
    return web.Response(text='{"status":"ok"}', content_type="application/json")


async def serve(args: argparse.Namespace) -> None:
    proxy = Proxy(args)
    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.on_startup.append(proxy.start)
    app.on_cleanup.append(proxy.stop)
    app.router.add_post("/v1/chat/completions", proxy.chat)
    app.router.add_get("/healthz", ok)
    app.router.add_get("/readyz", ok)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port, backlog=1024).start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Lean aiohttp + Redis reference proxy (a load-test yardstick).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:9000/v1")
    p.add_argument("--upstream-model", default="m")
    p.add_argument("--redis", required=True, help="redis://host:port/db")
    p.add_argument("--key-digest", required=True, help="sha256:<hex> of the one accepted API key")
    p.add_argument("--rpm", type=float, default=100_000_000)
    p.add_argument("--max-concurrency", type=int, default=100_000)
    p.add_argument("--flush-ms", type=float, default=20.0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    uvloop.run(serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
