"""Soak mode (`python -m loadtest.kit --soak`, `make soak`): steady load on the full pipeline for a bounded
time, sampling what a leak would grow, so a leak shows as a line.

One `strait serve` (uvicorn, 1 worker) with the `full` side's policy (auth, limits and a budget on a private
`redis-server` on a free port, routing, accounting to the Redis ledger; cache off) in front of the fast
upstream; two load generator processes (`nice -n 10`) run for --soak-seconds: JSON and streams, each at
--soak-concurrency. Every --soak-interval seconds the runner samples:
  - the gateway's resident memory (RSS of its process tree, /proc);
  - its open file descriptors and event-loop tasks (its /metrics gauges `strait_process_open_fds` and
    `strait_event_loop_tasks`; the scrape itself is one task);
  - the keys in its Redis database (DBSIZE on the private Redis);
  - requests answered so far (`strait_requests_total`, summed), for the throughput over time.
The report gives each series' start, end, range and least-squares slope per hour, over the whole run and
over its second half (allocator and pool warm-up lands in the first; a leak persists in both), and one
plot per series with its fitted line. Written to <results>/<UTC stamp>/soak.md and soak.png.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtest import redisinfo
from loadtest.overhead import (
    HOST,
    NICE,
    PY,
    Child,
    gateway,
    git_revision,
    redis_server,
    upstream,
)
from loadtest.procstat import tree_rss_mb

# (Sample field, label, unit) of each sampled series, in the report's order.
SERIES = (
    ("rss_mb", "gateway RSS", "MiB"),
    ("open_fds", "open file descriptors", "fds"),
    ("tasks", "event-loop tasks", "tasks"),
    ("redis_keys", "Redis keys (DBSIZE)", "keys"),
    ("rps", "requests answered per second", "req/s"),
)


@dataclass
class Sample:
    t_s: float  # since the load started
    rss_mb: float
    open_fds: float
    tasks: float
    redis_keys: float
    requests: float  # answered so far (strait_requests_total, every route and status)
    rps: float  # since the previous sample


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys against xs (the line that fits them best, in y per x)."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError("a slope needs at least two (x, y) points")
    mx, my = math.fsum(xs) / len(xs), math.fsum(ys) / len(ys)
    sxx = math.fsum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("a slope needs at least two distinct x values")
    return math.fsum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


@dataclass
class Trend:
    start: float
    end: float
    low: float
    high: float
    per_hour: float  # least-squares slope over the whole run
    per_hour_second_half: float  # over the samples of the run's second half (nan with fewer than 2)


def trend(samples: Sequence[Sample], name: str) -> Trend:
    xs = [s.t_s / 3600 for s in samples]
    ys = [float(getattr(s, name)) for s in samples]
    half = [(x, y) for x, y in zip(xs, ys, strict=True) if x >= xs[-1] / 2]
    late = slope([x for x, _ in half], [y for _, y in half]) if len(half) >= 2 else math.nan
    return Trend(ys[0], ys[-1], min(ys), max(ys), slope(xs, ys), late)


def metrics(port: int) -> dict[str, float]:
    """The gauges a soak reads from the gateway's /metrics, strait_requests_total summed (`requests`) and
    the streams among them (`streams`: strait_time_to_first_token_seconds_count, streams only)."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as resp:  # loopback URL
        text = resp.read().decode()
    out = {"strait_process_open_fds": math.nan, "strait_event_loop_tasks": math.nan, "requests": 0.0, "streams": 0.0}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        if name in out:
            out[name] = float(value)
        elif name.startswith("strait_requests_total{"):
            out["requests"] += float(value)
        elif name.startswith("strait_time_to_first_token_seconds_count{"):  # streams only
            out["streams"] += float(value)
    return out


def _both_running(before: dict[str, float], now: dict[str, float], answers: int) -> bool:
    streams = now["streams"] - before["streams"]
    return streams >= answers and now["requests"] - before["requests"] - streams >= answers


