"""An asyncio load generator on aiohttp's client (cheap per request), for JSON and SSE chat completions.

Closed loop: `--concurrency` workers send requests back to back until `--requests` are done or
`--duration` seconds have passed, whichever comes first (both are always bounded).

    python -m loadtest.loadgen --url http://127.0.0.1:8080/v1/chat/completions --model bench \
        --concurrency 32 --requests 5000 --duration 10 [--stream] [--json] [--cpu gateway=PID] \
        [--header 'Authorization: Bearer KEY'] [--redis 127.0.0.1:PORT] [--settle 0.15]

Non-streaming: latency per request (status 200 and a body with "choices" count as success).
Streaming: TTFT (time to the first `data:` event carrying content: the role-only chunk engines send at
once does not count, as it is not a token, and Strait holds it until the first content arrives), total time, events per stream; a stream without
`data: [DONE]` last, or with an error event, counts as an error.
`--cpu NAME=PID` samples the CPU time of that process tree (from /proc) after the warm-up and at the end,
and reports CPU ms per request: the measured window contains only the measured requests.
`--settle S` waits S seconds after the warm-up and after the last request before the CPU (and Redis)
samples, so background work of the warm-up (usage records flushed every 50 ms, reconciles) lands before
the window and that of the measured requests inside it; req/s still uses the requests' own elapsed time.
`--redis HOST:PORT` diffs that Redis's `INFO stats` and `INFO commandstats` over the same window.
The result also carries the latency (and TTFT) at each of QUANTILES: the distribution the report plots.
`--progress` (default when stderr is a terminal and the output is not --json) draws a rich progress bar
over the measured window: requests answered of the bound, and the time left of --duration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp

from loadtest import redisinfo
from loadtest.procstat import CLK_TCK, machine_busy, tree_cpu_seconds

# A chunk whose delta (or legacy text) carries at least one character: the first token the client sees.
_FIRST_CONTENT = re.compile(rb'"(?:content|text)": ?"[^"]')
DEFAULT_MESSAGES = [{"role": "user", "content": "Write one short sentence about rivers."}]
# Percentiles at which a result keeps its latency (and TTFT) distribution: dense in the tail, where
# a gateway's cost shows; enough points for a smooth CDF in the report's plots (loadtest/report.py).
QUANTILES = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 97.5, 99.0, 99.5, 99.9)
# How often the measured window reports its progress (requests answered) to a `ticker`.
TICK_S = 0.2


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list (0.0 for an empty list)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass
class Summary:
    """Milliseconds."""

    p50: float = 0.0
    p90: float = 0.0
    p99: float = 0.0
    mean: float = 0.0
    max: float = 0.0

    @staticmethod
    def quantiles(seconds: list[float]) -> list[float]:
        """Milliseconds at each of QUANTILES (nearest rank); empty for no samples."""
        if not seconds:
            return []
        s = sorted(seconds)
        return [percentile(s, q) * 1000 for q in QUANTILES]

    @classmethod
    def of(cls, seconds: list[float]) -> Summary:
        if not seconds:
            return cls()
        s = sorted(seconds)
        return cls(
            p50=percentile(s, 50) * 1000,
            p90=percentile(s, 90) * 1000,
            p99=percentile(s, 99) * 1000,
            mean=sum(s) / len(s) * 1000,
            max=s[-1] * 1000,
        )


@dataclass
class Result:
    mode: str
    url: str
    concurrency: int
    count: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0  # first request sent to last answer received
    window_s: float = 0.0  # the CPU window: elapsed_s plus the settle time after the last answer
    rps: float = 0.0
    latency: Summary = field(default_factory=Summary)  # total time per request (streams: to the last byte)
    ttft: Summary | None = None  # streams only
    latency_quantiles: list[float] = field(default_factory=list)  # ms at each of QUANTILES
    ttft_quantiles: list[float] = field(default_factory=list)  # streams only; ms at each of QUANTILES
    events_per_stream: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)
    cpu_ms_per_request: dict[str, float] = field(default_factory=dict)
    machine_busy_pct: float = 0.0  # all cores, during the measured window
    machine_busy_s: float = 0.0  # CPU seconds used by everything on the machine during the window
    self_cpu_s: float = 0.0  # this load generator's own CPU seconds during the window
    # With --redis: counter deltas over the window; `redis_calls` per command (Lua-internal calls included).
    redis_stats: dict[str, int] = field(default_factory=dict)
    redis_calls: dict[str, int] = field(default_factory=dict)


class _Run:
    """Shared state of the workers of one measured (or warm-up) window."""

    def __init__(self, total: int, deadline: float) -> None:
        self.remaining = total
        self.deadline = deadline
        self.latencies: list[float] = []
        self.ttfts: list[float] = []
        self.events = 0
        self.errors: dict[str, int] = {}

    def take(self) -> bool:
        if self.remaining <= 0 or time.perf_counter() >= self.deadline:
            return False
        self.remaining -= 1
        return True

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


async def _one_json(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], run: _Run) -> None:
    started = time.perf_counter()
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            data = await resp.read()
            status = resp.status
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        run.error(type(exc).__name__)
        return
    if status != 200:
        run.error(f"http_{status}")
        return
    if b'"choices"' not in data:
        run.error("bad_body")
        return
    run.latencies.append(time.perf_counter() - started)


async def _one_stream(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], run: _Run
) -> None:
    started = time.perf_counter()
    first: float | None = None
    events = 0
    tail = b""
    errored = False
    last = b""
    done = False
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            if resp.status != 200:
                await resp.read()
                run.error(f"http_{resp.status}")
                return
            async for chunk in resp.content.iter_any():
                buf = tail + chunk if tail else chunk
                cut = buf.rfind(b"\n\n")
                if cut == -1:
                    tail = buf
                    continue
                complete, tail = buf[: cut + 2], buf[cut + 2 :]
                n = complete.count(b"data:")
                if first is None and _FIRST_CONTENT.search(complete):
                    first = time.perf_counter()
                events += n
                if b'data: {"error"' in complete:
                    errored = True
                last = complete
            done = not tail.strip() and events > 0 and last.endswith(b"data: [DONE]\n\n")
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        run.error(type(exc).__name__)
        return
    if errored:
        run.error("error_event")
        return
    if not done:
        run.error("no_done")
        return
    end = time.perf_counter()
    run.latencies.append(end - started)
    run.ttfts.append((first or end) - started)
    run.events += events - 1  # [DONE] is not an event of the answer


async def _worker(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], stream: bool, run: _Run
) -> None:
    one = _one_stream if stream else _one_json
    while run.take():
        await one(session, url, body, headers, run)


async def _tick(run: _Run, started: float, ticker: Callable[[int, float], None]) -> None:
    while True:
        await asyncio.sleep(TICK_S)
        ticker(len(run.latencies) + sum(run.errors.values()), time.perf_counter() - started)


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _parse_headers(specs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, value = spec.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"--header wants 'Name: value', got {spec!r}")
        out[name.strip().lower()] = value.strip()
    return out


def _parse_cpu(specs: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for spec in specs:
        name, _, pid = spec.partition("=")
        out[name] = int(pid)
    return out


async def run_load(
    url: str,
    *,
    model: str = "bench",
    concurrency: int = 1,
    requests: int = 1000,
    duration: float = 10.0,
    stream: bool = False,
    warmup: int = 0,
    timeout: float = 30.0,
    cpu_pids: dict[str, int] | None = None,
    messages: list[dict[str, str]] | None = None,
    max_tokens: int = 64,
    extra_headers: dict[str, str] | None = None,
    settle: float = 0.0,
    redis: tuple[str, int] | None = None,
    ticker: Callable[[int, float], None] | None = None,
) -> Result:
    """Warm up (`warmup` requests, at least one per connection), then measure one bounded window.

    `ticker(answered, elapsed_s)`, if given, is called every TICK_S during the window and once at its end
    (answered = successes + errors so far): what a progress bar shows."""
    payload: dict[str, Any] = {"model": model, "messages": messages or DEFAULT_MESSAGES, "max_tokens": max_tokens}
    if stream:
        payload["stream"] = True
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = {"content-type": "application/json", "accept": "text/event-stream" if stream else "application/json"}
    headers.update(extra_headers or {})
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency, ttl_dns_cache=None)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    result = Result(mode="stream" if stream else "json", url=url, concurrency=concurrency)
    cpu_pids = cpu_pids or {}
    async with aiohttp.ClientSession(
        connector=connector, timeout=client_timeout, auto_decompress=False, skip_auto_headers=("User-Agent",)
    ) as session:
        if warmup > 0:
            w = _Run(max(warmup, concurrency), time.perf_counter() + timeout)
            await asyncio.gather(*(_worker(session, url, body, headers, stream, w) for _ in range(concurrency)))
        if settle > 0:
            await asyncio.sleep(settle)
        redis_before = redisinfo.snapshot(*redis) if redis else None
        cpu_before = {name: tree_cpu_seconds(pid) for name, pid in cpu_pids.items()}
        busy_before = machine_busy()
        self_before = _self_cpu()
        started = time.perf_counter()
        run = _Run(requests, started + duration)
        ticking = asyncio.create_task(_tick(run, started, ticker)) if ticker is not None else None
        await asyncio.gather(*(_worker(session, url, body, headers, stream, run) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        if ticking is not None and ticker is not None:
            ticking.cancel()
            ticker(len(run.latencies) + sum(run.errors.values()), elapsed)
        if settle > 0:
            await asyncio.sleep(settle)
        window = time.perf_counter() - started
        self_after = _self_cpu()
        busy_after = machine_busy()
        cpu_after = {name: tree_cpu_seconds(pid) for name, pid in cpu_pids.items()}
        redis_after = redisinfo.snapshot(*redis) if redis else None
    result.count = len(run.latencies)
    result.errors = sum(run.errors.values())
    result.error_kinds = run.errors
    result.elapsed_s = elapsed
    result.window_s = window
    result.rps = result.count / elapsed if elapsed > 0 else 0.0
    result.latency = Summary.of(run.latencies)
    result.latency_quantiles = Summary.quantiles(run.latencies)
    if stream:
        result.ttft = Summary.of(run.ttfts)
        result.ttft_quantiles = Summary.quantiles(run.ttfts)
        result.events_per_stream = run.events / result.count if result.count else 0.0
    handled = result.count + result.errors
    for name in cpu_pids:
        spent = cpu_after[name] - cpu_before[name]
        result.cpu_s[name] = spent
        result.cpu_ms_per_request[name] = spent * 1000 / handled if handled else 0.0
    total = busy_after[1] - busy_before[1]
    result.machine_busy_s = (busy_after[0] - busy_before[0]) / CLK_TCK
    result.self_cpu_s = self_after - self_before
    result.machine_busy_pct = 100 * (busy_after[0] - busy_before[0]) / total if total > 0 else 0.0
    if redis_before is not None and redis_after is not None:
        delta = redis_after.minus(redis_before)
        result.redis_stats, result.redis_calls = delta.stats, delta.calls
    return result


def format_result(r: Result) -> str:
    lines = [
        f"{r.mode} c={r.concurrency} {r.url}",
        f"  count={r.count} errors={r.errors} {r.error_kinds or ''} elapsed={r.elapsed_s:.2f}s rps={r.rps:.0f}",
        f"  latency ms: p50={r.latency.p50:.2f} p90={r.latency.p90:.2f} p99={r.latency.p99:.2f} max={r.latency.max:.2f}",
    ]
    if r.ttft is not None:
        lines.append(
            f"  ttft ms:    p50={r.ttft.p50:.2f} p90={r.ttft.p90:.2f} p99={r.ttft.p99:.2f}"
            f"  events/stream={r.events_per_stream:.1f}"
        )
    for name, ms in r.cpu_ms_per_request.items():
        lines.append(f"  cpu {name}: {r.cpu_s[name]:.2f}s = {ms:.3f} ms/request")
    lines.append(f"  machine busy: {r.machine_busy_pct:.0f}% of all cores")
    if r.redis_calls:
        handled = max(1, r.count + r.errors)
        top = sorted(r.redis_calls.items(), key=lambda kv: -kv[1])[:12]
        lines.append("  redis calls per request: " + ", ".join(f"{k}={n / handled:.2f}" for k, n in top))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Closed-loop load generator for OpenAI-compatible chat endpoints.")
    parser.add_argument("--url", required=True, help="e.g. http://127.0.0.1:8080/v1/chat/completions")
    parser.add_argument("--model", default="bench")
    parser.add_argument("--concurrency", "-c", type=int, default=1)
    parser.add_argument("--requests", "-n", type=int, default=1000, help="upper bound on measured requests")
    parser.add_argument("--duration", "-d", type=float, default=10.0, help="upper bound on the measured window (s)")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--warmup", type=int, default=0, help="warm-up requests before measuring (>= concurrency)")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request timeout (s)")
    parser.add_argument("--cpu", action="append", default=[], metavar="NAME=PID", help="process tree to meter")
    parser.add_argument("--header", "-H", action="append", default=[], metavar="'NAME: VALUE'", help="request header")
    parser.add_argument("--settle", type=float, default=0.0, help="idle seconds before and after the CPU window")
    parser.add_argument("--redis", metavar="HOST:PORT", help="diff this Redis's INFO counters over the window")
    parser.add_argument("--nice", type=int, default=0, help="lower this process's priority by N (os.nice)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="rich progress bar on stderr (default: when stderr is a terminal and not --json)",
    )
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.requests < 1 or args.duration <= 0:
        parser.error("concurrency, requests and duration must be positive")
    try:
        extra_headers = _parse_headers(args.header)
    except ValueError as exc:
        parser.error(str(exc))
    redis: tuple[str, int] | None = None
    if args.redis:
        host, _, port = args.redis.rpartition(":")
        redis = (host or "127.0.0.1", int(port))
    if args.nice:
        os.nice(args.nice)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a gateway dependency
        pass
    show = args.progress if args.progress is not None else (sys.stderr.isatty() and not args.json)
    with contextlib.ExitStack() as stack:
        ticker = stack.enter_context(window_bar(args.requests, args.duration)) if show else None
        result = _run_cli(args, extra_headers, redis, ticker)
    print(json.dumps(asdict(result)) if args.json else format_result(result))
    return 0 if result.errors == 0 else 1


@contextlib.contextmanager
def window_bar(requests: int, duration: float) -> Iterator[Callable[[int, float], None]]:
    """A rich progress bar on stderr over one measured window: it ends at `requests` answers or at
    `duration` seconds, whichever comes first, so the bar shows the further along of the two."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("measuring (warm-up first)", total=requests)

        def tick(answered: int, elapsed: float) -> None:
            by_time = requests * min(1.0, elapsed / duration)
            bar.update(task, completed=max(answered, int(by_time)), description=f"{answered} answered, {elapsed:.1f}s")

        yield tick


def _run_cli(
    args: argparse.Namespace,
    extra_headers: dict[str, str],
    redis: tuple[str, int] | None,
    ticker: Callable[[int, float], None] | None,
) -> Result:
    return asyncio.run(
        run_load(
            args.url,
            model=args.model,
            concurrency=args.concurrency,
            requests=args.requests,
            duration=args.duration,
            stream=args.stream,
            warmup=args.warmup,
            timeout=args.timeout,
            cpu_pids=_parse_cpu(args.cpu),
            extra_headers=extra_headers,
            settle=args.settle,
            redis=redis,
            ticker=ticker,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
