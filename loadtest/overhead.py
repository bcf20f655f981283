"""Gateway overhead, measured against a direct-to-upstream baseline in the same run.

    python -m loadtest.overhead [--requests N] [--concurrency C] [--server uvicorn|granian]
                                [--state off,memory,redis] [--compare] [--rounds R] [--json-out FILE]
                                [--no-reference]

Starts the fast fake upstream (`nice -n 10`) and one gateway process (1 worker, normal priority) per
configuration, on free 127.0.0.1 ports, then runs each phase direct to the upstream once and through every
gateway in turn (so all configurations share one direct baseline and see the same machine conditions),
with the load generator as a `nice -n 10` child process:

  (a) sequential non-streaming latency (concurrency 1): p50/p99 and the added latency (gateway - direct);
  (b) sequential streamed TTFT (concurrency 1): p50/p99 and the added TTFT;
  (c) throughput at C concurrent non-streaming requests and 2*C concurrent streams: req/s and % of direct;
  (d) gateway CPU per request: utime+stime of the gateway's process tree (/proc/<pid>/stat) over each
      gateway window, divided by the requests in that window.

State (`--state`, default all three side by side):
  off     an open policy (no tenants): no auth, the `limits` stage does nothing (the `accounting` stage
          still writes an `anonymous` usage record per request to the in-process ledger);
  memory  a tenant with every limit and a budget, STRAIT_STATE=memory (in-process store and ledger);
  redis   the same tenant, STRAIT_STATE=redis://127.0.0.1:P/N on a throwaway `redis-server` this runner
          starts on a free port (never 6379) and stops by PID. Its `INFO stats`/`INFO commandstats` are
          diffed over every measured window: Redis round trips per request on the request path (the
          admission script) and in the background (reconciles and ledger pipelines), Redis commands per
          request (Lua-internal ones included) and redis-server CPU per request.

`--compare` runs server (uvicorn, granian) x the chosen states (`off` unless `--state` is given).

Reference (on unless `--no-reference`): `loadtest/reference_proxy.py`, a lean aiohttp + Redis proxy (auth
against one digest, one admission script, batched accounting; see its docstring), started like a gateway
(own free port, normal priority) with its own throwaway redis-server, measured in the same phases against
the same upstream and printed as its own column in every table, so each run shows Strait next to it and
next to direct.
Every child is stopped by its PID in a `finally`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gateway.policy.index import key_digest
from loadtest import redisinfo
from loadtest.procstat import children_of, machine_busy, tree_rss_mb
from loadtest.progress import steps

PY = sys.executable
REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
SERVERS = ("uvicorn", "granian")
REFERENCE = "reference"  # the `server` of the reference proxy's ConfigResult
STATES = ("off", "memory", "redis")
# `cache` (the kit's `full + cache` side, loadtest/kit.py): state=redis with the tenant's exact cache on, in
# the same Redis (the cache's own key space); the load generator's body never changes, so after the first
# request every answer is an exact hit.
GATEWAY_STATES = (*STATES, "cache")
NICE = ["nice", "-n", "10"]
# Seconds the load generator idles after its warm-up and after its last answer, inside the CPU/Redis
# window at the end: the usage writer flushes every 50 ms, so the window's own background work lands in it.
SETTLE_S = 0.15

POLICY_OPEN = """version: 1
backends:
  - {{name: fake, adapter: openai, base_url: "http://{host}:{port}/v1", tier: self-hosted, max_connections: 512}}
models:
  - {{name: m, capabilities: [chat, completions, embeddings], deployments: [{{backend: fake, upstream_model: m}}]}}
routes:
  - {{name: bench, models: [m]}}
"""

# Every limit on (rates for the tenant and the key, concurrency, a USD budget), none ever reached.
# The Redis accounting below relies on its shape: exactly one budget (one HGET per admission).
POLICY_LIMITS = """version: 1
backends:
  - {{name: fake, adapter: openai, base_url: "http://{host}:{port}/v1", tier: self-hosted, max_connections: 512}}
models:
  - name: m
    capabilities: [chat, completions, embeddings]
    deployments: [{{backend: fake, upstream_model: m, price: {{input_per_mtok: 1, output_per_mtok: 2}}}}]
routes:
  - {{name: bench, models: [m]}}
tenants:
  - name: bench
    keys: [{{id: k1, digest: "{digest}"}}]
    limits:
      tenant: {{requests_per_minute: 100000000, tokens_per_minute: 100000000, max_concurrency: 100000}}
      per_key: {{requests_per_minute: 100000000}}
    budgets: {{tenant: {{usd_per_day: 1000000}}}}
