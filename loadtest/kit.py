"""`make loadtest`: Strait with the full pipeline and the minimal one, next to direct and the reference proxy,
written as a report (a Markdown table and PNG plots) into a results folder.

    python -m loadtest.kit [--requests N] [--phase-seconds S] [--levels 1,4,16,64] [--level-seconds S]
                           [--sides minimal,full,cache] [--no-reference] [--out DIR] [--quiet-wait S]
    python -m loadtest.kit --soak [--soak-seconds 600]      # the soak mode: loadtest/soak.py

Sides, each a `strait serve` process (uvicorn, 1 worker) on the same fast upstream (`nice -n 10`):
  minimal  an open policy (no tenants): no auth, no limits; routing and the `accounting` stage's
           in-process record still run (overhead.py's state `off`);
  full     a tenant with a key (auth), every limit and a budget on a private `redis-server` (admission
           and reconcile scripts, the ledger), routing, accounting; cache off;
  cache    `full` with the tenant's exact cache on, in the same Redis (its own key space): the load
           generator's body never changes, so after the first request every answer is an exact hit
           (the report says what the gateway answered: `x-strait-cache`).
Also measured: direct to the upstream (the baseline), the reference proxy (`reference_proxy.py`, unless
--no-reference), and the LiteLLM proxy only when `litellm` is importable in this interpreter (it is not a
dependency; the report says when it was skipped and why).

Phases (overhead.py's, same baseline for all): sequential JSON, sequential streams, JSON at C and streams
at 2C; then a throughput sweep: closed-loop JSON at each concurrency of --levels for --level-seconds.
The defaults take about two to three minutes on the 2-core machine; raise --requests, --phase-seconds and
--level-seconds (or --rounds) to go longer. Every child process is stopped by its PID.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from loadtest import report
from loadtest.loadgen import DEFAULT_MESSAGES
from loadtest.overhead import (
    HOST,
    PY,
    REFERENCE,
    REPO,
    Child,
    ConfigResult,
    Gateway,
    Plan,
    free_port,
    gateway,
    git_revision,
    loadgen,
    measure,
    redis_server,
    reference,
    smoke,
    steps_of,
    upstream,
    wait_quiet,
    wait_ready,
)
from loadtest.procstat import tree_rss_mb
from loadtest.progress import steps

# side -> (overhead.gateway state, the column's title)
SIDES: dict[str, tuple[str, str]] = {
    "minimal": ("off", "Strait minimal"),
    "full": ("redis", "Strait full, cache off"),
    "cache": ("cache", "Strait full, cache on"),
}
MAX_TOKENS = 64  # loadgen.run_load's default
LITELLM = "LiteLLM proxy"
LITELLM_CONFIG = """model_list:
  - model_name: bench
    litellm_params: {{model: openai/m, api_base: "http://{host}:{port}/v1", api_key: sk-none}}
