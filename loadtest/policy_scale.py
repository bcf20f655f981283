"""Policies at enterprise size: `python -m loadtest.policy_scale [--sizes 1,10,50]`.

Generates a policy of S blocks, each block 20 backends, 30 models (each deployed on 2-4 of its block's
backends), 10 routes of 6 models (every third route falls back to the next one) and 50 tenants with
varied compliance (five envelopes, as enterprises have few; some tenants list their routes, most use
`*`). At S=50 that is 1,000 backends, 1,500 models, 500 routes and 2,500 tenants.

For each S it prints the YAML size, the time of `check_policy` (what `strait policy check`, `strait
serve` and a reload pay: parse, decode, cross-check, compile the index), wall clock and the process's
CPU time (on a shared machine the CPU time is the steadier figure), and the median/p99 cost of one
routing decision on the built index (it must stay flat in S).

`--write DIR` only writes the S-sized policy to DIR/policy.yaml (for a reload measurement:
`python -m loadtest.policy_reload`).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from gateway.errors import GatewayError
from gateway.policy.engine import Preferences, RequestFeatures, decide
from gateway.policy.index import PolicyIndex, Principal
from gateway.policy.live import LiveState
from gateway.policy.load import check_policy
from gateway.registry import discover_adapters

JURISDICTIONS = ["US", "DE", "FR", "SE", "EU", "CN", "JP", None]
HEADQUARTERS = ["US", "DE", "FR", "SE", "JP", "CN"]
TIERS = ["edge", "self-hosted", "provider"]
ORIGINS = [
    ("Meta", "US"),
    ("Mistral AI", "FR"),
    ("DeepSeek", "CN"),
    ("Alibaba", "CN"),
    ("OpenAI", "US"),
    ("Google", "US"),
]
COMPLIANCES: list[dict[str, Any]] = [
    {},
    {"allowed_jurisdictions": ["EU"], "max_retention_days": 0},
    {"denied_origin_countries": ["CN"]},
    {"origin_rules": [{"origin_countries": ["CN"], "allowed_tiers": ["self-hosted"], "deny_developer_operated": True}]},
    {"allowed_jurisdictions": ["US", "EU"], "no_training": True},
]
BACKENDS, MODELS, ROUTES, TENANTS = 20, 30, 10, 50


def block(s: int, rng: random.Random) -> dict[str, list[dict[str, Any]]]:
    """One block of the policy; names carry the block number so blocks never collide."""
    backends = [
        {
            "name": f"b{s}_{i}",
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
        for i in range(BACKENDS)
    ]
    models = []
    for m in range(MODELS):
        dev, country = ORIGINS[m % len(ORIGINS)]
        models.append(
            {
                "name": f"m{s}_{m}",
                "origin": {"developer": dev, "country": country},
                "context_window": rng.choice([8192, 32768, 131072]),
                "capabilities": ["chat", "completions", "json"] + (["tools"] if m % 2 else []),
                "deployments": [
                    {
                        "backend": f"b{s}_{b}",
                        "upstream_model": f"m{m}-{b}",
                        "price": {
                            "input_per_mtok": round(rng.uniform(0, 3), 4),
                            "output_per_mtok": round(rng.uniform(0, 12), 4),
                        },
                    }
                    for b in rng.sample(range(BACKENDS), rng.randint(2, 4))
                ],
            }
        )
    routes = [
        {
            "name": f"r{s}_{r}",
            "models": [f"m{s}_{(r * 3 + k) % MODELS}" for k in range(6)],
            "objective": ["cost", "latency", "balanced", "ordered"][r % 4],
            **({"spillover": {"threshold": 0.8}} if r % 2 else {}),
            **({"fallback": [f"r{s}_{(r + 1) % ROUTES}"]} if r % 3 == 0 else {}),
        }
        for r in range(ROUTES)
    ]
    tenants = []
    for t in range(TENANTS):
        compliance = COMPLIANCES[t % len(COMPLIANCES)]
        # Tenants without constraints list their routes (an empty route would be an error for them).
        allowed = [f"r{s}_{r}" for r in range(0, ROUTES, 2)] if not compliance and t % 2 else ["*"]
        tenants.append({"name": f"t{s}_{t}", "allowed_routes": allowed, "compliance": compliance})
    return {"backends": backends, "models": models, "routes": routes, "tenants": tenants}


def build_policy(size: int, seed: int = 7) -> dict[str, Any]:
    rng = random.Random(seed)
    # Every hosting operator is an entity of `operators` (compliance v2): the model developers (their own
    # services) and the generic operators op0..op19, shared by every block.
    operators = [{"name": dev, "headquarters": country} for dev, country in ORIGINS]
    operators += [{"name": f"op{i}", "headquarters": HEADQUARTERS[i % len(HEADQUARTERS)]} for i in range(BACKENDS)]
    out: dict[str, Any] = {
        "version": 1,
        "operators": operators,
        "backends": [],
        "models": [],
        "routes": [],
        "tenants": [],
    }
    for s in range(size):
        for section, entries in block(s, rng).items():
            out[section].extend(entries)
    return out


def write_policy(size: int, directory: Path, seed: int = 7) -> Path:
    path = directory / "policy.yaml"
    path.write_text(yaml.safe_dump(build_policy(size, seed), sort_keys=False, width=200))
    return path


def decision_cost(index: PolicyIndex, size: int, rng: random.Random, n: int) -> tuple[float, float]:
    """Median and p99 microseconds of one decision over requests spread across the whole policy."""
    principals = [
        Principal(tenant=f"t{s}_{t}", key_id="k", allowed_routes=None) for s in range(size) for t in range(TENANTS)
    ]
    backends = [f"b{s}_{b}" for s in range(size) for b in range(BACKENDS)]
    lives = [
        LiveState(
            utilisation={b: rng.random() for b in backends},
            latency_ms={b: rng.uniform(50, 900) for b in backends},
            unhealthy=frozenset({rng.choice(backends)}),
        )
        for _ in range(8)
    ]
    cases = []
    for _ in range(1000):
        principal = rng.choice(principals)
        block_no = principal.tenant[1:].split("_")[0]
        cases.append(
            (
                principal,
                RequestFeatures(
                    route=f"r{block_no}_{rng.randrange(ROUTES)}",
                    prompt_tokens=rng.choice([20, 500, 4000, 20000]),
                    max_tokens=rng.choice([None, 256, 4096]),
                    needs=frozenset({"tools"}) if rng.random() < 0.2 else frozenset(),
                    preferences=Preferences(objective="latency") if rng.random() < 0.1 else None,
                ),
                rng.choice(lives),
            )
        )
    samples = []
    for i in range(n + 2000):
        principal, features, live = cases[i % len(cases)]
        t0 = time.perf_counter_ns()
        with contextlib.suppress(GatewayError):  # refusals cost a decision too
            decide(index, principal, features, live, decision_id="b")
        if i >= 2000:  # the first ones warm the interpreter
            samples.append((time.perf_counter_ns() - t0) / 1000)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99)]


def measure(size: int, decisions: int, runs: int) -> None:
    adapters = discover_adapters().keys()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_policy(size, Path(tmp))
        megabytes = path.stat().st_size / 1e6
        walls, cpus = [], []
        for _ in range(runs):
            t0, c0 = time.perf_counter(), time.process_time()
            policy, problems = check_policy(path, adapters=adapters, fresh=True)
            # The index the check built is the one `strait serve` and a reload then use (PolicyIndex.of).
            if policy is not None:
                index = PolicyIndex.of(policy)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            if policy is None:
                raise SystemExit(f"generated policy refused: {[str(p) for p in problems][:3]}")
    median, p99 = decision_cost(index, size, random.Random(size), decisions)
    warnings = sum(1 for p in problems if p.severity == "warning")
    print(
        f"S={size:<3} {megabytes:5.2f} MB  load+check {statistics.median(walls):6.3f} s "
        f"(CPU {statistics.median(cpus):6.3f} s)  decision median {median:5.1f} us  p99 {p99:6.1f} us  "
        f"({warnings} warnings)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,10,50", help="comma-separated block counts S")
    parser.add_argument("--decisions", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=3, help="load+check runs per size (the median is shown)")
    parser.add_argument("--write", metavar="DIR", help="only write the policy of the first size to DIR/policy.yaml")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.write:
        print(write_policy(sizes[0], Path(args.write)))
        return
    print(f"blocks of {BACKENDS} backends, {MODELS} models, {ROUTES} routes of 6 models, {TENANTS} tenants")
    for size in sizes:
        measure(size, args.decisions, args.runs)


if __name__ == "__main__":
    main()
