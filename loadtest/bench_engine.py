"""Cost of one routing decision: `python -m loadtest.bench_engine [--decisions N]`.

A generated policy with 20 backends, 30 models (each deployed on 2-4 backends), 10 routes and 50
tenants with varied compliance; requests vary tenant, route, prompt size, tools and preferences; live
signals vary utilisation and latency. Prints microseconds per decision (median, p99) for the engine
alone (compliance verdicts compiled with the index, as in the server), and the time to build the index
(what a policy load or reload pays once for the compiled tables).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any

import msgspec

from gateway.errors import GatewayError
from gateway.policy.engine import Preferences, RequestFeatures, decide
from gateway.policy.index import PolicyIndex, Principal
from gateway.policy.live import LiveState
from gateway.policy.model import PolicySet

JURISDICTIONS = ["US", "DE", "FR", "SE", "EU", "CN", "JP", None]
TIERS = ["edge", "self-hosted", "provider"]
ORIGINS = [
    ("Meta", "US"),
    ("Mistral AI", "FR"),
    ("DeepSeek", "CN"),
    ("Alibaba", "CN"),
    ("OpenAI", "US"),
    ("Google", "US"),
]


def build_policy(rng: random.Random) -> dict[str, Any]:
    backends = [
        {
            "name": f"b{i}",
            "adapter": "simulated",
            "tier": TIERS[i % 3],
            "hosting": {
                "operator": ORIGINS[i % len(ORIGINS)][0] if i % 5 == 0 else f"op{i}",
                "jurisdiction": JURISDICTIONS[i % len(JURISDICTIONS)],
                "retention_days": rng.choice([0, 0, 30, None]),
                "trains_on_data": i % 7 == 0,
                "certifications": ["SOC2"] if i % 2 else [],
            },
            "capacity": {"max_concurrency": 32},
        }
        for i in range(20)
    ]
    models = []
    for m in range(30):
        dev, country = ORIGINS[m % len(ORIGINS)]
        deployments = [
            {
                "backend": f"b{b}",
                "upstream_model": f"m{m}-{b}",
                "price": {"input_per_mtok": rng.uniform(0, 3), "output_per_mtok": rng.uniform(0, 12)},
            }
            for b in rng.sample(range(20), rng.randint(2, 4))
        ]
        models.append(
            {
                "name": f"m{m}",
                "origin": {"developer": dev, "country": country},
                "context_window": rng.choice([8192, 32768, 131072]),
                "capabilities": ["chat", "completions", "json"] + (["tools"] if m % 2 else []),
                "deployments": deployments,
            }
        )
    routes = [
        {
            "name": f"r{r}",
            "models": [f"m{(r * 3 + k) % 30}" for k in range(6)],
            "objective": ["cost", "latency", "balanced", "ordered"][r % 4],
            **({"spillover": {"threshold": 0.8}} if r % 2 else {}),
        }
        for r in range(10)
    ]
    compliances = [
        {},
        {"allowed_jurisdictions": ["EU"], "max_retention_days": 0},
        {"denied_origin_countries": ["CN"]},
        {
            "origin_rules": [
                {"origin_countries": ["CN"], "allowed_tiers": ["self-hosted"], "deny_developer_operated": True}
            ]
        },
        {"allowed_jurisdictions": ["US", "EU"], "no_training": True},
    ]
    tenants = [{"name": f"t{t}", "compliance": compliances[t % len(compliances)]} for t in range(50)]
    return {"backends": backends, "models": models, "routes": routes, "tenants": tenants}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--decisions", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    policy = msgspec.convert(build_policy(rng), PolicySet)
    index = PolicyIndex(policy)
    principals = [Principal(tenant=f"t{t}", key_id="k", allowed_routes=None) for t in range(50)]
    lives = [
        LiveState(
            utilisation={f"b{b}": rng.random() for b in range(20)},
            latency_ms={f"b{b}": rng.uniform(50, 900) for b in range(20)},
            unhealthy=frozenset({f"b{rng.randrange(20)}"}),
        )
        for _ in range(16)
    ]
    cases = []
    for _ in range(1000):
        prefs = Preferences(objective="latency") if rng.random() < 0.1 else None
        cases.append(
            (
                rng.choice(principals),
                RequestFeatures(
                    route=f"r{rng.randrange(10)}",
                    prompt_tokens=rng.choice([20, 500, 4000, 20000]),
                    max_tokens=rng.choice([None, 256, 4096]),
                    needs=frozenset({"tools"}) if rng.random() < 0.2 else frozenset(),
                    preferences=prefs,
                ),
                rng.choice(lives),
            )
        )

    def run(n: int) -> list[float]:
        out = []
        refused = 0
        for i in range(n):
            principal, features, live = cases[i % len(cases)]
            t0 = time.perf_counter_ns()
            try:
                decide(index, principal, features, live, decision_id="b")
            except GatewayError:
                refused += 1
            out.append((time.perf_counter_ns() - t0) / 1000)
        return out

    run(2000)  # warm the interpreter
    samples = sorted(run(args.decisions))
    p99 = samples[int(len(samples) * 0.99)]
    label = "decision (server steady state)"
    print(f"{label:<45} median {statistics.median(samples):7.1f} us   p99 {p99:7.1f} us   ({len(samples)} decisions)")
    builds = []
    for _ in range(5):
        t0 = time.perf_counter_ns()
        PolicyIndex(index.policy)
        builds.append((time.perf_counter_ns() - t0) / 1e6)
    print(f"{'index build (once per load)':<45} median {statistics.median(builds):7.1f} ms")
    print("policy: 20 backends, 30 models, 10 routes (6 models each, 12-24 candidates), 50 tenants")


if __name__ == "__main__":
    main()