"""


@contextlib.contextmanager
def litellm(workdir: Path, upstream_port: int) -> Iterator[Gateway]:
    """LiteLLM's proxy on the same upstream, no master key, one worker. Only called when `litellm` imports.
    (Not measured on the project's machines, where litellm is not installed.)"""
    config = workdir / "litellm.yaml"
    config.write_text(LITELLM_CONFIG.format(host=HOST, port=upstream_port))
    port = free_port()
    argv = [PY, "-c", "from litellm.proxy.proxy_cli import run_server; run_server()"]
    argv += ["--config", str(config), "--host", HOST, "--port", str(port), "--num_workers", "1"]
    child = Child("litellm", argv, dict(os.environ), workdir / "litellm.log")
    try:
        wait_ready(child, f"http://{HOST}:{port}/health/liveliness", timeout=90.0)
        idle = tree_rss_mb(child.pid)
        smoke(child, f"http://{HOST}:{port}/v1/chat/completions", "bench")
        yield Gateway(child, port, "litellm proxy_cli", {}, None, idle)
    finally:
        child.stop()


def sweep(
    gateways: list[tuple[ConfigResult, Gateway]],
    upstream_child: Child,
    upstream_port: int,
    levels: list[int],
    seconds: float,
    advance: Callable[[str], None],
) -> dict[str, list[report.LevelPoint]]:
    """Closed-loop JSON at each concurrency: direct, then every side in turn (same conditions for all)."""
    out: dict[str, list[report.LevelPoint]] = {report.DIRECT: []}
    out.update({r.column: [] for r, _ in gateways if r.error is None})
    direct_url = f"http://{HOST}:{upstream_port}/v1/chat/completions"
    for level in levels:
        common: dict[str, Any] = {
            "concurrency": level,
            "requests": 1_000_000,  # bounded by the window's seconds
            "duration": seconds,
            "stream": False,
            "warmup": 4 * level,
        }
        d = loadgen(direct_url, model="m", cpu={"upstream": upstream_child.pid}, **common)
        out[report.DIRECT].append(report.LevelPoint.of(level, d, "upstream"))
        advance(f"c={level}: direct")
        for result, gw in gateways:
            if result.error is not None:
                continue
            try:
                r = loadgen(
                    f"http://{HOST}:{gw.port}/v1/chat/completions",
                    model="bench",
                    cpu={"gateway": gw.child.pid},
                    headers=gw.headers,
                    **common,
                )
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                print(f"    {result.column} c={level} failed: {exc}", file=sys.stderr)
            else:
                out[result.column].append(report.LevelPoint.of(level, r, "gateway"))
            advance(f"c={level}: {result.column}")
    return out


def cache_verdict(gw: Gateway) -> str:
    """What the `cache on` side answered the load generator's request with (`x-strait-cache`)."""
    # The load generator's own body (model, messages, max_tokens): the cache key it was measured on.
    body = json.dumps({"model": "bench", "messages": DEFAULT_MESSAGES, "max_tokens": MAX_TOKENS})
    req = urllib.request.Request(
        f"http://{HOST}:{gw.port}/v1/chat/completions",
        data=body.encode(),
        headers={"content-type": "application/json", **gw.headers},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # loopback URL built here
            return resp.headers.get("x-strait-cache", "(no x-strait-cache header)")
    except (urllib.error.URLError, OSError) as exc:
        return f"(check failed: {exc})"


def _levels(spec: str) -> list[int]:
    levels = sorted({int(x) for x in spec.split(",") if x.strip()})
    if not levels or levels[0] < 1 or levels[-1] > 1024:
        raise ValueError(f"--levels wants comma-separated concurrencies in 1..1024, got {spec!r}")
    return levels


def _sides(spec: str) -> list[str]:
    sides = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in sides if s not in SIDES]
    if bad or not sides:
        raise ValueError(f"--sides takes a comma-separated subset of {', '.join(SIDES)}, got {spec!r}")
    return list(dict.fromkeys(sides))


def run(args: argparse.Namespace, command: str) -> tuple[report.KitRun, int]:
    plan = Plan(
        seq_requests=args.requests,
        ttft_requests=max(10, args.requests // 2),
        throughput_requests=10 * args.requests,
        concurrency=args.concurrency,
        stream_concurrency=2 * args.concurrency,
        phase_seconds=args.phase_seconds,
        rounds=args.rounds,
    )
    levels, sides = _levels(args.levels), _sides(args.sides)
    stamp = datetime.datetime.now(datetime.UTC)
    started = time.monotonic()
    results: list[ConfigResult] = []
    skipped: dict[str, str] = {}
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="strait-kit-")))
        up_child, up_port = stack.enter_context(upstream(tmp, 0.0, 0.0))
        redis = stack.enter_context(redis_server(tmp)) if {"full", "cache"} & set(sides) else None
        running: list[tuple[ConfigResult, Gateway]] = []

        def start(result: ConfigResult, open_side: Callable[[], Gateway]) -> Gateway | None:
            results.append(result)
            try:
                gw = open_side()
            except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as exc:
                result.error = str(exc).splitlines()[0][:200]
                print(f"  {result.column} failed to start: {exc}", file=sys.stderr)
                return None
            result.launch, result.rss_idle_mb, result.rss_start_mb = (
                gw.launch,
                gw.rss_idle_mb,
                tree_rss_mb(gw.child.pid),
            )
            running.append((result, gw))
            print(f"  started {result.column} on :{gw.port}", file=sys.stderr)
            return gw

        by_side: dict[str, Gateway] = {}
        for db, side in enumerate(sides):
            state, title = SIDES[side]
            gw = start(
                ConfigResult("uvicorn", state, title=title),
                lambda state=state, db=db: stack.enter_context(gateway(tmp, "uvicorn", state, up_port, redis, db)),
            )
            if gw is not None:
                by_side[side] = gw
        if args.no_reference:
            skipped["reference proxy"] = "--no-reference"
        else:
            ref_redis = stack.enter_context(redis_server(tmp, "redis-reference"))
            start(
                ConfigResult(REFERENCE, "redis", title="reference proxy"),
                lambda: stack.enter_context(reference(tmp, up_port, ref_redis)),
            )
        if args.no_litellm:
            skipped[LITELLM] = "--no-litellm"
        elif importlib.util.find_spec("litellm") is None:
            skipped[LITELLM] = (
                "`litellm` is not importable in this interpreter (it is not a Strait dependency; "
                "install `litellm[proxy]` into the venv to include it)"
            )
        else:
            start(ConfigResult("litellm", "-", title=LITELLM), lambda: stack.enter_context(litellm(tmp, up_port)))
        busy = wait_quiet(args.quiet_wait)
        for result in results:
            result.background_busy_pct = busy
        total = steps_of(plan, len(running)) + len(levels) * (1 + len(running))
        with steps(total, "loadtest") as advance:
            measure(running, up_child, up_port, plan, args.quiet_wait, advance)
            points = sweep(running, up_child, up_port, levels, args.level_seconds, advance)
        for result, gw in running:
            result.rss_end_mb = tree_rss_mb(gw.child.pid)
        if "cache" in by_side:
            notes.append(
                f"`{SIDES['cache'][1]}` answered the load generator's request with x-strait-cache: "
                f"{cache_verdict(by_side['cache'])}"
            )
    took = time.monotonic() - started
    load1, load5, _ = os.getloadavg()
    machine = (
        f"{os.cpu_count()} cores, Python {platform.python_version()}, load average {load1:.1f} / {load5:.1f} "
        f"(1 / 5 min) at the end, machine busy {busy:.0f}% before the run"
    )
    kit = report.KitRun(
        started=stamp.strftime("%Y-%m-%d %H:%M UTC"),
        command=command,
        revision=git_revision(),
        machine=machine,
        took_s=took,
        plan=plan,
        results=results,
        sweep=points,
        level_seconds=args.level_seconds,
        skipped=skipped,
        notes=notes,
    )
    return kit, 0 if all(r.error is None for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Strait's load-test report: full pipeline, minimal, direct, reference."
    )
    parser.add_argument("--requests", "-n", type=int, default=500, help="sequential JSON requests per side")
    parser.add_argument("--concurrency", "-c", type=int, default=32, help="JSON concurrency (streams: 2x)")
    parser.add_argument("--phase-seconds", type=float, default=3.0, help="upper bound on each measured window")
    parser.add_argument("--rounds", type=int, default=1, help="alternate direct and the sides N times (medians)")
    parser.add_argument("--levels", default="1,4,16,64", help="JSON concurrencies of the throughput sweep")
    parser.add_argument("--level-seconds", type=float, default=2.0, help="window of each sweep point")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"subset of {','.join(SIDES)}")
    parser.add_argument("--no-reference", action="store_true", help="leave out the reference proxy")
    parser.add_argument("--no-litellm", action="store_true", help="leave out LiteLLM even when importable")
    parser.add_argument("--quiet-wait", type=float, default=2.0, help="max seconds to wait for an idle machine")
    parser.add_argument("--out", type=Path, default=REPO / "loadtest" / "results", help="results folder")
    parser.add_argument("--soak", action="store_true", help="run the soak mode instead (loadtest/soak.py)")
    parser.add_argument("--soak-seconds", type=float, default=600.0, help="soak length (default 10 minutes)")
    parser.add_argument("--soak-concurrency", type=int, default=8, help="soak: JSON and stream concurrency each")
    parser.add_argument("--soak-interval", type=float, default=5.0, help="soak: seconds between samples")
    args = parser.parse_args(argv)
    if args.requests < 10 or args.concurrency < 1 or args.rounds < 1 or args.phase_seconds <= 0:
        parser.error("--requests >= 10, --concurrency >= 1, --rounds >= 1, --phase-seconds > 0")
    if args.level_seconds <= 0 or args.soak_seconds <= 0 or args.soak_interval <= 0 or args.soak_concurrency < 1:
        parser.error("--level-seconds, --soak-seconds, --soak-interval and --soak-concurrency must be positive")
    try:
        _levels(args.levels)
        _sides(args.sides)
    except ValueError as exc:
        parser.error(str(exc))
    command = "python -m loadtest.kit " + " ".join(sys.argv[1:] if argv is None else argv)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out / stamp
    if args.soak:
        from loadtest import soak

        return soak.run(args, out, command)
    kit, rc = run(args, command)
    paths = report.write(kit, out)
    (out / "raw.json").write_text(json.dumps(report.raw(kit), indent=1, default=str))
    print(report.markdown(kit, {k: p.name for k, p in paths.items() if k != "report"}))
    print(f"\nreport: {paths['report']}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
