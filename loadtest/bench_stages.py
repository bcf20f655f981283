"""CPU of the request stages in-process: `python -m loadtest.bench_stages [--requests N]`.

Builds the real runtime for `overhead`'s limits policy (every limit on, the memory store) and runs
auth -> route -> limits for one small chat request, then reconciles its ticket, N requests at a time,
seven times. Prints the least CPU time per request (process time) and the least wall time per stage:
what the policy engine, the compiled policy and the limits stage cost without HTTP, upstream or noise
from the rest of the gateway. Decoding is left out (the canonical request is decoded once, up front).
"""

from __future__ import annotations

import argparse
import asyncio
import time

import msgspec
import yaml

from gateway.api.inbound import DEFAULT_LIMITS
from gateway.api.openai.decode import decode
from gateway.context import RequestContext
from gateway.policy.decisions import DecisionLog
from gateway.policy.index import key_digest
from gateway.policy.model import PolicySet
from gateway.registry import discover_adapters
from gateway.reply import Reply
from gateway.runtime import Services, build_runtime
from gateway.state import MemoryStore, Usage
from gateway.telemetry import Metrics
from gateway.tokens import PromptTokens
from gateway.upstream.signals import LiveSignals
from loadtest.overhead import POLICY_LIMITS

KEY = "sk-bench-0123456789abcdef"


class _NoDecode:
    name = "decode"

    async def on_request(self, ctx: RequestContext) -> None:
        return None

    async def on_response(self, ctx: RequestContext, reply: Reply) -> Reply:
        return reply


class _NoAccounting:
    def refused(self, ctx: RequestContext, status: int, code: str | None) -> None:
        return None


async def bench(n: int) -> str:
    text = POLICY_LIMITS.format(host="127.0.0.1", port=9, digest=key_digest(KEY))
    policy = msgspec.convert(yaml.safe_load(text), PolicySet)
    store = MemoryStore()
    services = Services(
        metrics=Metrics(),
        signals=LiveSignals(),
        store=store,
        accounting=_NoAccounting(),  # type: ignore[arg-type]
        decisions=DecisionLog(),
        decode=lambda p: _NoDecode(),
    )
    stages = [s for s in build_runtime(policy, discover_adapters(), services).pipeline.stages if s.name != "decode"]
    body = msgspec.json.encode(
        {"model": "bench", "messages": [{"role": "user", "content": "hello there, how are you"}], "max_tokens": 16}
    )
    request = decode(body, "chat", DEFAULT_LIMITS)
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}

    async def rounds(count: int, spent: dict[str, float]) -> None:
        for i in range(count):
            ctx = RequestContext(
                request_id=f"r{i}",
                operation="chat",
                started=0.0,
                headers=headers,
                request=request,
                route_name="bench",
                decision_id="d",
            )
            # A fresh count per request, as the decode stage makes one (counted when a limit needs it).
            ctx.prompt_tokens = PromptTokens(request.prompt_texts, chat=True)
            for stage in stages:
                t0 = time.perf_counter()
                await stage.on_request(ctx)
                spent[stage.name] += time.perf_counter() - t0
            if ctx.ticket is not None:
                await store.reconcile(ctx.ticket, Usage(tokens=10))

    await rounds(2000, {s.name: 0.0 for s in stages})  # warm up
    best = float("inf")
    per_stage: dict[str, float] = {s.name: float("inf") for s in stages}
    for _ in range(7):
        spent = {s.name: 0.0 for s in stages}
        t0 = time.process_time()
        await rounds(n, spent)
        best = min(best, time.process_time() - t0)
        for name, total in spent.items():
            per_stage[name] = min(per_stage[name], total)
    stages_text = ", ".join(f"{name} {total / n * 1e6:.1f}" for name, total in per_stage.items())
    return f"{best / n * 1e6:.1f} us CPU per request (least of 7 x {n}); per stage (us): {stages_text}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    args = parser.parse_args()
    print(asyncio.run(bench(args.requests)))


if __name__ == "__main__":
    main()
