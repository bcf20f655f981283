"""Gateway overhead, measured against a direct-to-upstream baseline in the same run.

    python -m loadtest.overhead [--requests N] [--concurrency C] [--server uvicorn|granian]
                                [--transport aiohttp|httpx] [--compare] [--json-out FILE]

Starts the fast fake upstream (`nice -n 10`) and the gateway (1 worker, normal priority) as child processes
on free 127.0.0.1 ports, then runs each phase twice, direct to the upstream and through the gateway, with the
load generator as a `nice -n 10` child process:

  (a) sequential non-streaming latency (concurrency 1): p50/p99 and the added latency (gateway - direct);
  (b) sequential streamed TTFT (concurrency 1): p50/p99 and the added TTFT;
  (c) throughput at C concurrent non-streaming requests and 2*C concurrent streams: req/s and % of direct;
  (d) gateway CPU per request: utime+stime of the gateway's process tree (/proc/<pid>/stat) over each
      gateway window, divided by the requests in that window.

`--compare` runs the matrix server x transport (uvicorn, granian) x (aiohttp, httpx) with one shared upstream
and prints one table. Every child is stopped by its PID in a `finally`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtest.procstat import children_of, machine_busy

PY = sys.executable
REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
SERVERS = ("uvicorn", "granian")
TRANSPORTS = ("aiohttp", "httpx")
NICE = ["nice", "-n", "10"]

POLICY = """version: 1
backends:
  - {{name: fake, adapter: openai, base_url: "http://{host}:{port}/v1", tier: self-hosted, max_connections: 512}}
models:
  - {{name: m, capabilities: [chat, completions, embeddings], deployments: [{{backend: fake, upstream_model: m}}]}}
routes:
  - {{name: bench, models: [m]}}
