"""CPU of the whole gateway app per JSON request, in-process: `python -m loadtest.bench_app`.

    python -m loadtest.bench_app [--state off|memory|redis] [--requests 3000] [--concurrency 32]
                                 [--rounds 7] [--stream] [--latency-ms 50] [--chunk-delay-ms 20] [--capture] [--cache]

Builds the app as `strait serve` does (create_app: every stage, the access log written to a file,
`overhead`'s limits policy for memory/redis), starts it through its ASGI lifespan, and drives it with
ASGI calls from tasks in the same process: no HTTP server, no client library, no load generator. The
upstream is loadtest.fast_upstream in its own process (the gateway's aiohttp client is measured). Prints
the least process CPU time per request over the rounds (the least: the machine is shared; the noise of
other processes only adds). What it leaves out is uvicorn's HTTP parsing and writing; what it keeps is
every line of the gateway's own, so a change to it is measured here with a few microseconds' resolution,
where `loadtest.overhead` needs many alternated runs. `--stream` sends `stream: true` (12 events, the
usage chunk stripped); `--latency-ms` / `--chunk-delay-ms` pace the upstream as `overhead`'s paced run
does, so requests no longer share the event loop's turns (their Redis writes, their wake-ups).
`--capture` has the tenant consent to capture (every request, every redaction kind) into a SQLite file
in the run's temporary directory: the process CPU then includes the capture writer's thread (redaction,
assembly, SQLite writes), so `--capture` minus without is the whole cost of capture per request. Each
line also gives the median time from a request's first ASGI call to its answer's end. `--cache` turns the
tenant's exact cache on (`overhead`'s `cache` side): every answer after the warm-up is a hit, so the
CPU per request is the CPU per hit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from gateway.app import create_app
from gateway.policy.index import key_digest
from gateway.policy.load import freeze_loaded, serving_collector
from gateway.settings import Settings
from loadtest.overhead import CACHE_ON, HOST, POLICY_LIMITS, POLICY_OPEN, redis_server, upstream

KEY = "sk-bench-app-0123456789abcdef"
BODY = (
    b'{"model":"bench","messages":[{"role":"user","content":"Write one short sentence about rivers."}],"max_tokens":16}'
)
STREAM_BODY = BODY[:-1] + b',"stream":true}'
PATH = "/v1/chat/completions"
T = TypeVar("T")


def _scope(body: bytes) -> dict[str, Any]:
    headers = [
        (b"host", b"127.0.0.1:8000"),
        (b"user-agent", b"Python/3.11 aiohttp/3.10"),
        (b"accept", b"*/*"),
        (b"accept-encoding", b"gzip, deflate"),
        (b"authorization", f"Bearer {KEY}".encode()),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "scheme": "http",
        "method": "POST",
        "root_path": "",
        "path": PATH,
        "raw_path": PATH.encode(),
        "query_string": b"",
        "headers": headers,
        "state": {},
    }


async def _one(app: Any, body: bytes) -> int:
    sent = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Future()  # the client stays until the answer is over
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(_scope(body), receive, send)
    return status


LATENCIES: list[float] = []


async def _round(app: Any, requests: int, concurrency: int, body: bytes) -> float:
    left = requests
    bad = 0
    clock = time.perf_counter

    async def worker() -> None:
        nonlocal left, bad
        while left > 0:
            left -= 1
            started = clock()
            if await _one(app, body) != 200:
                bad += 1
            LATENCIES.append(clock() - started)

    before = os.times()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    after = os.times()
    user, system = after.user - before.user, after.system - before.system
    cpu = user + system
    if os.environ.get("BENCH_APP_SPLIT"):
        print(
            f"  user {user / requests * 1e6:.1f} us, system {system / requests * 1e6:.1f} us per request",
            file=sys.stderr,
        )
    if bad:
        raise SystemExit(f"{bad} requests did not get 200")
    return cpu / requests


@contextlib.asynccontextmanager
async def _lifespan(app: Any) -> Any:
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def send(message: dict[str, Any]) -> None:
        await outbox.put(message)

    task = asyncio.ensure_future(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, send))
    await inbox.put({"type": "lifespan.startup"})
    started = await _watched(outbox.get(), "the app's start-up")
    assert started["type"] == "lifespan.startup.complete", started
    try:
        yield
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        await _watched(outbox.get(), "the app's shutdown")
        await task


async def _bench(args: argparse.Namespace, policy: Path, state: str, workdir: Path) -> list[float]:
    log = (workdir / "access.log").open("wb")
    app = create_app(
        Settings(
            policy_path=str(policy),
            state=state,
            spool_dir=str(workdir / "spool"),
            state_timeout_ms=args.state_timeout_ms,
            capture=f"sqlite:///{workdir}/capture.db" if args.capture else "off",
        ),
        access_log_out=log,
    )
    # As `strait serve` does (create_app's drain_on_sigterm): start-up out of the collector's way, and the
    # serving young-generation threshold.
    freeze_loaded()
    serving_collector()
    async with _lifespan(app):
        body = STREAM_BODY if args.stream else BODY
        await _watched(_round(app, 200, args.concurrency, body), "the warm-up")  # connections, tokenizer, caches
        LATENCIES.clear()
        rounds = [
            await _watched(_round(app, args.requests, args.concurrency, body), "a round") for _ in range(args.rounds)
        ]
        if args.capture:
            metrics = app.state["gateway"].metrics
            metrics.render()
            counts = {
                r: metrics.registry.get_sample_value("strait_capture_records_total", {"result": r}) or 0
                for r in ("queued", "written", "dropped")
            }
            print(f"capture records: {counts}", file=sys.stderr)
        return rounds


async def _watched(step: Awaitable[T], what: str, limit_s: float = 120.0) -> T:
    """A step that has not ended after `limit_s` is stuck: where every task waits is printed."""
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait([task], timeout=limit_s)
    if not done:
        for other in asyncio.all_tasks():
            other.print_stack(file=sys.stderr)
        raise SystemExit(f"{what} did not end within {limit_s:g} s (the tasks' stacks are above)")
    return task.result()


@contextlib.contextmanager
def _state(kind: str, workdir: Path) -> Iterator[str]:
    if kind == "redis":
        with redis_server(workdir) as redis:
            yield redis.url()
    else:
        yield "memory"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state", choices=("off", "memory", "redis"), default="memory")
    parser.add_argument("--requests", "-n", type=int, default=3000, help="requests per round")
    parser.add_argument("--concurrency", "-c", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--state-timeout-ms", type=int, default=250, help="the store's deadline (raise it under valgrind)"
    )
    parser.add_argument("--stream", action="store_true", help="streamed requests (12 SSE events each)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="the upstream's delay before a JSON answer")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0, help="the upstream's TTFT and gap between events")
    parser.add_argument("--capture", action="store_true", help="the tenant consents to capture (SQLite, redaction on)")
    parser.add_argument(
        "--cache", action="store_true", help="the tenant's exact cache on: after the warm-up every answer is a hit"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="strait-bench-app-") as tmp:
        workdir = Path(tmp)
        with upstream(workdir, args.chunk_delay_ms, args.latency_ms) as (_, port), _state(args.state, workdir) as state:
            template = POLICY_OPEN if args.state == "off" else POLICY_LIMITS
            if args.capture:
                if args.state == "off":
                    raise SystemExit("--capture needs a tenant: --state memory or redis")
                template += "    capture: {{enabled: true, sample_rate: 1.0}}\n"
            if args.cache:
                if args.state == "off":
                    raise SystemExit("--cache needs a tenant: --state memory or redis")
                template += CACHE_ON.replace("{", "{{").replace("}", "}}")
            policy = workdir / "policy.yaml"
            policy.write_text(template.format(host=HOST, port=port, digest=key_digest(KEY)))
            try:
                import uvloop

                runner = uvloop.run
            except ImportError:
                runner = asyncio.run
            per_request = runner(_bench(args, policy, state, workdir))
    in_order = [x * 1e6 for x in per_request]
    us = sorted(in_order)
    print(
        f"state={args.state} c={args.concurrency}{' stream' if args.stream else ''}"
        f"{f' latency={args.latency_ms:g}ms' if args.latency_ms else ''}"
        f"{f' chunk-delay={args.chunk_delay_ms:g}ms' if args.chunk_delay_ms else ''} "
        f"{' capture' if args.capture else ''}{' cache' if args.cache else ''} "
        f"{args.rounds}x{args.requests} requests: CPU per request "
        f"least {us[0]:.1f} us, median {statistics.median(us):.1f} us, in run order {' '.join(f'{x:.0f}' for x in in_order)}; "
        f"latency p50 {statistics.median(LATENCIES) * 1e3:.2f} ms",
        file=sys.stdout,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
