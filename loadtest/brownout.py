"""Brown-out: what a route's failing primary costs the upstreams and the clients (issue 10's bound:
upstream attempts <= 1.2 x requests + 3).

One fake upstream (tests/harness/fake_upstream.py) serves a primary per fault that fails a share of its
attempts (`fault:503-ratio-P`, `fault:500-ratio-P`, `fault:reset-ratio-P`: exactly floor(n x P) of its
first n attempts, evenly spread) and a healthy fallback; one route per fault tries the primary, then the
fallback, with the default retry policy (one same-deployment retry after a 500 or a reset, the retry
budget of 20 % / 3). Two real `strait serve` processes: outlier ejection on (the defaults) and off (the
primaries never ejected: the budget alone). Closed-loop clients, C at a time, N requests per route;
attempts are counted in the fake's ledger (requests marked by their `user` field).

    .venv/bin/python -m loadtest.brownout                        # N=300, C=20, P=0.5, ~30 s
    .venv/bin/python -m loadtest.brownout -n 500 -c 50 --fail-ratio 0.8

Prints one markdown table. Loopback only, state in memory, every process stopped by its PID.
tests/e2e/test_retry_brownout.py runs the same drive (ejection on) and asserts the bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from gateway.policy.index import key_digest
from tests.harness.fake_control import FakeControl, fake_upstream
from tests.harness.gateway import gateway_process
from tests.harness.procs import ServerProcess

KEY = "sk-brownout-tenant-5e0f"
FAULTS = ("503", "500", "reset")
# The fallback streams slowly enough for a client to leave mid-answer (the stream phase of the test).
FALLBACK_MODEL = "fault:ok+chunk_delay_ms=20+chunk_tokens=1"


def route_of(fault: str) -> str:
    return f"brownout-{fault}"


def policy_text(fake_url: str, fail_ratio: float, *, ejection: bool) -> str:
    """Per fault: a primary backend failing `fail_ratio` of its attempts and a route trying it, then the
    shared healthy fallback. Without ejection the primaries are never taken out of routing."""
    outlier = "" if ejection else ", outlier: {consecutive_failures: 0, error_ratio: 0}"
    # At most 3 of the 4 backends ejected at once (the default share, 0.5, would leave one primary in).
    share = ", outlier: {max_ejected_share: 0.75}" if ejection else ""
    lines = ["version: 1", "backends:"]
    for fault in FAULTS:
        lines.append(f'  - {{name: primary-{fault}, adapter: openai, base_url: "{fake_url}/v1"{outlier or share}}}')
    lines.append(f'  - {{name: fallback, adapter: openai, base_url: "{fake_url}/v1"{share}}}')
    lines.append("models:")
    for fault in FAULTS:
        model = f"fault:{fault}-ratio-{fail_ratio:g}"
        lines.append(f'  - {{name: m-{fault}, deployments: [{{backend: primary-{fault}, upstream_model: "{model}"}}]}}')
    lines.append(f'  - {{name: m-fallback, deployments: [{{backend: fallback, upstream_model: "{FALLBACK_MODEL}"}}]}}')
    lines.append("routes:")
    for fault in FAULTS:
        lines.append(f"  - {{name: {route_of(fault)}, models: [m-{fault}, m-fallback]}}")
    lines += ["tenants:", "  - name: t", f'    keys: [{{id: t-1, digest: "{key_digest(KEY)}"}}]', ""]
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int
    seconds: float
    complete: bool  # a whole JSON answer, or a stream that reached [DONE]


async def drive(
    base_url: str,
    route: str,
    requests: int,
    concurrency: int,
    marker: str,
    *,
    stream: bool = False,
    leave_after_first_event: bool = False,
    max_tokens: int = 5,
) -> list[Outcome]:
    """`requests` chat completions on `route`, `concurrency` at a time (closed loop); a stream's client
    may leave after its first event (the gateway then ends the request as `client_gone`)."""
    outcomes: list[Outcome] = []
    left = list(range(requests))
    headers = {"authorization": f"Bearer {KEY}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60, limits=limits) as client:

        async def one(i: int) -> Outcome:
            body = {
                "model": route,
                "messages": [{"role": "user", "content": f"brown-out {i}"}],
                "max_tokens": max_tokens,
                "user": marker,
                "stream": stream,
            }
            t0 = time.perf_counter()
            if not stream:
                r = await client.post("/v1/chat/completions", json=body)
                return Outcome(r.status_code, time.perf_counter() - t0, r.status_code == 200)
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                done = False
                async for line in r.aiter_lines():
                    if leave_after_first_event and line.startswith("data:"):
                        break  # leaving the block closes the connection mid-answer
                    done = done or line.strip() == "data: [DONE]"
                return Outcome(r.status_code, time.perf_counter() - t0, r.status_code == 200 and done)

        async def worker() -> None:
            while left:
                outcomes.append(await one(left.pop()))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


@dataclass(frozen=True, slots=True)
class Figures:
    requests: int
    answered: int  # complete answers (200)
    attempts: int  # upstream attempts in the fake's ledger
    primary_attempts: int
    budget_refusals: int  # strait_retry_budget_exhausted_total for the route, over the run
    p50_s: float
    p99_s: float

    @property
    def bound(self) -> float:
        return 1.2 * self.requests + 3

    @property
    def bound_held(self) -> bool:
        return self.attempts <= self.bound

    def row(self, label: str) -> str:
        return (
            f"| {label} | {self.requests} | {self.answered / self.requests:.1%} | {self.attempts} "
            f"({self.primary_attempts} primary) | {self.attempts / self.requests:.2f} | {self.bound:g} "
            f"{'held' if self.bound_held else 'BROKEN'} | {self.budget_refusals} | {self.p50_s * 1000:.0f} ms "
            f"| {self.p99_s * 1000:.0f} ms |"
        )


HEADER = (
    "| run | requests | answered | upstream attempts | per request | bound 1.2N+3 | budget refusals | p50 | p99 |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def metric(gateway_url: str, sample: str) -> float:
    """One sample of the gateway's /metrics, named with its labels (0 when absent)."""
    for line in httpx.get(gateway_url + "/metrics", timeout=10).text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    return 0.0