def _loadgen(name: str, url: str, headers: dict[str, str], stream: bool, args: argparse.Namespace, log: Path) -> Child:
    argv = [*NICE, PY, "-m", "loadtest.loadgen", "--url", url, "--model", "bench", "--json", "--no-progress"]
    argv += ["--concurrency", str(args.soak_concurrency), "--requests", str(10**9)]
    # A little past the sampled span (which starts once both run): the load holds until the last sample.
    argv += ["--duration", str(args.soak_seconds + args.soak_interval + 5), "--timeout", "30"]
    for key, value in headers.items():
        argv += ["--header", f"{key}: {value}"]
    if stream:
        argv.append("--stream")
    return Child(name, argv, dict(os.environ), log)


def _result(child: Child) -> dict[str, Any]:
    lines = [line for line in child.log.read_text(errors="replace").splitlines() if line.startswith("{")]
    if not lines:
        return {"count": 0, "errors": -1, "error_kinds": {"no result": 1}, "rps": 0.0}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def run(args: argparse.Namespace, out: Path, command: str) -> int:
    from loadtest.progress import steps

    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    samples: list[Sample] = []
    results: dict[str, dict[str, Any]] = {}
    ticks = max(1, math.ceil(args.soak_seconds / args.soak_interval))
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="strait-soak-")))
        _, up_port = stack.enter_context(upstream(tmp, 0.0, 0.0))
        redis = stack.enter_context(redis_server(tmp))
        gw = stack.enter_context(gateway(tmp, "uvicorn", "redis", up_port, redis, 0))
        url = f"http://{HOST}:{gw.port}/v1/chat/completions"
        loads = [
            _loadgen("loadgen-json", url, gw.headers, False, args, tmp / "loadgen-json.log"),
            _loadgen("loadgen-stream", url, gw.headers, True, args, tmp / "loadgen-stream.log"),
        ]
        for child in loads:
            stack.callback(child.stop)
        # Time 0 is once both load generators run (4 answers per connection of each since the smoke
        # requests): their start-up is not part of the soak.
        before, deadline = metrics(gw.port), time.monotonic() + 60
        while not _both_running(before, metrics(gw.port), 4 * args.soak_concurrency) and time.monotonic() < deadline:
            if not any(c.alive() for c in loads):
                raise RuntimeError(f"the load generators exited before any answer:\n{loads[0].tail()}")
            time.sleep(0.1)
        started = time.monotonic()
        last_t, last_n = 0.0, 0.0
        with steps(ticks, f"soak {args.soak_seconds:g}s") as advance:
            for i in range(ticks + 1):
                # Sample on a fixed schedule (not after a sleep of fixed length: sampling takes time too).
                time.sleep(max(0.0, started + i * args.soak_interval - time.monotonic()))
                if not all(c.alive() for c in loads):
                    break  # a load generator gave up early: its result says why
                t = time.monotonic() - started
                m = metrics(gw.port)
                rps = (m["requests"] - last_n) / (t - last_t) if t > last_t else 0.0
                sample = Sample(
                    t_s=t,
                    rss_mb=tree_rss_mb(gw.child.pid),
                    open_fds=m["strait_process_open_fds"],
                    tasks=m["strait_event_loop_tasks"],
                    redis_keys=float(redisinfo.dbsize(HOST, redis.port, 0)),
                    requests=m["requests"],
                    rps=rps if i > 0 else math.nan,
                )
                samples.append(sample)
                last_t, last_n = t, m["requests"]
                if i > 0:
                    advance(f"RSS {sample.rss_mb:.0f} MiB, {sample.open_fds:.0f} fds, {sample.tasks:.0f} tasks")
        deadline = time.monotonic() + 60
        while any(c.alive() for c in loads) and time.monotonic() < deadline:
            time.sleep(0.1)  # the load generators end at --soak-seconds; bounded wait for their results
        for child in loads:
            child.stop()
            results[child.name] = _result(child)
    load1, load5, _ = os.getloadavg()
    header = (
        f"`{command}` | git {git_revision()} | {os.cpu_count()} cores, load average {load1:.1f} / {load5:.1f} "
        f"(1 / 5 min) at the end | {stamp}"
    )
    paths = write(samples, results, args, out, header)
    print(paths["soak"].read_text())
    print(f"\nsoak report: {paths['soak']}", file=sys.stderr)
    errors = sum(int(r.get("errors", 0)) for r in results.values())
    return 0 if errors == 0 and len(samples) >= 2 else 1