"""


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


def smoke(child: Child, url: str, model: str) -> None:
    """One JSON and one streamed request must succeed before anything is measured."""
    for stream in (False, True):
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}).encode()
        req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"}, method="POST")
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
class Gateway:
    child: Child
    port: int
    launch: str  # "strait serve" or "granian CLI" (when `serve` does not honour STRAIT_SERVER=granian yet)


def _gateway_env(server: str, transport: str, policy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        STRAIT_SERVER=server,
        STRAIT_UPSTREAM_TRANSPORT=transport,
        STRAIT_POLICY=str(policy),
        STRAIT_LOG_LEVEL="WARNING",
        STRAIT_WORKERS="1",
    )
    return env


@contextlib.contextmanager
def gateway(workdir: Path, server: str, transport: str, upstream_port: int) -> Iterator[Gateway]:
    policy = workdir / "policy.yaml"
    policy.write_text(POLICY.format(host=HOST, port=upstream_port))
    env = _gateway_env(server, transport, policy)
    port = free_port()
    serve = [PY, "-m", "gateway", "serve", "--policy", str(policy), "--host", HOST, "--port", str(port)]
    child = Child(f"gateway[{server},{transport}]", serve, env, workdir / f"gateway-{server}-{transport}.log")
    try:
        headers = wait_ready(child, f"http://{HOST}:{port}/readyz")
        launch = "strait serve"
        actual = headers.get("server", "")
        if server == "granian" and actual != "granian":
            # `strait serve` ignored STRAIT_SERVER=granian: run granian on the same app factory instead.
            child.stop()
            port = free_port()
            argv = [PY, "-m", "granian", "--interface", "asgi", "--factory", "--host", HOST, "--port", str(port)]
            argv += ["--workers", "1", "--loop", "uvloop", "--no-ws", "--log-level", "warning"]
            argv.append("gateway.__main__:app_from_env")
            child = Child(f"gateway[{server},{transport}]", argv, env, workdir / f"gateway-{server}-{transport}.log")
            headers = wait_ready(child, f"http://{HOST}:{port}/readyz")
            launch = "granian CLI"
            actual = headers.get("server", "")
        if actual != server:
            raise RuntimeError(f"asked for {server}, the gateway answers as server={actual!r}")
        smoke(child, f"http://{HOST}:{port}/v1/chat/completions", "bench")
        yield Gateway(child, port, launch)
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
) -> dict[str, Any]:
    """One measured window, by a `nice -n 10` load generator process; returns its JSON result."""
    argv = [*NICE, PY, "-m", "loadtest.loadgen", "--url", url, "--model", model, "--json"]
    argv += ["--concurrency", str(concurrency), "--requests", str(requests), "--duration", str(duration)]
    argv += ["--warmup", str(warmup), "--timeout", "30"]
    if stream:
        argv.append("--stream")
    for name, pid in cpu.items():
        argv += ["--cpu", f"{name}={pid}"]
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
    transport: str
    launch: str = ""
    background_busy_pct: float = 0.0
    phases: dict[str, Pair] = field(default_factory=dict)
    error: str | None = None


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
    """Several rounds of one window folded into one: counts and errors summed, every other number the median."""
    if len(results) == 1:
        return results[0]

    def fold(values: list[Any], key: str) -> Any:
        first = values[0]
        if isinstance(first, dict):
            if key == "error_kinds":
                merged: dict[str, int] = {}
                for v in values:
                    for k, n in v.items():
                        merged[k] = merged.get(k, 0) + n
                return merged
            return {k: fold([v[k] for v in values], k) for k in first}
        if isinstance(first, bool) or not isinstance(first, int | float):
            return first
        if key in ("count", "errors"):
            return sum(values)
        return statistics.median(values)

    folded: dict[str, Any] = fold(results, "")
    folded["rounds"] = len(results)
    return folded


def measure(gw: Gateway, upstream_child: Child, upstream_port: int, plan: Plan) -> dict[str, Pair]:
    direct_url = f"http://{HOST}:{upstream_port}/v1/chat/completions"
    gw_url = f"http://{HOST}:{gw.port}/v1/chat/completions"
    phases: dict[str, Pair] = {}
    specs = [
        ("seq_json", 1, plan.seq_requests, False, 200),
        ("seq_stream", 1, plan.ttft_requests, True, 100),
        ("thr_json", plan.concurrency, plan.throughput_requests, False, 4 * plan.concurrency),
        ("thr_stream", plan.stream_concurrency, plan.throughput_requests, True, 2 * plan.stream_concurrency),
    ]
    for name, conc, n, stream, warm in specs:
        common: dict[str, Any] = {
            "concurrency": conc,
            "requests": n,
            "duration": plan.phase_seconds,
            "stream": stream,
            "warmup": warm,
        }
        directs: list[dict[str, Any]] = []
        vias: list[dict[str, Any]] = []
        for _ in range(plan.rounds):  # alternate the two sides so a burst of outside load hits both alike
            directs.append(loadgen(direct_url, model="m", cpu={"upstream": upstream_child.pid}, **common))
            cpu = {"gateway": gw.child.pid, "upstream": upstream_child.pid}
            vias.append(loadgen(gw_url, model="bench", cpu=cpu, **common))
        direct, via = median_result(directs), median_result(vias)
        phases[name] = Pair(direct, via)
        print(f"    {name:<10} direct {direct['rps']:7.0f}/s  gateway {via['rps']:7.0f}/s", file=sys.stderr)
        for side, r in (("direct", direct), ("gateway", via)):
            if r["errors"]:
                print(f"    {name} {side}: {r['errors']} errors {r['error_kinds']}", file=sys.stderr)
    return phases


def foreign_cores(r: dict[str, Any]) -> float:
    """CPU (in cores) used during a window by processes outside this run: noise from other jobs."""
    ours = sum(r["cpu_s"].values()) + r["self_cpu_s"]
    return max(0.0, (r["machine_busy_s"] - ours) / r["elapsed_s"]) if r["elapsed_s"] > 0 else 0.0


def _pct(a: float, b: float) -> float:
    return 100 * a / b if b else 0.0


def headline(r: ConfigResult) -> dict[str, float]:
    """The numbers of one configuration, flattened (ms unless named otherwise)."""
    p = r.phases
    sj, ss, tj, ts = p["seq_json"], p["seq_stream"], p["thr_json"], p["thr_stream"]
    errors = sum(int(x.direct["errors"]) + int(x.gateway["errors"]) for x in p.values())
    return {
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
        "errors": float(errors),
        "foreign_cores": max(foreign_cores(x) for pair in p.values() for x in (pair.direct, pair.gateway)),
    }


def report_one(r: ConfigResult, plan: Plan) -> str:
    h = headline(r)
    tj, ts = r.phases["thr_json"], r.phases["thr_stream"]
    c, sc = plan.concurrency, plan.stream_concurrency
    rows = [
        f"server={r.server} transport={r.transport} (launched via {r.launch}); "
        f"machine busy before the run: {r.background_busy_pct:.0f}%",
        "",
        "| measure | direct | gateway | added / ratio |",
        "|---|---:|---:|---:|",
        f"| (a) sequential JSON latency p50 (ms) | {h['seq_direct_p50']:.3f} | {h['seq_gw_p50']:.3f} "
        f"| **+{h['seq_added_p50']:.3f}** |",
        f"| (a) sequential JSON latency p99 (ms) | {h['seq_direct_p99']:.3f} | {h['seq_gw_p99']:.3f} "
        f"| +{h['seq_added_p99']:.3f} |",
        f"| (b) sequential stream TTFT p50 (ms) | {h['ttft_direct_p50']:.3f} | {h['ttft_gw_p50']:.3f} "
        f"| +{h['ttft_added_p50']:.3f} |",
        f"| (b) sequential stream TTFT p99 (ms) | {r.phases['seq_stream'].direct['ttft']['p99']:.3f} "
        f"| {r.phases['seq_stream'].gateway['ttft']['p99']:.3f} | +{h['ttft_added_p99']:.3f} |",
        f"| (c) JSON throughput, c={c} (req/s) | {h['rps_direct']:.0f} | {h['rps_gw']:.0f} | {h['rps_pct']:.0f} % |",
        f"| (c) JSON latency p99 at c={c} (ms) | {tj.direct['latency']['p99']:.1f} | {h['thr_gw_p99']:.1f} | |",
        f"| (c) streams, {sc} concurrent (streams/s) | {h['sps_direct']:.0f} | {h['sps_gw']:.0f} "
        f"| {h['sps_pct']:.0f} % |",
        f"| (c) stream TTFT p99 at {sc} streams (ms) | {ts.direct['ttft']['p99']:.1f} | {ts.gateway['ttft']['p99']:.1f} "
        "| |",
        f"| (d) gateway CPU per JSON request at c={c} (ms) | | {h['cpu_ms_req']:.3f} | budget 0.4 |",
        f"| (d) gateway CPU per stream at {sc} streams (ms) | | {h['cpu_ms_stream']:.3f} | |",
        f"| (d) gateway CPU per JSON request, sequential (ms) | | {h['cpu_ms_seq']:.3f} | |",
        f"| events per stream | {h['events_direct']:.1f} | {h['events_gw']:.1f} | |",
        f"| errors (all phases) | | | {h['errors']:.0f} |",
        f"| other processes' CPU, worst window (cores) | | | {h['foreign_cores']:.2f} |",
    ]
    return "\n".join(rows)


def report_matrix(results: list[ConfigResult], plan: Plan) -> str:
    c, sc = plan.concurrency, plan.stream_concurrency
    rows = [
        "| server | transport | seq p50 direct→gw (ms) | added p50 | added p99 | TTFT added p50 | "
        f"req/s c={c} direct→gw | % | streams/s c={sc} direct→gw | % | CPU ms/req | CPU ms/stream | errors | noise |",
        "|---|---|---|---:|---:|---:|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.error is not None:
            rows.append(f"| {r.server} | {r.transport} | failed: {r.error} |" + " |" * 11)
            continue
        h = headline(r)
        rows.append(
            f"| {r.server} | {r.transport} | {h['seq_direct_p50']:.3f} → {h['seq_gw_p50']:.3f} "
            f"| {h['seq_added_p50']:.3f} | {h['seq_added_p99']:.3f} | {h['ttft_added_p50']:.3f} "
            f"| {h['rps_direct']:.0f} → {h['rps_gw']:.0f} | {h['rps_pct']:.0f} % "
            f"| {h['sps_direct']:.0f} → {h['sps_gw']:.0f} | {h['sps_pct']:.0f} % "
            f"| {h['cpu_ms_req']:.3f} | {h['cpu_ms_stream']:.3f} | {h['errors']:.0f} | {h['foreign_cores']:.2f} |"
        )
    return "\n".join(rows)


def git_revision() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "gateway", "plugins"], cwd=REPO, capture_output=True)
    except OSError:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure Strait's overhead against a direct baseline in one run.")
    parser.add_argument("--requests", "-n", type=int, default=1000, help="sequential JSON requests per side")
    parser.add_argument("--concurrency", "-c", type=int, default=32, help="JSON concurrency (streams: 2x)")
    parser.add_argument("--server", choices=SERVERS, default="uvicorn")
    parser.add_argument("--transport", choices=TRANSPORTS, default="aiohttp")
    parser.add_argument("--compare", action="store_true", help="run the server x transport matrix")
    parser.add_argument("--phase-seconds", type=float, default=6.0, help="upper bound on each measured window")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0, help="fake upstream TTFT and inter-chunk delay")
    parser.add_argument("--rounds", type=int, default=1, help="alternate direct/gateway N times; report medians")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="fake upstream delay for JSON answers")
    parser.add_argument("--quiet-wait", type=float, default=3.0, help="max seconds to wait for an idle machine")
    parser.add_argument("--json-out", type=Path, help="write all raw results to this file")
    args = parser.parse_args(argv)
    if args.requests < 10 or args.concurrency < 1 or args.rounds < 1:
        parser.error("--requests >= 10, --concurrency >= 1 and --rounds >= 1")
    plan = Plan(
        seq_requests=args.requests,
        ttft_requests=max(10, args.requests // 2),
        throughput_requests=5 * args.requests,
        concurrency=args.concurrency,
        stream_concurrency=2 * args.concurrency,
        phase_seconds=args.phase_seconds,
        rounds=args.rounds,
    )
    configs = [(s, t) for s in SERVERS for t in TRANSPORTS] if args.compare else [(args.server, args.transport)]
    started = time.monotonic()
    results: list[ConfigResult] = []
    with (
        tempfile.TemporaryDirectory(prefix="strait-loadtest-") as tmp,
        upstream(Path(tmp), args.chunk_delay_ms, args.latency_ms) as up,
    ):
        up_child, up_port = up
        for server, transport in configs:
            result = ConfigResult(server, transport)
            results.append(result)
            result.background_busy_pct = wait_quiet(args.quiet_wait)
            print(f"  {server} + {transport} (machine busy {result.background_busy_pct:.0f}%)", file=sys.stderr)
            try:
                with gateway(Path(tmp), server, transport, up_port) as gw:
                    result.launch = gw.launch
                    result.phases = measure(gw, up_child, up_port, plan)
            except (RuntimeError, OSError, subprocess.SubprocessError, KeyError) as exc:
                result.error = str(exc).splitlines()[0][:200]
                print(f"  {server} + {transport} failed: {exc}", file=sys.stderr)
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
    for r in results:
        if r.error is None:
            print(report_one(r, plan) + "\n")
    if args.compare:
        print(report_matrix(results, plan))
    if args.json_out:
        args.json_out.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0 if all(r.error is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