"""
CACHE_ON = "    cache: {exact: true}\n"  # appended to POLICY_LIMITS' tenant for state `cache`


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Child:
    """A child process we started; stopped by its PID (and its own descendants by theirs), never by name."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen(
            list(argv), env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        descendants = children_of(self.pid) if self.alive() else []
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for pid in descendants:  # e.g. a granian worker left behind by a killed supervisor
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._log_file.close()

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def http_get(url: str, timeout: float = 2.0) -> tuple[int, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # loopback URLs built here
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as exc:
        return exc.code, {}


def wait_ready(child: Child, url: str, timeout: float = 30.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode}:\n{child.tail()}")
        with contextlib.suppress(OSError):
            status, headers = http_get(url, timeout=1.0)
            if status == 200:
                return headers
        time.sleep(0.05)
    raise RuntimeError(f"{child.name} not ready at {url} after {timeout}s:\n{child.tail()}")


def smoke(child: Child, url: str, model: str, headers: dict[str, str] | None = None) -> None:
    """One JSON and one streamed request must succeed before anything is measured."""
    for stream in (False, True):
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}).encode()
        req = urllib.request.Request(
            url, data=body, headers={"content-type": "application/json", **(headers or {})}, method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:  # loopback URLs built here
                data = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode(errors="replace")
            raise RuntimeError(f"{child.name}: smoke request answered {exc.code}: {detail}\n{child.tail()}") from None
        if (b"[DONE]" not in data) if stream else (b'"choices"' not in data):
            raise RuntimeError(f"{child.name}: smoke request got an unexpected body: {data[:300]!r}")


def wait_quiet(max_wait: float, threshold_pct: float = 20.0) -> float:
    """Wait (bounded) until the machine is mostly idle, so other jobs disturb the run less; returns busy %."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = machine_busy()
        time.sleep(0.5)
        b1, t1 = machine_busy()
        busy = 100 * (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0
        if busy < threshold_pct or time.monotonic() >= deadline:
            return busy


@contextlib.contextmanager
def upstream(workdir: Path, chunk_delay_ms: float, latency_ms: float) -> Iterator[tuple[Child, int]]:
    port = free_port()
    argv = [*NICE, PY, "-m", "loadtest.fast_upstream", "--host", HOST, "--port", str(port)]
    if latency_ms > 0:
        argv += ["--latency-ms", str(latency_ms)]
    if chunk_delay_ms > 0:
        argv += ["--ttft-ms", str(chunk_delay_ms), "--chunk-delay-ms", str(chunk_delay_ms)]
    child = Child("fast_upstream", argv, dict(os.environ), workdir / "upstream.log")
    try:
        wait_ready(child, f"http://{HOST}:{port}/healthz")
        yield child, port
    finally:
        child.stop()


@dataclass
class RedisServer:
    child: Child
    port: int

    def url(self, db: int = 0) -> str:
        return f"redis://{HOST}:{self.port}/{db}"


@contextlib.contextmanager
def redis_server(workdir: Path, name: str = "redis") -> Iterator[RedisServer]:
    """A throwaway redis-server on a free loopback port (never 6379), no persistence; stopped by its PID."""
    workdir = workdir / name
    workdir.mkdir(exist_ok=True)
    port = free_port()
    while port == 6379:  # pragma: no cover - the kernel will not hand out a bound port, but be explicit
        port = free_port()
    argv = ["redis-server", "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]
    argv += ["--dir", str(workdir), "--daemonize", "no", "--loglevel", "warning"]
    child = Child(f"redis-server[{name}]", argv, dict(os.environ), workdir / "redis.log")
    try:
        deadline = time.monotonic() + 10
        while not redisinfo.ping(HOST, port):
            if not child.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on {port}:\n{child.tail()}")
            time.sleep(0.05)
        yield RedisServer(child, port)
    finally:
        child.stop()


@dataclass
class Gateway:
    child: Child
    port: int
    launch: str  # "strait serve" or "granian CLI" (when `serve` does not honour STRAIT_SERVER=granian)
    headers: dict[str, str]  # what every request must carry (the bench tenant's key when auth is on)
    redis: RedisServer | None  # the Redis this gateway keeps its state in (state=redis)
    rss_idle_mb: float = 0.0  # resident once ready, before its first request (nothing loaded lazily yet)


def _gateway_env(server: str, policy: Path, state_url: str, spool: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        STRAIT_SERVER=server,
        STRAIT_POLICY=str(policy),
        STRAIT_STATE=state_url,
        STRAIT_SPOOL_DIR=str(spool),
        STRAIT_LOG_LEVEL="WARNING",
        STRAIT_WORKERS="1",
    )
    return env


@contextlib.contextmanager
def gateway(
    workdir: Path,
    server: str,
    state: str,
    upstream_port: int,
    redis: RedisServer | None = None,
    redis_db: int = 0,
) -> Iterator[Gateway]:
    """One gateway process: `server` x `state` (off, memory, redis or cache; redis and cache need `redis`)."""
    name = f"{server}-{state}"
    policy = workdir / f"policy-{name}.yaml"
    headers: dict[str, str] = {}
    if state == "off":
        policy.write_text(POLICY_OPEN.format(host=HOST, port=upstream_port))
        state_url = "memory"
    else:
        key = "sk-bench-" + secrets.token_hex(16)
        headers["authorization"] = f"Bearer {key}"
        text = POLICY_LIMITS.format(host=HOST, port=upstream_port, digest=key_digest(key))
        policy.write_text(text + CACHE_ON if state == "cache" else text)
        if state == "memory":
            state_url = "memory"
        elif redis is not None:
            state_url = redis.url(redis_db)
        else:
            raise ValueError(f"state={state} needs a Redis server")
    spool = workdir / f"spool-{name}"
    spool.mkdir(exist_ok=True)
    env = _gateway_env(server, policy, state_url, spool)
    port = free_port()
    serve = [PY, "-m", "gateway", "serve", "--policy", str(policy), "--host", HOST, "--port", str(port)]
    log = workdir / f"gateway-{name}.log"
    child = Child(f"gateway[{server},{state}]", serve, env, log)
    try:
        ready = wait_ready(child, f"http://{HOST}:{port}/readyz")
        launch = "strait serve"
        actual = ready.get("server", "")
        if server == "granian" and actual != "granian":
            # `strait serve` ignored STRAIT_SERVER=granian: run granian on the same app factory instead.
            child.stop()
            port = free_port()
            argv = [PY, "-m", "granian", "--interface", "asgi", "--factory", "--host", HOST, "--port", str(port)]
            argv += ["--workers", "1", "--loop", "uvloop", "--no-ws", "--log-level", "warning"]
            argv.append("gateway.__main__:app_from_env")
            child = Child(f"gateway[{server},{state}]", argv, env, log)
            ready = wait_ready(child, f"http://{HOST}:{port}/readyz")
            launch = "granian CLI"
            actual = ready.get("server", "")
        if actual != server:
            raise RuntimeError(f"asked for {server}, the gateway answers as server={actual!r}")
        idle = tree_rss_mb(child.pid)
        smoke(child, f"http://{HOST}:{port}/v1/chat/completions", "bench", headers)
        yield Gateway(child, port, launch, headers, redis if state in ("redis", "cache") else None, idle)
    finally:
        child.stop()


@contextlib.contextmanager
def reference(workdir: Path, upstream_port: int, redis: RedisServer) -> Iterator[Gateway]:
    """The lean reference proxy (`loadtest/reference_proxy.py`) on its own Redis, with the bench limits."""
    key = "sk-bench-" + secrets.token_hex(16)
    port = free_port()
    argv = [PY, "-m", "loadtest.reference_proxy", "--host", HOST, "--port", str(port)]
    argv += ["--upstream", f"http://{HOST}:{upstream_port}/v1", "--upstream-model", "m", "--redis", redis.url()]
    argv += ["--key-digest", key_digest(key), "--rpm", "100000000", "--max-concurrency", "100000"]
    child = Child("reference", argv, dict(os.environ), workdir / "reference.log")
    headers = {"authorization": f"Bearer {key}"}
    try:
        wait_ready(child, f"http://{HOST}:{port}/readyz")
        idle = tree_rss_mb(child.pid)
        smoke(child, f"http://{HOST}:{port}/v1/chat/completions", "bench", headers)
        yield Gateway(child, port, "reference_proxy", headers, redis, idle)
    finally:
        child.stop()


def loadgen(
    url: str,
    *,
    model: str,
    concurrency: int,
    requests: int,
    duration: float,
    stream: bool,
    warmup: int,
    cpu: dict[str, int],
    headers: dict[str, str] | None = None,
    redis_port: int | None = None,
) -> dict[str, Any]:
    """One measured window, by a `nice -n 10` load generator process; returns its JSON result."""
    argv = [*NICE, PY, "-m", "loadtest.loadgen", "--url", url, "--model", model, "--json"]
    argv += ["--concurrency", str(concurrency), "--requests", str(requests), "--duration", str(duration)]
    argv += ["--warmup", str(warmup), "--timeout", "30", "--settle", str(SETTLE_S)]
    if stream:
        argv.append("--stream")
    for name, pid in cpu.items():
        argv += ["--cpu", f"{name}={pid}"]
    for name, value in (headers or {}).items():
        argv += ["--header", f"{name}: {value}"]
    if redis_port is not None:
        argv += ["--redis", f"{HOST}:{redis_port}"]
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=duration + 120, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"loadgen failed ({out.returncode}): {out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


@dataclass
class Pair:
    direct: dict[str, Any]
    gateway: dict[str, Any]


@dataclass
class ConfigResult:
    server: str
    state: str
    launch: str = ""
    background_busy_pct: float = 0.0
    rss_idle_mb: float = 0.0
    rss_start_mb: float = 0.0
    rss_end_mb: float = 0.0
    phases: dict[str, Pair] = field(default_factory=dict)
    error: str | None = None
    title: str = ""  # the column's name when the default (server + state) does not say it (loadtest/kit.py)

    @property
    def label(self) -> str:
        if self.title:
            return self.title
        return "reference proxy" if self.server == REFERENCE else f"{self.server} + state {self.state}"

    @property
    def column(self) -> str:
        if self.title:
            return self.title
        return "reference (aiohttp + redis)" if self.server == REFERENCE else f"{self.server} + {self.state}"


@dataclass
class Plan:
    seq_requests: int
    ttft_requests: int
    throughput_requests: int
    concurrency: int
    stream_concurrency: int
    phase_seconds: float
    rounds: int = 1


def median_result(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Several rounds of one window folded into one: counts (requests, errors, Redis calls) summed, every
    other number the median (lists of equal length, the quantiles, element by element)."""
    if len(results) == 1:
        return results[0]
    summed = ("count", "errors", "redis_stats", "redis_calls", "error_kinds")

    def fold(values: list[Any], key: str, in_summed: bool) -> Any:
        first = values[0]
        if isinstance(first, dict):
            keys: list[str] = []
            for v in values:  # union of keys: a Redis command may show up in one round only
                keys += [k for k in v if k not in keys]
            return {k: fold([v.get(k, 0) for v in values], k, in_summed or k in summed) for k in keys}
        if isinstance(first, list) and first and all(isinstance(v, list) and len(v) == len(first) for v in values):
            # the latency at each percentile (loadgen.QUANTILES): the median round at each percentile
            return [statistics.median(column) for column in zip(*values, strict=True)]
        if isinstance(first, bool) or not isinstance(first, int | float):
            return first
        if in_summed or key in summed:
            return sum(values)
        return statistics.median(values)

    folded: dict[str, Any] = fold(results, "", False)
    folded["rounds"] = len(results)
    return folded


PHASES = ("seq_json", "seq_stream", "thr_json", "thr_stream")


def phase_specs(plan: Plan) -> list[tuple[str, int, int, bool, int]]:
    """(name, concurrency, requests, stream, warm-up requests) of each phase."""
    return [
        ("seq_json", 1, plan.seq_requests, False, 200),
        ("seq_stream", 1, plan.ttft_requests, True, 100),
        ("thr_json", plan.concurrency, plan.throughput_requests, False, 4 * plan.concurrency),
        ("thr_stream", plan.stream_concurrency, plan.throughput_requests, True, 2 * plan.stream_concurrency),
    ]


def measure(
    gateways: list[tuple[ConfigResult, Gateway]],
    upstream_child: Child,
    upstream_port: int,
    plan: Plan,
    quiet_wait: float,
    advance: Callable[[str], None] | None = None,
) -> None:
    """Every phase: direct once, then each gateway in turn (R rounds, alternating); fills `phases`.
    `advance(what)` is called after every load generator run (a progress bar's step: see `steps_of`)."""
    direct_url = f"http://{HOST}:{upstream_port}/v1/chat/completions"
    for name, conc, n, stream, warm in phase_specs(plan):
        busy = wait_quiet(quiet_wait)
        print(f"  {name} (machine busy {busy:.0f}% before)", file=sys.stderr)
        common: dict[str, Any] = {
            "concurrency": conc,
            "requests": n,
            "duration": plan.phase_seconds,
            "stream": stream,
            "warmup": warm,
        }
        directs: list[dict[str, Any]] = []
        vias: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(gateways))}
        for _ in range(plan.rounds):  # alternate the sides so a burst of outside load hits all alike
            directs.append(loadgen(direct_url, model="m", cpu={"upstream": upstream_child.pid}, **common))
            if advance is not None:
                advance(f"{name}: direct")
            for i, (result, gw) in enumerate(gateways):
                if result.error is not None:
                    continue
                cpu = {"gateway": gw.child.pid, "upstream": upstream_child.pid}
                if gw.redis is not None:
                    cpu["redis"] = gw.redis.child.pid
                try:
                    vias[i].append(
                        loadgen(
                            f"http://{HOST}:{gw.port}/v1/chat/completions",
                            model="bench",
                            cpu=cpu,
                            headers=gw.headers,
                            redis_port=gw.redis.port if gw.redis is not None else None,
                            **common,
                        )
                    )
                except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                    result.error = f"{name}: {str(exc).splitlines()[0][:200]}"
                    print(f"    {result.label} failed: {exc}", file=sys.stderr)
                if advance is not None:
                    advance(f"{name}: {result.column}")
        direct = median_result(directs)
        print(f"    {'direct':<24} {direct['rps']:7.0f}/s", file=sys.stderr)
        for i, (result, _) in enumerate(gateways):
            if result.error is not None or not vias[i]:
                continue
            via = median_result(vias[i])
            result.phases[name] = Pair(direct, via)
            print(f"    {result.label:<24} {via['rps']:7.0f}/s", file=sys.stderr)
            for side, r in (("direct", direct), (result.label, via)):
                if r["errors"]:
                    print(f"    {name} {side}: {r['errors']} errors {r['error_kinds']}", file=sys.stderr)