def refusals(gateway_url: str, route: str) -> float:
    return metric(gateway_url, f'strait_retry_budget_exhausted_total{{route="{route}"}}')


def measure(gateway_url: str, fake: FakeControl, fault: str, requests: int, concurrency: int) -> Figures:
    """One brown-out on `fault`'s route; the figures from the clients, the fake's ledger and /metrics."""
    route = route_of(fault)
    marker = uuid.uuid4().hex
    before = refusals(gateway_url, route)
    outcomes = asyncio.run(drive(gateway_url, route, requests, concurrency, marker))
    ledger = [r for r in fake.ledger() if isinstance(r["body"], dict) and r["body"].get("user") == marker]
    latencies = sorted(o.seconds for o in outcomes)
    return Figures(
        requests=len(outcomes),
        answered=sum(o.complete for o in outcomes),
        attempts=len(ledger),
        primary_attempts=sum(1 for r in ledger if r["model"] != FALLBACK_MODEL),
        budget_refusals=round(refusals(gateway_url, route) - before),
        p50_s=latencies[len(latencies) // 2],
        p99_s=latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    )


@contextlib.contextmanager
def gateway(folder: Path, fake_url: str, fail_ratio: float, *, ejection: bool) -> Iterator[ServerProcess]:
    folder.mkdir(parents=True, exist_ok=True)
    name = "ejection" if ejection else "no-ejection"
    policy = folder / f"{name}.yaml"
    policy.write_text(policy_text(fake_url, fail_ratio, ejection=ejection))
    env = {"STRAIT_SPOOL_DIR": str(folder / f"spool-{name}"), "STRAIT_ACCESS_LOG": "off"}
    with gateway_process(policy, log_path=folder / f"gw-{name}.log", env=env) as gw:
        yield gw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--requests", type=int, default=300, help="requests per route and run (default 300)")
    ap.add_argument("-c", "--concurrency", type=int, default=20, help="clients at a time (default 20)")
    ap.add_argument("--fail-ratio", type=float, default=0.5, help="share of the primary's attempts failing")
    args = ap.parse_args()
    rows: list[str] = []
    with tempfile.TemporaryDirectory(prefix="brownout-") as tmp, fake_upstream(Path(tmp)) as (proc, fake):
        for ejection in (True, False):
            fake.reset(counter=True)  # each run's primaries start their failure pattern afresh
            with gateway(Path(tmp), proc.base_url, args.fail_ratio, ejection=ejection) as gw:
                for fault in FAULTS:
                    figures = measure(gw.base_url, fake, fault, args.requests, args.concurrency)
                    label = f"{fault}, ejection {'on' if ejection else 'off'}"
                    rows.append(figures.row(label))
                    print(rows[-1], file=sys.stderr, flush=True)
    print(
        f"\nBrown-out: primary failing {args.fail_ratio:.0%} of its attempts, healthy fallback, "
        f"{args.requests} requests per run, {args.concurrency} at a time.\n"
    )
    print(HEADER)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
