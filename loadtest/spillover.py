"""Spillover under a rising then falling load: the share of answers each tier served, per time slice.

Two fake upstreams (tests/harness/fake_upstream.py): a self-hosted engine with `--slots 4` whose
vLLM-style metrics page (`vllm:num_requests_running` / `_waiting`, `kv_cache_usage_perc`) follows its
in-flight requests, and a provider. One real `strait serve` scrapes the engine every 0.25 s; the route
keeps the self-hosted tier first and sends it every request that fits under `threshold` (0.8: a
request that finds all 4 slots busy does not), spills only the overflow to the provider, and ends its
spill state only once utilisation is at or below `resume_below` (0.5).
Every answer takes ~300 ms on either side (`ttft_ms`), so the clients' concurrency is the load: it
rises 1 -> 8 and falls back to 1, one step per slice.

    .venv/bin/python -m loadtest.spillover                  # 14 slices of 3 s, ~45 s
    .venv/bin/python -m loadtest.spillover --slice-s 5 --profile 1,2,4,6,8,6,4,2,1
    .venv/bin/python -m loadtest.spillover --pinned         # the marks alone, ~20 s

`--pinned` holds 2 clients and pins the engine's reported KV-cache use instead (the fake's `POST
/_metrics`), rising 0.3 -> 0.95 and falling back, so the table shows the two marks themselves: the spill
starts at 0.8 and goes on down to 0.5.

Prints one markdown table: per slice, the clients, answers, the share served by each tier, the
answers that said `x-strait-spill` (sent elsewhere), the engine's spill state's starts and stops (read
off each answer's explain: spilled, or `spilling` while the request fit; in the order the answers were
asked for), and the engine's mean running / waiting requests (its metrics page, sampled every 0.1 s).
Loopback only, state in memory, every process stopped by its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from gateway.policy.index import key_digest
from tests.harness.gateway import gateway_process
from tests.harness.procs import PYTHON, ServerProcess, free_port

KEY = "sk-spillover-tenant-77aa"
PROFILE = (1, 2, 3, 4, 5, 6, 8, 8, 6, 5, 4, 3, 2, 1)
PINNED = (0.3, 0.5, 0.7, 0.85, 0.95, 0.85, 0.7, 0.6, 0.5, 0.3)
PINNED_CLIENTS = 2
SLOTS = 4
ANSWER_MS = 300
THRESHOLD = 0.8
RESUME_BELOW = 0.5
TIERS = {"engine": "self-hosted", "provider": "provider"}


def policy_text(engine_url: str, provider_url: str) -> str:
    model = f"fault:ttft_ms={ANSWER_MS}"
    return f"""
version: 1
backends:
  - name: engine
    adapter: openai
    base_url: "{engine_url}/v1"
    tier: self-hosted
    capacity: {{max_concurrency: {SLOTS}, commitment: committed, metrics_url: "{engine_url}/metrics",
                scrape_interval_s: 0.25}}
  - {{name: provider, adapter: openai, base_url: "{provider_url}/v1", tier: provider}}
models:
  - {{name: m-engine, deployments: [{{backend: engine, upstream_model: "{model}"}}]}}
  - {{name: m-provider, deployments: [{{backend: provider, upstream_model: "{model}"}}]}}
routes:
  - name: chat
    models: [m-engine, m-provider]
    spillover: {{tiers: [self-hosted, provider], threshold: {THRESHOLD}, resume_below: {RESUME_BELOW}}}
tenants:
  - name: t
    explain: true
    keys: [{{id: t-1, digest: "{key_digest(KEY)}"}}]