def steps_of(plan: Plan, sides: int) -> int:
    """How many load generator runs `measure` makes for `sides` gateways (its progress bar's total)."""
    return len(PHASES) * plan.rounds * (1 + sides)


def foreign_cores(r: dict[str, Any]) -> float:
    """CPU (in cores) used during a window by processes outside this run: noise from other jobs."""
    ours = sum(r["cpu_s"].values()) + r["self_cpu_s"]
    window = r.get("window_s") or r["elapsed_s"]
    return max(0.0, (r["machine_busy_s"] - ours) / window) if window > 0 else 0.0


def _pct(a: float, b: float) -> float:
    return 100 * a / b if b else 0.0


# Redis accounting of one window (state=redis). Both the admission and the reconcile scripts call TIME
# once (production: Redis's clock); with the bench policy's one budget the admission script calls HGET
# once and the reconcile script never (a reconcile call settles a batch of one tenant's tickets); the
# ledger's record script calls neither: it runs once per tenant and day of a batch and XADDs each new
# record. Scripts go as plain EVALSHAs (a pipeline only when a batch spans several tenants or days), so
# redis-py's SCRIPT EXISTS no longer precedes them (`pipelines` counts any that remain).
def redis_breakdown(r: dict[str, Any]) -> dict[str, float]:
    calls: dict[str, int] = r.get("redis_calls") or {}
    handled = r["count"] + r["errors"]
    if not handled or not calls:
        return {}
    scripts = calls.get("evalsha", 0) + calls.get("eval", 0)
    admits = calls.get("hget", 0)
    timed = calls.get("time", 0)
    reconciles = max(0, timed - admits)
    ledger_calls = max(0, scripts - timed)
    records = calls.get("xadd", 0)
    pipelines = calls.get("script|exists", 0)
    total = r["redis_stats"].get("total_commands_processed", 0) - calls.get("info", 0)
    return {
        "admit_per_req": admits / handled,
        "reconcile_per_req": reconciles / handled,
        "records_per_req": records / handled,
        "xadd_per_req": calls.get("xadd", 0) / handled,
        "pipelines_per_req": pipelines / handled,
        "ledger_calls_per_req": ledger_calls / handled,
        "records_per_call": records / ledger_calls if ledger_calls else 0.0,
        "request_path_rt": admits / handled,
        # one round trip per reconcile or ledger call, plus any SCRIPT EXISTS / SCRIPT LOAD
        "background_rt": (reconciles + ledger_calls + pipelines + calls.get("script|load", 0)) / handled,
        "commands_per_req": total / handled,
        "redis_cpu_ms": r["cpu_ms_per_request"].get("redis", 0.0),
    }


