"""What the decision observers cost per request: `python -m loadtest.bench_observers [--size 1]`.

The live policy is `loadtest.policy_scale`'s generated one (S blocks), the shadow policy the same
generated with another seed (every price differs, so decisions disagree often). For the same requests
as `policy_scale` measures, prints µs per request (median, p99) of: the live decision alone; the shadow
policy's `observe` (one more decision, the comparison, the counter, a rate-limited log line); the feature
log's `observe` (one JSON line appended to a file). What `strait serve --shadow-policy` and
`STRAIT_FEATURE_LOG` add to the route stage.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from gateway.context import RequestContext
from gateway.errors import GatewayError
from gateway.policy.engine import RequestFeatures, RoutePlan, decide
from gateway.policy.index import PolicyIndex, Principal
from gateway.policy.live import LiveState
from gateway.policy.load import load_policy
from gateway.stages.observers import FeatureLog, FeatureLogFile, ShadowPolicy
from gateway.telemetry import Metrics
from loadtest.policy_scale import ROUTES, TENANTS, write_policy


def _timed(n: int, step: Callable[[int], object]) -> tuple[float, float]:
    for i in range(min(n, 2000)):  # warm the interpreter
        step(i)
    samples = []
    for i in range(n):
        t0 = time.perf_counter_ns()
        step(i)
        samples.append((time.perf_counter_ns() - t0) / 1000)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1)
    parser.add_argument("--requests", type=int, default=20000)
    args = parser.parse_args()
    logging.getLogger("strait.observers").setLevel(logging.ERROR)  # the disagreement lines are not measured here
    rng = random.Random(3)
    with tempfile.TemporaryDirectory() as tmp:
        live_dir, shadow_dir = Path(tmp) / "live", Path(tmp) / "shadow"
        live_dir.mkdir()
        shadow_dir.mkdir()
        index = PolicyIndex(load_policy(write_policy(args.size, live_dir)))
        shadow = ShadowPolicy(str(write_policy(args.size, shadow_dir, seed=11)), Metrics())
        features_file = FeatureLogFile(str(Path(tmp) / "features.jsonl"), 1.0)
        feature_log = FeatureLog(features_file, index)
        cases = []
        for _ in range(1000):
            s, t = rng.randrange(args.size), rng.randrange(TENANTS)
            principal = Principal(tenant=f"t{s}_{t}", key_id="k", allowed_routes=None)
            ctx = RequestContext(request_id="r", operation="chat", started=0.0, headers={}, principal=principal)
            features = RequestFeatures(
                route=f"r{s}_{rng.randrange(ROUTES)}", prompt_tokens=rng.choice([20, 500, 4000]), max_tokens=256
            )
            plan: RoutePlan | GatewayError
            try:
                plan = decide(index, principal, features, LiveState(), decision_id="b")
            except GatewayError as exc:
                plan = exc
            cases.append((ctx, features, plan))
        live = LiveState()

        def live_decision(i: int) -> None:
            ctx, features, _ = cases[i % len(cases)]
            assert ctx.principal is not None
            with contextlib.suppress(GatewayError):
                decide(index, ctx.principal, features, live, decision_id="b")

        def shadowed(i: int) -> None:
            shadow.observe(*cases[i % len(cases)][:2], live, cases[i % len(cases)][2])

        def logged(i: int) -> None:
            feature_log.observe(*cases[i % len(cases)][:2], live, cases[i % len(cases)][2])

        for label, step in (
            ("live decision", live_decision),
            ("+ shadow policy observe", shadowed),
            ("+ feature log observe", logged),
        ):
            median, p99 = _timed(args.requests, step)
            print(f"{label:<28} median {median:6.1f} us   p99 {p99:6.1f} us")
        disagree = shadow.metrics.child(shadow.metrics.shadow_decisions, "disagree").pending
        agree = shadow.metrics.child(shadow.metrics.shadow_decisions, "agree").pending
        print(f"shadow disagreed on {disagree / (agree + disagree) * 100:.0f} % of decisions (S={args.size})")
        features_file.close()


if __name__ == "__main__":
    main()