"""


@dataclass(slots=True)
class Slice:
    clients: int
    pinned: float | None = None  # the engine's reported KV-cache use, when pinned
    # (time asked, backend that answered or "error", spilled, engine in spill state) of each answer
    # started in the slice.
    answers: list[tuple[float, str, bool, bool]] = field(default_factory=list)
    # (running, waiting) samples of the engine's metrics page.
    engine: list[tuple[float, float]] = field(default_factory=list)


async def _engine_sampler(client: httpx.AsyncClient, engine_url: str, into: list[Slice], stop: asyncio.Event) -> None:
    while not stop.is_set():
        text = (await client.get(engine_url + "/metrics")).text
        running = waiting = 0.0
        for line in text.splitlines():
            if line.startswith("vllm:num_requests_running"):
                running = float(line.rsplit(" ", 1)[1])
            elif line.startswith("vllm:num_requests_waiting"):
                waiting = float(line.rsplit(" ", 1)[1])
        into[-1].engine.append((running, waiting))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)


async def run(
    gateway_url: str, engine_url: str, profile: tuple[int, ...], slice_s: float, pinned: tuple[float, ...] = ()
) -> list[Slice]:
    slices: list[Slice] = []
    headers = {"authorization": f"Bearer {KEY}", "x-strait-explain": "1"}
    body = {"model": "chat", "messages": [{"role": "user", "content": "spill?"}], "max_tokens": 5}
    limits = httpx.Limits(max_connections=max(profile) + 2)
    async with (
        httpx.AsyncClient(base_url=gateway_url, headers=headers, timeout=30, limits=limits) as client,
        httpx.AsyncClient(timeout=5) as sampler,
    ):
        stop = asyncio.Event()
        slices.append(Slice(profile[0], pinned[0] if pinned else None))
        sampling = asyncio.ensure_future(_engine_sampler(sampler, engine_url, slices, stop))
        try:
            for n, clients in enumerate(profile):
                if n:
                    slices.append(Slice(clients, pinned[n] if pinned else None))
                current = slices[-1]
                if current.pinned is not None:
                    spec = {"kv_cache_usage": current.pinned, "running": 0, "waiting": 0}
                    (await sampler.post(engine_url + "/_metrics", json=spec)).raise_for_status()
                end = time.monotonic() + slice_s

                async def worker(current: Slice = current, end: float = end) -> None:
                    while time.monotonic() < end:
                        asked = time.monotonic()
                        r = await client.post("/v1/chat/completions", json=body)
                        backend = r.headers.get("x-strait-deployment", "").rpartition("@")[2]
                        spilled = "x-strait-spill" in r.headers
                        state = spilled or "spilling" in json.loads(r.headers.get("x-strait-explain", "{}"))
                        answer = (asked, backend if r.status_code == 200 else "error", spilled, state)
                        current.answers.append(answer)

                await asyncio.gather(*(worker() for _ in range(clients)))
        finally:
            stop.set()
            await sampling
    return slices


def table(slices: list[Slice], slice_s: float) -> str:
    rows = [
        "| t (s) | clients | answers | self-hosted | provider | errors | spilled | spill starts / stops "
        + ("| engine KV use (pinned) |" if slices[0].pinned is not None else "| engine running / waiting |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    spilling = False
    for n, s in enumerate(slices):
        answers = sorted(s.answers)
        total = len(answers) or 1
        by = {name: sum(1 for _, b, _, _ in answers if b == name) for name in (*TIERS, "error")}
        starts = stops = 0
        for _, _, _, state in answers:
            if state and not spilling:
                starts += 1
            elif not state and spilling:
                stops += 1
            spilling = state
        running = sum(r for r, _ in s.engine) / max(1, len(s.engine))
        waiting = sum(w for _, w in s.engine) / max(1, len(s.engine))
        rows.append(
            f"| {n * slice_s:g}-{(n + 1) * slice_s:g} | {s.clients} | {len(answers)} "
            f"| {by['engine'] / total:.0%} | {by['provider'] / total:.0%} | {by['error']} "
            f"| {sum(sp for _, _, sp, _ in answers)} | {starts} / {stops} "
            + (f"| {s.pinned:g} |" if s.pinned is not None else f"| {running:.1f} / {waiting:.1f} |")
        )
    return "\n".join(rows)


@contextlib.contextmanager
def fake(folder: Path, name: str, slots: int) -> Iterator[ServerProcess]:
    port = free_port()
    argv = [PYTHON, "-m", "tests.harness.fake_upstream", "--port", str(port), "--slots", str(slots)]
    with ServerProcess(argv, port, ready_path="/healthz", log_path=folder / f"{name}.log") as proc:
        yield proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slice-s", type=float, default=3.0, help="seconds per step of the profile (default 3)")
    ap.add_argument("--profile", default=",".join(map(str, PROFILE)), help="clients per slice, comma-separated")
    ap.add_argument("--pinned", action="store_true", help="pin the engine's KV-cache use instead (2 clients)")
    args = ap.parse_args()
    profile = tuple(int(c) for c in args.profile.split(","))
    pinned = PINNED if args.pinned else ()
    if pinned:
        profile = (PINNED_CLIENTS,) * len(pinned)
    with tempfile.TemporaryDirectory(prefix="spillover-") as tmp:
        folder = Path(tmp)
        with fake(folder, "engine", SLOTS) as engine, fake(folder, "provider", 64) as provider:
            policy = folder / "policy.yaml"
            policy.write_text(policy_text(engine.base_url, provider.base_url))
            env = {"STRAIT_SPOOL_DIR": str(folder / "spool"), "STRAIT_ACCESS_LOG": "off"}
            with gateway_process(policy, log_path=folder / "gw.log", env=env) as gw:
                slices = asyncio.run(run(gw.base_url, engine.base_url, profile, args.slice_s, pinned))
    print(
        f"\nSpillover: self-hosted engine ({SLOTS} slots, metrics scraped every 0.25 s) then provider; "
        f"threshold {THRESHOLD}, resume_below {RESUME_BELOW}; answers take ~{ANSWER_MS} ms.\n"
    )
    print(table(slices, args.slice_s))


if __name__ == "__main__":
    main()
