"""Request latency while the gateway reloads an enterprise-size policy: `python -m loadtest.policy_reload`.

One real `strait serve` (state in memory) serves the S-block generated policy of `loadtest.policy_scale`
(S=50 by default: 1,000 backends, 1,500 models, 500 routes, 2,500 tenants), every backend simulated
and answering at once, so a request's latency is the gateway's own. `--clients` concurrent clients
send chat requests to one route; after a steady-state phase the policy file is rewritten (another
seed: every price changes, so every table is rebuilt) and the gateway gets SIGHUP, and the clients go on
until its log says the new policy is in force, then for the same time again.

Prints the latency median / p99 / max of the requests that started before the reload, during it (SIGHUP
to "in force") and after it, and how long the reload took. A reload that blocked the event loop shows
as a p99 (and max) during the reload as long as the blocking.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from loadtest.policy_scale import build_policy
from tests.harness.gateway import gateway_process

IN_FORCE = re.compile(r"policy .* in force")


def policy_text(size: int, seed: int) -> str:
    doc = build_policy(size, seed)
    for backend in doc["backends"]:
        backend["simulated"] = {"ttft_ms": 0, "tokens_per_second": 1e6, "output_tokens": 4}
    return yaml.safe_dump(doc, sort_keys=False, width=200)


def summary(label: str, samples: list[float]) -> str:
    if not samples:
        return f"{label:<16} no requests"
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (
        f"{label:<16} {len(ordered):6d} requests  median {statistics.median(ordered) * 1000:7.1f} ms  "
        f"p99 {p99 * 1000:7.1f} ms  max {ordered[-1] * 1000:7.1f} ms"
    )


async def client(url: str, route: str, stop: asyncio.Event, out: list[tuple[float, float]]) -> None:
    body = {"model": route, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        while not stop.is_set():
            t0 = time.perf_counter()
            reply = await http.post("/v1/chat/completions", json=body)
            if reply.status_code != 200:
                raise SystemExit(f"request failed: {reply.status_code} {reply.text[:200]}")
            out.append((t0, time.perf_counter() - t0))


async def measure(size: int, clients: int, steady_s: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(tmp) / "policy.yaml"
        log = Path(tmp) / "gateway.log"
        policy.write_text(policy_text(size, seed=7))
        # Dumped now: dumping 1 MB of YAML takes seconds, which would stall the clients' own event loop.
        second = policy_text(size, seed=8)
        started = time.perf_counter()
        # Started once and stopped by PID (`with ...start()` would start a second process and leak the first).
        gw = gateway_process(policy, log_path=log, env={"STRAIT_STATE": "memory", "STRAIT_ACCESS_LOG": "off"})
        gw.start(timeout=300)
        try:
            print(f"S={size}: gateway ready in {time.perf_counter() - started:.1f} s")
            stop = asyncio.Event()
            samples: list[tuple[float, float]] = []
            tasks = [asyncio.create_task(client(gw.base_url, "r0_0", stop, samples)) for _ in range(clients)]
            await asyncio.sleep(steady_s)
            policy.write_text(second)
            reload_at = time.perf_counter()
            gw.signal(signal.SIGHUP)
            while not IN_FORCE.search(gw.read_log()):
                await asyncio.sleep(0.05)  # polling the log file: the clients' requests are what is measured
            done_at = time.perf_counter()
            await asyncio.sleep(max(steady_s, done_at - reload_at))
            stop.set()
            log_text = log.read_text(errors="replace")
            await asyncio.gather(*tasks)
        finally:
            gw.stop()
    print(f"reload took {done_at - reload_at:.2f} s (SIGHUP to 'in force')")
    print(next(line for line in log_text.splitlines() if IN_FORCE.search(line)))
    print(summary("before reload", [d for t, d in samples if t < reload_at]))
    print(summary("during reload", [d for t, d in samples if reload_at <= t < done_at]))
    print(summary("after reload", [d for t, d in samples if t >= done_at]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=50, help="block count S of the generated policy")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--steady-s", type=float, default=5.0, help="seconds measured before and after")
    args = parser.parse_args()
    asyncio.run(measure(args.size, args.clients, args.steady_s))


if __name__ == "__main__":
    main()