def write(
    samples: list[Sample],
    results: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    folder: Path,
    header: str,
) -> dict[str, Path]:
    """soak.md (the table), soak.png (one panel per series with its least-squares line), soak.json."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"soak": folder / "soak.md", "plot": folder / "soak.png", "raw": folder / "soak.json"}
    rows = [
        f"# Strait soak, {args.soak_seconds:g} s",
        "",
        header,
        "",
        f"Full pipeline (auth, limits and budget on a private redis-server, routing, accounting; cache off), "
        f"JSON and streams at c={args.soak_concurrency} each, sampled every {args.soak_interval:g} s "
        f"({len(samples)} samples).",
        "",
        "| load generator | answered | errors | req/s |",
        "|---|---:|---:|---:|",
    ]
    for name, r in results.items():
        kinds = f" {r.get('error_kinds')}" if r.get("errors") else ""
        rows.append(f"| {name} | {r.get('count', 0)} | {r.get('errors', 0)}{kinds} | {r.get('rps', 0.0):.0f} |")
    rows += [
        "",
        "| series | start | end | min | max | slope per hour (whole run) | slope per hour (second half) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    usable = [s for s in samples if not math.isnan(s.rps)]
    for name, label, unit in SERIES:
        series = usable if name == "rps" else samples
        points = [s for s in series if not math.isnan(float(getattr(s, name)))]
        if len(points) < 2:
            rows.append(f"| {label} ({unit}) | n/a | | | | | |")
            continue
        t = trend(points, name)
        rows.append(
            f"| {label} ({unit}) | {t.start:.1f} | {t.end:.1f} | {t.low:.1f} | {t.high:.1f} "
            f"| {t.per_hour:+.1f} | {t.per_hour_second_half:+.1f} |"
        )
    rows += [
        "",
        "A leak shows as a positive slope that the second half keeps (warm-up growth flattens there). "
        "A slope per hour extrapolates a short run: read it with the run's length and the series' range.",
        "",
        "![Soak: each series over time with its least-squares line](soak.png)",
        "",
    ]
    paths["soak"].write_text("\n".join(rows))
    paths["raw"].write_text(json.dumps({"samples": [asdict(s) for s in samples], "loadgen": results}, indent=1))
    plot(samples, paths["plot"])
    return paths


def plot(samples: list[Sample], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 8))  # fixed margins: layout="constrained" would draw it twice
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.08, top=0.9, wspace=0.25, hspace=0.35)
    fig.suptitle("Soak: each series over time, with its least-squares line")
    axes = fig.subplots(2, 3).flatten()
    for ax, (name, label, unit) in zip(axes, SERIES, strict=False):
        points = [s for s in samples if not math.isnan(float(getattr(s, name)))]
        xs = [s.t_s / 60 for s in points]
        ys = [float(getattr(s, name)) for s in points]
        ax.plot(xs, ys, marker=".", linestyle="-", label="sampled")
        if len(points) >= 2 and len(set(xs)) >= 2:
            t = trend(points, name)
            b = slope(xs, ys)  # per minute, for the drawn line
            a = sum(ys) / len(ys) - b * sum(xs) / len(xs)
            ax.plot([xs[0], xs[-1]], [a + b * xs[0], a + b * xs[-1]], color="tab:red", label="least squares")
            ax.set_title(f"{label}: {t.per_hour:+.1f} {unit}/hour")
        else:
            ax.set_title(label)
        ax.set_xlabel("minutes")
        ax.set_ylabel(unit)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(SERIES) :]:
        ax.set_visible(False)
    fig.savefig(path, dpi=100)
