"""Does shadow traffic touch live requests? Live latency and errors with and without 100 % shadow copies.

    python -m loadtest.shadow_effect [--requests N] [--concurrency C] [--rounds R] [--json-out FILE]

Starts the fast fake upstream (the live deployment, `nice -n 10`), a second one answering only after
`--slow-ms` (the slow candidate), and one gateway process per configuration (`strait serve`, 1 worker,
normal priority, state in memory), all on free 127.0.0.1 ports, then measures the same load through each
in turn with the load generator (`nice -n 10`):

  live-only     the route without `shadow`;
  shadow-slow   `shadow: {model: cand, sample_rate: 1, timeout_s: T}` to the slow candidate: every copy
                holds a connection until it times out (T < --slow-ms);
  shadow-fail   the same to a candidate nothing listens on: every copy fails to connect;
  shadow-ok     the same to a candidate as fast as the live one: every copy is a real answer (the CPU a
                working shadow costs the gateway).

Phases: sequential JSON (concurrency 1), concurrent JSON (C) and concurrent streams (C). For each it prints
live p50/p99 and error counts, and the shadow copies by outcome read from the gateway's /metrics after
the phase (completed, failed, timed_out, dropped: the queue was full). `--rounds R` repeats the whole
set R times (configurations interleaved) and reports each figure's median. Every child is stopped by its
PID in a `finally`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loadtest.overhead import HOST, PY, Child, free_port, loadgen, smoke, upstream, wait_ready

CONFIGS = ("live-only", "shadow-slow", "shadow-fail", "shadow-ok")
POLICY = """version: 1
backends:
  - {{name: live, adapter: openai, base_url: "http://{host}:{live}/v1", tier: self-hosted, max_connections: 512}}
  - name: cand
    adapter: openai
    base_url: "http://{host}:{cand}/v1"
    tier: self-hosted
    timeouts: {{connect_s: 2, read_s: 30}}
    # The candidate's failures must not be retried or probed by anyone else: it serves no live route.
    outlier: {{consecutive_failures: 0, error_ratio: 1.0, min_requests: 100000, probe: none}}
models:
  - {{name: m, deployments: [{{backend: live, upstream_model: m}}]}}
  - {{name: cand, deployments: [{{backend: cand, upstream_model: m, price: {{input_per_mtok: 1, output_per_mtok: 2}}}}]}}
routes:
  - {{name: bench, models: [m]{shadow}}}