def reference_redis_breakdown(r: dict[str, Any]) -> dict[str, float]:
    """Redis accounting of one reference-proxy window: its admission script is its only EVALSHA (one per
    admitted request, on the request path), and every accounting pipeline holds exactly one
    ZREMRANGEBYSCORE (the lease prune), so that counts its background round trips."""
    calls: dict[str, int] = r.get("redis_calls") or {}
    handled = r["count"] + r["errors"]
    if not handled or not calls:
        return {}
    total = r["redis_stats"].get("total_commands_processed", 0) - calls.get("info", 0)
    return {
        "request_path_rt": (calls.get("evalsha", 0) + calls.get("eval", 0)) / handled,
        "background_rt": (calls.get("zremrangebyscore", 0) + calls.get("script|load", 0)) / handled,
        "commands_per_req": total / handled,
        "redis_cpu_ms": r["cpu_ms_per_request"].get("redis", 0.0),
    }


def headline(r: ConfigResult) -> dict[str, float]:
    """The numbers of one configuration, flattened (ms unless named otherwise)."""
    p = r.phases
    sj, ss, tj, ts = p["seq_json"], p["seq_stream"], p["thr_json"], p["thr_stream"]
    errors = sum(int(x.direct["errors"]) + int(x.gateway["errors"]) for x in p.values())
    out = {
        "seq_direct_p50": sj.direct["latency"]["p50"],
        "seq_gw_p50": sj.gateway["latency"]["p50"],
        "seq_added_p50": sj.gateway["latency"]["p50"] - sj.direct["latency"]["p50"],
        "seq_direct_p99": sj.direct["latency"]["p99"],
        "seq_gw_p99": sj.gateway["latency"]["p99"],
        "seq_added_p99": sj.gateway["latency"]["p99"] - sj.direct["latency"]["p99"],
        "ttft_direct_p50": ss.direct["ttft"]["p50"],
        "ttft_gw_p50": ss.gateway["ttft"]["p50"],
        "ttft_added_p50": ss.gateway["ttft"]["p50"] - ss.direct["ttft"]["p50"],
        "ttft_added_p99": ss.gateway["ttft"]["p99"] - ss.direct["ttft"]["p99"],
        "rps_direct": tj.direct["rps"],
        "rps_gw": tj.gateway["rps"],
        "rps_pct": _pct(tj.gateway["rps"], tj.direct["rps"]),
        "thr_gw_p99": tj.gateway["latency"]["p99"],
        "sps_direct": ts.direct["rps"],
        "sps_gw": ts.gateway["rps"],
        "sps_pct": _pct(ts.gateway["rps"], ts.direct["rps"]),
        "cpu_ms_seq": sj.gateway["cpu_ms_per_request"]["gateway"],
        "cpu_ms_req": tj.gateway["cpu_ms_per_request"]["gateway"],
        "cpu_ms_stream": ts.gateway["cpu_ms_per_request"]["gateway"],
        "events_direct": ts.direct["events_per_stream"],
        "events_gw": ts.gateway["events_per_stream"],
        # CPU per relayed SSE event (µs): CPU per stream over the events each stream carried to the client
        "cpu_us_event": 1000 * ts.gateway["cpu_ms_per_request"]["gateway"] / ts.gateway["events_per_stream"]
        if ts.gateway["events_per_stream"]
        else 0.0,
        "errors": float(errors),
        "foreign_cores": max(foreign_cores(x) for pair in p.values() for x in (pair.direct, pair.gateway)),
    }
    breakdown = reference_redis_breakdown if r.server == REFERENCE else redis_breakdown
    for phase, pair in p.items():
        for k, v in breakdown(pair.gateway).items():
            out[f"redis_{phase}_{k}"] = v
    return out


