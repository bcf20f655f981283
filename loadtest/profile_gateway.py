"""Sample the gateway with py-spy under load and summarise where its CPU goes.

    pip install py-spy   # into the venv; not a project dependency
    python -m loadtest.profile_gateway [--server uvicorn] [--state off|memory|redis] [--stream] [--seconds 10]
        [--chunk-delay-ms 5]   # a paced upstream: each streamed event in its own read

Starts the fast upstream and the gateway like `loadtest.overhead` (with `--state redis`, also a throwaway
redis-server on a free port, and the bench tenant with every limit on), drives `--concurrency` clients at it
(`nice -n 10`) while `py-spy record --format raw` samples the gateway (and its children), then prints:
the share of samples by package (self time), the top self-time functions, and the inclusive share of
every function under gateway/ and plugins/. The raw collapsed stacks are kept for flame graphs
(`--out FILE`, e.g. feed them to flamegraph.pl or speedscope).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from loadtest.overhead import NICE, PY, REPO, SERVERS, STATES, gateway, redis_server, upstream


def _frame_file(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)", the path relative to its sys.path entry.
    start = frame.rfind("(")
    return frame[start + 1 :] if start != -1 else frame


def package_of(frame: str) -> str:
    """The top-level package of a frame (`redis/asyncio/client.py` is redis, not asyncio); a bare module
    file (`typing.py`, `<frozen runpy>`) is `other`. uvloop's C loop shows up as `Runner.run` in asyncio."""
    where = _frame_file(frame).rsplit(":", 1)[0]
    for marker in ("site-packages/", "/work/main/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    top, sep, _ = where.partition("/")
    if not sep or top.startswith("<"):
        return "other"
    return top


def short(frame: str) -> str:
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "/work/main/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    where = where.rsplit(":", 1)[0]
    return f"{name} ({where})"


def summarise(raw: str, top: int = 25) -> str:
    total = 0
    self_by_pkg: Counter[str] = Counter()
    self_by_fn: Counter[str] = Counter()
    incl_ours: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        leaf = frames[-1]
        self_by_pkg[package_of(leaf)] += count
        self_by_fn[short(leaf)] += count
        seen: set[str] = set()
        for f in frames:
            where = _frame_file(f)
            if where.startswith(("gateway/", "plugins/")) and not where.startswith("gateway/__main__"):
                key = short(f)
                if key not in seen:
                    seen.add(key)
                    incl_ours[key] += count
    if total == 0:
        return "no samples"

    def pct(n: int) -> str:
        return f"{100 * n / total:5.1f} %"

    out = [f"{total} samples", "", "self time by package:"]
    out += [f"  {pct(n)}  {k}" for k, n in self_by_pkg.most_common()]
    out += ["", f"top {top} functions by self time:"]
    out += [f"  {pct(n)}  {k}" for k, n in self_by_fn.most_common(top)]
    out += ["", "gateway/ and plugins/ functions by inclusive time:"]
    out += [f"  {pct(n)}  {k}" for k, n in incl_ours.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Profile the gateway under load with py-spy.")
    parser.add_argument("--server", choices=SERVERS, default="uvicorn")
    parser.add_argument("--state", choices=STATES, default="off", help="off: open policy; memory/redis: limits on")
    parser.add_argument("--stream", action="store_true", help="streamed requests instead of JSON")
    parser.add_argument("--concurrency", "-c", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--out", type=Path, help="keep the raw collapsed stacks here")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0, help="paced upstream: first token and gap")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="upstream latency of a JSON answer")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    if not Path(py_spy).exists():
        parser.error("py-spy is not installed (pip install py-spy)")
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="strait-profile-")))
        _, up_port = stack.enter_context(upstream(tmp, args.chunk_delay_ms, args.latency_ms))
        redis = stack.enter_context(redis_server(tmp)) if args.state == "redis" else None
        gw = stack.enter_context(gateway(tmp, args.server, args.state, up_port, redis))
        raw_path = args.out or tmp / "stacks.txt"
        url = f"http://127.0.0.1:{gw.port}/v1/chat/completions"
        load = [*NICE, PY, "-m", "loadtest.loadgen", "--url", url, "--concurrency", str(args.concurrency)]
        load += ["--requests", "10000000", "--duration", str(args.seconds + 4), "--warmup", "200"]
        for name, value in gw.headers.items():
            load += ["--header", f"{name}: {value}"]
        if args.stream:
            load.append("--stream")
        loader = subprocess.Popen(load, cwd=REPO, stdout=subprocess.PIPE, text=True)
        try:
            spy = [py_spy, "record", "--pid", str(gw.child.pid), "--subprocesses", "--nonblocking"]
            spy += ["--rate", str(args.rate), "--duration", str(int(args.seconds)), "--format", "raw"]
            spy += ["--output", str(raw_path)]
            subprocess.run([*spy], check=True, capture_output=True, timeout=args.seconds + 60)
        finally:
            try:
                out, _ = loader.communicate(timeout=args.seconds + 120)
            except subprocess.TimeoutExpired:
                loader.kill()  # by its PID (Popen), never by name
                out, _ = loader.communicate()
        print(out)
        print(summarise(raw_path.read_text(), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