"""


def metric_total(port: int, name: str) -> dict[str, float]:
    """`strait_shadow_requests_total` by outcome (summed over routes)."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as resp:  # loopback, built here
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels = line[line.index("{") + 1 : line.index("}")]
            outcome = next((p.split("=")[1].strip('"') for p in labels.split(",") if p.startswith("outcome=")), "?")
            out[outcome] = out.get(outcome, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


@contextlib.contextmanager
def gateway(
    workdir: Path, config: str, live: int, slow: int, fast_cand: int, slow_ms: float
) -> Iterator[tuple[Child, int]]:
    timeout_s = max(0.05, slow_ms / 2000)
    cand = {"live-only": slow, "shadow-slow": slow, "shadow-fail": free_port(), "shadow-ok": fast_cand}[config]
    shadow = "" if config == "live-only" else f", shadow: {{model: cand, sample_rate: 1, timeout_s: {timeout_s}}}"
    policy = workdir / f"policy-{config}.yaml"
    policy.write_text(POLICY.format(host=HOST, live=live, cand=cand, shadow=shadow))
    spool = workdir / f"spool-{config}"
    spool.mkdir(exist_ok=True)
    port = free_port()
    env = {
        **os.environ,
        "STRAIT_STATE": "memory",
        "STRAIT_SPOOL_DIR": str(spool),
        "STRAIT_LOG_LEVEL": "WARNING",
        "STRAIT_WORKERS": "1",
        "STRAIT_ACCESS_LOG": "off",
    }
    argv = [PY, "-m", "gateway", "serve", "--policy", str(policy), "--host", HOST, "--port", str(port)]
    child = Child(f"gateway[{config}]", argv, env, workdir / f"gateway-{config}.log")
    try:
        wait_ready(child, f"http://{HOST}:{port}/readyz")
        smoke(child, f"http://{HOST}:{port}/v1/chat/completions", "bench")
        yield child, port
    finally:
        child.stop()


def wait_shadows_idle(port: int, deadline_s: float) -> None:
    """Until the gateway's shadow queue is empty (so one phase's copies are counted in that phase)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as resp:  # loopback, built here
            line = next((x for x in resp.read().decode().splitlines() if x.startswith("strait_shadow_pending ")), None)
        if line is None or float(line.split()[1]) == 0:
            return
        time.sleep(0.05)


PHASES = (("json c=1", 1, False), ("json c=C", 0, False), ("stream c=C", 0, True))


def run_config(
    workdir: Path, config: str, ports: tuple[int, int, int], args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    with gateway(workdir, config, *ports, args.slow_ms) as (child, port):
        url = f"http://{HOST}:{port}/v1/chat/completions"
        for name, conc, stream in PHASES:
            c = conc or args.concurrency
            n = args.requests if conc == 1 else args.requests * 3
            before = metric_total(port, "strait_shadow_requests_total")
            r = loadgen(
                url,
                model="bench",
                concurrency=c,
                requests=n,
                duration=args.phase_seconds,
                stream=stream,
                warmup=min(50, n),
                cpu={"gateway": child.pid},
            )
            wait_shadows_idle(port, args.slow_ms / 1000 + 10)
            after = metric_total(port, "strait_shadow_requests_total")
            copies = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in set(after) | set(before)}
            out[name] = {
                "count": r["count"],
                "errors": r["errors"],
                "p50": r["latency"]["p50"],
                "p99": r["latency"]["p99"],
                "rps": r["rps"],
                "cpu_ms": r["cpu_ms_per_request"].get("gateway", 0.0),
                "busy": r["machine_busy_pct"],
                "copies": {k: v for k, v in sorted(copies.items()) if v},
            }
    return out


def median_of(rounds: list[dict[str, dict[str, dict[str, Any]]]]) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for config in rounds[0]:
        out[config] = {}
        for phase in rounds[0][config]:
            rows = [r[config][phase] for r in rounds]
            merged: dict[str, Any] = {}
            for key in ("count", "errors", "p50", "p99", "rps", "cpu_ms", "busy"):
                merged[key] = statistics.median(float(x[key]) for x in rows)
            merged["errors_total"] = sum(int(x["errors"]) for x in rows)
            copies: dict[str, float] = {}
            for x in rows:
                for k, v in x["copies"].items():
                    copies[k] = copies.get(k, 0.0) + v
            merged["copies"] = copies
            out[config][phase] = merged
    return out


def report(result: dict[str, dict[str, dict[str, Any]]], rounds: int) -> str:
    lines = [
        "| phase | configuration | live p50 ms | live p99 ms | req/s | live errors (all rounds) | gateway CPU ms/req | shadow copies (all rounds) |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for phase, _, _ in PHASES:
        for config in result:
            r = result[config][phase]
            copies = ", ".join(f"{k} {int(v)}" for k, v in r["copies"].items()) or "-"
            lines.append(
                f"| {phase} | {config} | {r['p50']:.2f} | {r['p99']:.2f} | {r['rps']:.0f} | {r['errors_total']} | "
                f"{r['cpu_ms']:.2f} | {copies} |"
            )
    lines.append(f"\n(medians of {rounds} round(s); copies and errors summed over rounds)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=500, help="sequential JSON requests per phase (concurrent: 3x)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--phase-seconds", type=float, default=10.0)
    ap.add_argument("--slow-ms", type=float, default=1000.0, help="the slow candidate's latency")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    rounds: list[dict[str, dict[str, dict[str, Any]]]] = []
    with tempfile.TemporaryDirectory(prefix="strait-shadow-") as tmp:
        workdir = Path(tmp)
        with contextlib.ExitStack() as stack:
            (workdir / "live").mkdir()
            (workdir / "slow").mkdir()
            (workdir / "fast").mkdir()
            _, live = stack.enter_context(upstream(workdir / "live", 0, 0))
            _, slow = stack.enter_context(upstream(workdir / "slow", 0, args.slow_ms))
            _, fast = stack.enter_context(upstream(workdir / "fast", 0, 0))
            for i in range(args.rounds):
                one: dict[str, dict[str, dict[str, Any]]] = {}
                for config in configs:
                    print(f"round {i + 1}/{args.rounds}: {config}", file=sys.stderr, flush=True)
                    one[config] = run_config(workdir, config, (live, slow, fast), args)
                rounds.append(one)
    result = median_of(rounds)
    print(report(result, args.rounds))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rounds": rounds, "median": result}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