def _redis_cells(h: dict[str, float], phase: str) -> tuple[str, str, str, str]:
    if f"redis_{phase}_request_path_rt" not in h:
        return "0", "0", "0", "n/a"
    g = h.get
    return (
        f"{g(f'redis_{phase}_request_path_rt', 0):.2f}",
        f"{g(f'redis_{phase}_background_rt', 0):.2f}",
        f"{g(f'redis_{phase}_commands_per_req', 0):.1f}",
        f"{g(f'redis_{phase}_redis_cpu_ms', 0):.3f}",
    )


def _redis_value(h: dict[str, float], phase: str, key: str, fmt: str, state: str) -> str:
    full = f"redis_{phase}_{key}"
    if full in h:
        return fmt.format(h[full])
    return "n/a" if state == "redis" or key == "redis_cpu_ms" else "0"


def report_side_by_side(results: list[ConfigResult], plan: Plan) -> str:
    """One column per configuration (same direct baseline): gateway value (added or % of direct)."""
    rs = [r for r in results if r.error is None and len(r.phases) == len(PHASES)]
    if not rs:
        return ""
    hs = [headline(r) for r in rs]
    d, h0 = rs[0].phases, hs[0]
    c, sc = plan.concurrency, plan.stream_concurrency
    head = " | ".join(r.column for r in rs)
    rows = [
        "; ".join(f"{r.column}: launched via {r.launch}" for r in rs)
        + f"; machine busy before the run: {rs[0].background_busy_pct:.0f}%",
        "",
        f"| measure | direct | {head} |",
        "|---|---:|" + "---:|" * len(rs),
    ]

    def row(name: str, direct: str, cells: list[str]) -> None:
        rows.append(f"| {name} | {direct} | " + " | ".join(cells) + " |")

    row(
        "(a) sequential JSON latency p50 (ms)",
        f"{h0['seq_direct_p50']:.3f}",
        [f"{h['seq_gw_p50']:.3f} (**+{h['seq_added_p50']:.3f}**)" for h in hs],
    )
    row(
        "(a) sequential JSON latency p99 (ms)",
        f"{h0['seq_direct_p99']:.3f}",
        [f"{h['seq_gw_p99']:.3f} (+{h['seq_added_p99']:.3f})" for h in hs],
    )
    row(
        "(b) sequential stream TTFT p50 (ms)",
        f"{h0['ttft_direct_p50']:.3f}",
        [f"{h['ttft_gw_p50']:.3f} (+{h['ttft_added_p50']:.3f})" for h in hs],
    )
    row(
        "(b) sequential stream TTFT p99 (ms)",
        f"{d['seq_stream'].direct['ttft']['p99']:.3f}",
        [
            f"{r.phases['seq_stream'].gateway['ttft']['p99']:.3f} (+{h['ttft_added_p99']:.3f})"
            for r, h in zip(rs, hs, strict=True)
        ],
    )
    row(
        f"(c) JSON throughput, c={c} (req/s)",
        f"{h0['rps_direct']:.0f}",
        [f"{h['rps_gw']:.0f} ({h['rps_pct']:.0f} %)" for h in hs],
    )
    row(
        f"(c) JSON latency p99 at c={c} (ms)",
        f"{d['thr_json'].direct['latency']['p99']:.1f}",
        [f"{h['thr_gw_p99']:.1f}" for h in hs],
    )
    row(
        f"(c) streams, {sc} concurrent (streams/s)",
        f"{h0['sps_direct']:.0f}",
        [f"{h['sps_gw']:.0f} ({h['sps_pct']:.0f} %)" for h in hs],
    )
    row(
        f"(c) stream TTFT p99 at {sc} streams (ms)",
        f"{d['thr_stream'].direct['ttft']['p99']:.1f}",
        [f"{r.phases['thr_stream'].gateway['ttft']['p99']:.1f}" for r in rs],
    )
    row(f"(d) gateway CPU per JSON request at c={c} (ms; budget 0.4)", "", [f"{h['cpu_ms_req']:.3f}" for h in hs])
    row(f"(d) gateway CPU per stream at {sc} streams (ms)", "", [f"{h['cpu_ms_stream']:.3f}" for h in hs])
    row(f"(d) gateway CPU per relayed SSE event at {sc} streams (µs)", "", [f"{h['cpu_us_event']:.1f}" for h in hs])
    row("(d) gateway CPU per JSON request, sequential (ms)", "", [f"{h['cpu_ms_seq']:.3f}" for h in hs])
    for label, key, fmt in (
        ("Redis round trips per request, request path", "request_path_rt", "{:.2f}"),
        ("Redis round trips per request, background", "background_rt", "{:.3f}"),
        ("Redis commands per request (Lua-internal included)", "commands_per_req", "{:.1f}"),
        ("redis-server CPU per request (ms)", "redis_cpu_ms", "{:.3f}"),
    ):
        row(
            f"{label}, c={c}", "", [_redis_value(h, "thr_json", key, fmt, r.state) for r, h in zip(rs, hs, strict=True)]
        )
    row(
        "gateway RSS idle → after a first request → at the end (MiB)",
        "",
        [f"{r.rss_idle_mb:.0f} → {r.rss_start_mb:.0f} → {r.rss_end_mb:.0f}" for r in rs],
    )
    row("events per stream", f"{h0['events_direct']:.1f}", [f"{h['events_gw']:.1f}" for h in hs])
    row("errors (all phases)", "", [f"{h['errors']:.0f}" for h in hs])
    row("other processes' CPU, worst window (cores)", "", [f"{h['foreign_cores']:.2f}" for h in hs])
    ref = next((h for r, h in zip(rs, hs, strict=True) if r.server == REFERENCE), None)
    if ref is not None:
        rows += ["", "Against the reference and direct (issue 8 targets in brackets):", ""]
        for r, h in zip(rs, hs, strict=True):
            if r.server == REFERENCE:
                continue
            rows.append(f"- {r.column}: " + targets(r, h, ref))
        rows.append(
            f"- reference: streams {ref['sps_pct'] / 100:.2f} of direct, "
            f"{ref['cpu_ms_req']:.3f} ms CPU per JSON request, {ref['cpu_us_event']:.1f} µs per event, "
            f"{_redis_value(ref, 'thr_json', 'commands_per_req', '{:.1f}', 'redis')} Redis commands per request"
        )
    for r in rs:
        if r.state == "redis" and r.server != REFERENCE:
            rows += ["", f"{r.column}, per request in each measured window:", "", report_redis(r)]
    return "\n".join(rows)


