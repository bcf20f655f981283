"""Properties of the shadow runner (the bounded queue of copies), on generated sequences of copies whose
candidate answers, fails, raises, refuses or hangs: the copies running never exceed max_concurrency, those
pending never exceed max_concurrency + max_queue, every copy submitted is counted exactly once (an outcome,
or dropped, or paused), and at shutdown nothing is left pending."""

from __future__ import annotations

import asyncio
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.api.openai.decode import decode
from gateway.context import RequestContext
from gateway.contracts import ShadowFailure, UpstreamCall, UpstreamConnectError, UpstreamResponse
from gateway.policy.index import Target
from gateway.policy.model import Backend, Deployment, Model, ShadowLimits
from gateway.stages.shadow import ShadowJob, ShadowRunner
from gateway.telemetry import Metrics
from gateway.upstream.wire import Usage

BODY = json.dumps(
    {
        "id": "c",
        "object": "chat.completion",
        "created": 1,
        "model": "x",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    }
).encode()
REQUEST = decode(b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}]}', "chat")
BEHAVIOURS = ("ok", "status", "raise", "connect", "hang", "yield")


class Candidate:
    def __init__(self, runner: ShadowRunner, limits: ShadowLimits) -> None:
        self.runner = runner
        self.limits = limits
        self.running = 0
        self.most = 0

    def adapter(self, how: str) -> object:
        candidate = self

        class Adapter:
            async def send(self, call: UpstreamCall) -> UpstreamResponse:
                candidate.running += 1
                candidate.most = max(candidate.most, candidate.running)
                try:
                    if how == "hang":
                        await asyncio.Event().wait()
                    if how == "yield":
                        await asyncio.sleep(0)
                    if how == "status":
                        return UpstreamResponse(status=503, body=b"{}")
                    if how == "raise":
                        raise RuntimeError("bug")
                    if how == "connect":
                        raise UpstreamConnectError("refused")
                    return UpstreamResponse(status=200, body=BODY)
                finally:
                    candidate.running -= 1

            async def aclose(self) -> None:
                return None

        return Adapter()


class Sink:
    def __init__(self) -> None:
        self.records = 0

    def record(
        self, live: RequestContext, target: Target, answer: bytes | ShadowFailure, latency_s: float, usage: Usage | None
    ) -> None:
        self.records += 1


def target(label: str) -> Target:
    backend = Backend(name=label, adapter="x", base_url="http://x.invalid")
    return Target(
        model=Model(name="cand", deployments=(Deployment(backend=label, upstream_model="m"),)),
        deployment=Deployment(backend=label, upstream_model="m"),
        backend=backend,
    )


def outcomes(metrics: Metrics) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in metrics.render().decode().splitlines():
        if line.startswith("strait_shadow_requests_total{"):
            outcome = line.split('outcome="')[1].split('"')[0]
            out[outcome] = out.get(outcome, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    concurrency=st.integers(1, 4),
    queue=st.integers(0, 4),
    plan=st.lists(st.tuples(st.sampled_from(BEHAVIOURS), st.integers(0, 2), st.booleans()), max_size=40),
)
def test_the_runner_is_bounded_and_counts_every_copy_once(
    concurrency: int, queue: int, plan: list[tuple[str, int, bool]]
) -> None:
    async def scenario() -> None:
        metrics = Metrics()
        sink = Sink()
        limits = ShadowLimits(max_concurrency=concurrency, max_queue=queue)
        runner = ShadowRunner(metrics, sink, limits)
        candidate = Candidate(runner, limits)
        submitted = 0
        for how, deployment, settle in plan:
            ctx = RequestContext(request_id=f"r{submitted}", operation="chat", started=0.0, headers={})
            call = UpstreamCall(operation="chat", request=REQUEST, model="m", stream=False, request_id=ctx.request_id)
            job = ShadowJob(ctx, "chat", target(f"b{deployment}"), candidate.adapter(how), call, 0.05)  # type: ignore[arg-type]
            runner.submit(job)
            submitted += 1
            assert runner.pending <= concurrency + queue
            assert candidate.running <= concurrency
            if settle:
                await asyncio.sleep(0)
        # Let everything that can end, end (hanging copies end by their 0.05 s timeout).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while runner.pending and loop.time() < deadline:
            await asyncio.sleep(0.01)
        assert runner.pending == 0
        assert candidate.most <= concurrency
        counted = outcomes(metrics)
        assert sum(counted.values()) == submitted, counted
        # Every copy that ran (not dropped, not paused) reached the sink exactly once.
        ran = submitted - counted.get("dropped", 0) - counted.get("paused", 0)
        assert sink.records == ran
        await runner.aclose()
        assert runner.pending == 0

    asyncio.run(scenario())