def targets(r: ConfigResult, h: dict[str, float], ref: dict[str, float]) -> str:
    """One Strait configuration held against issue 8's cost targets, in the same run."""

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "n/a"

    cmds = h.get("redis_thr_json_commands_per_req")
    parts = [
        f"JSON CPU/req {h['cpu_ms_req']:.3f} ms = {ratio(h['cpu_ms_req'], ref['cpu_ms_req'])} the reference's [<= 1x]",
        f"streams {h['sps_pct'] / 100:.2f} of direct [>= 0.9]",
        f"CPU/event {h['cpu_us_event']:.1f} µs = {ratio(h['cpu_us_event'], ref['cpu_us_event'])} [<= 1.2x]",
        f"Redis cmds/req {cmds:.1f} [<= 12]" if cmds is not None else "no Redis",
        f"RSS idle {r.rss_idle_mb:.0f}, loaded {r.rss_end_mb:.0f} MiB [<= 80 idle, 120 loaded]",
    ]
    return "; ".join(parts)


def report_redis(r: ConfigResult) -> str:
    """Where the Redis calls of one state=redis configuration went, phase by phase (see `redis_breakdown`)."""
    rows = [
        "| phase | admit calls (request path) | reconcile calls | ledger records | pipelines "
        "| records per ledger call | round trips: request path | round trips: background "
        "| commands (Lua-internal included) | redis-server CPU ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for phase in PHASES:
        b = redis_breakdown(r.phases[phase].gateway)
        if not b:
            continue
        rows.append(
            f"| {phase} | {b['admit_per_req']:.3f} | {b['reconcile_per_req']:.3f} | {b['records_per_req']:.3f} "
            f"| {b['pipelines_per_req']:.4f} | {b['records_per_call']:.0f} | {b['request_path_rt']:.2f} "
            f"| {b['background_rt']:.3f} | {b['commands_per_req']:.1f} | {b['redis_cpu_ms']:.3f} |"
        )
        if b["ledger_calls_per_req"] > b["records_per_req"] + 0.05:
            rows.append(
                f"| {phase}: attribution check failed: {b['ledger_calls_per_req']:.3f} ledger script calls but "
                f"{b['records_per_req']:.3f} records per request | | | | | | | | | |"
            )
    return "\n".join(rows)


def report_matrix(results: list[ConfigResult], plan: Plan) -> str:
    c, sc = plan.concurrency, plan.stream_concurrency
    rows = [
        "| server | state | seq p50 direct→gw (ms) | added p50 | added p99 | TTFT added p50 | "
        f"req/s c={c} direct→gw | % | streams/s c={sc} direct→gw | % | CPU ms/req | CPU ms/stream | CPU µs/event "
        f"| Redis RT/req request path (c={c}) | Redis RT/req background | Redis cmds/req | redis CPU ms/req "
        "| errors | noise |",
        "|---|---|---|---:|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.error is not None or len(r.phases) < len(PHASES):
            rows.append(f"| {r.server} | {r.state} | failed: {r.error} |" + " |" * 16)
            continue
        h = headline(r)
        rt, bg, cmds, rcpu = _redis_cells(h, "thr_json")
        rows.append(
            f"| {r.server} | {r.state} | {h['seq_direct_p50']:.3f} → {h['seq_gw_p50']:.3f} "
            f"| {h['seq_added_p50']:.3f} | {h['seq_added_p99']:.3f} | {h['ttft_added_p50']:.3f} "
            f"| {h['rps_direct']:.0f} → {h['rps_gw']:.0f} | {h['rps_pct']:.0f} % "
            f"| {h['sps_direct']:.0f} → {h['sps_gw']:.0f} | {h['sps_pct']:.0f} % "
            f"| {h['cpu_ms_req']:.3f} | {h['cpu_ms_stream']:.3f} | {h['cpu_us_event']:.1f} | {rt} | {bg} | {cmds} | {rcpu} "
            f"| {h['errors']:.0f} | {h['foreign_cores']:.2f} |"
        )
    return "\n".join(rows)


def git_revision() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "gateway", "plugins"], cwd=REPO, capture_output=True)
    except OSError:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _states(spec: str | None, compare: bool) -> list[str]:
    if spec is None:
        return ["off"] if compare else list(STATES)
    states = [s.strip() for s in spec.split(",") if s.strip()]
    if "all" in states:
        return list(STATES)
    bad = [s for s in states if s not in STATES]
    if bad or not states:
        raise ValueError(f"--state takes a comma-separated subset of {', '.join(STATES)} (or all), got {spec!r}")
    return list(dict.fromkeys(states))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure Strait's overhead against a direct baseline in one run.")
    parser.add_argument("--requests", "-n", type=int, default=1000, help="sequential JSON requests per side")
    parser.add_argument("--concurrency", "-c", type=int, default=32, help="JSON concurrency (streams: 2x)")
    parser.add_argument("--server", choices=SERVERS, default="uvicorn")
    parser.add_argument(
        "--state",
        help="comma-separated subset of off,memory,redis (default: all three; with --compare: off)",
    )
    parser.add_argument("--compare", action="store_true", help="run every server (uvicorn, granian) x state")
    parser.add_argument("--phase-seconds", type=float, default=5.0, help="upper bound on each measured window")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0, help="fake upstream TTFT and inter-chunk delay")
    parser.add_argument("--rounds", type=int, default=1, help="alternate direct/gateways N times; report medians")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="fake upstream delay for JSON answers")
    parser.add_argument("--quiet-wait", type=float, default=2.0, help="max seconds to wait for an idle machine")
    parser.add_argument("--json-out", type=Path, help="write all raw results to this file")
    parser.add_argument(
        "--no-reference", action="store_true", help="do not run the lean reference proxy (loadtest/reference_proxy.py)"
    )
    args = parser.parse_args(argv)
    if args.requests < 10 or args.concurrency < 1 or args.rounds < 1:
        parser.error("--requests >= 10, --concurrency >= 1 and --rounds >= 1")
    try:
        states = _states(args.state, args.compare)
    except ValueError as exc:
        parser.error(str(exc))
    plan = Plan(
        seq_requests=args.requests,
        ttft_requests=max(10, args.requests // 2),
        throughput_requests=5 * args.requests,
        concurrency=args.concurrency,
        stream_concurrency=2 * args.concurrency,
        phase_seconds=args.phase_seconds,
        rounds=args.rounds,
    )
    servers = list(SERVERS) if args.compare else [args.server]
    configs = [(server, state) for server in servers for state in states]
    started = time.monotonic()
    results: list[ConfigResult] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="strait-loadtest-")))
        up_child, up_port = stack.enter_context(upstream(tmp, args.chunk_delay_ms, args.latency_ms))
        redis = stack.enter_context(redis_server(tmp)) if "redis" in states else None
        running: list[tuple[ConfigResult, Gateway]] = []
        for db, (server, state) in enumerate(configs):
            result = ConfigResult(server, state)
            results.append(result)
            try:
                gw = stack.enter_context(gateway(tmp, server, state, up_port, redis, redis_db=db))
            except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as exc:
                result.error = str(exc).splitlines()[0][:200]
                print(f"  {result.label} failed to start: {exc}", file=sys.stderr)
                continue
            result.launch = gw.launch
            result.rss_idle_mb = gw.rss_idle_mb
            result.rss_start_mb = tree_rss_mb(gw.child.pid)
            running.append((result, gw))
            print(f"  started {result.label} on :{gw.port} via {gw.launch}", file=sys.stderr)
        if not args.no_reference:
            result = ConfigResult(REFERENCE, "redis")
            results.append(result)
            try:
                ref_redis = stack.enter_context(redis_server(tmp, "redis-reference"))
                gw = stack.enter_context(reference(tmp, up_port, ref_redis))
            except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as exc:
                result.error = str(exc).splitlines()[0][:200]
                print(f"  {result.label} failed to start: {exc}", file=sys.stderr)
            else:
                result.launch = gw.launch
                result.rss_idle_mb = gw.rss_idle_mb
                result.rss_start_mb = tree_rss_mb(gw.child.pid)
                running.append((result, gw))
                print(f"  started {result.label} on :{gw.port}", file=sys.stderr)
        busy = wait_quiet(args.quiet_wait)
        for result in results:
            result.background_busy_pct = busy
        with steps(steps_of(plan, len(running)), "measuring") as advance:
            measure(running, up_child, up_port, plan, args.quiet_wait, advance)
        for result, gw in running:
            result.rss_end_mb = tree_rss_mb(gw.child.pid)
    took = time.monotonic() - started
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = "python -m loadtest.overhead " + " ".join(sys.argv[1:] if argv is None else argv)
    print(
        f"\n{stamp} | {command} | git {git_revision()} | Python {platform.python_version()} | "
        f"{os.cpu_count()} cores | {took:.0f}s"
    )
    print(
        f"plan: {plan.seq_requests} sequential JSON, {plan.ttft_requests} sequential streams, "
        f"{plan.throughput_requests} (or {plan.phase_seconds:.0f}s) at c={plan.concurrency} JSON and "
        f"c={plan.stream_concurrency} streams; {plan.rounds} round(s), medians; load generator and upstream at nice 10; "
        f"upstream delays: JSON {args.latency_ms} ms, stream TTFT/ITL {args.chunk_delay_ms} ms; "
        "noise = CPU cores used by other processes in the worst window\n"
    )
    for server in servers:
        print(report_side_by_side([r for r in results if r.server in (server, REFERENCE)], plan) + "\n")
    print(report_matrix(results, plan))
    if args.json_out:
        args.json_out.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0 if all(r.error is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
