"""The cache latency bench (`loadtest/cache_bench.py`) with tiny counts, so it cannot rot: real gateway
processes (memory, and redis on a throwaway redis-server), the fast upstream, the packaged embedder. It
asserts that every row is produced and every request came back as the kind it measures (exact hit,
semantic hit, miss, no cache), never a timing bound. Every process is stopped by PID."""

from __future__ import annotations

from pathlib import Path

from loadtest.cache_bench import BACKGROUND, KINDS, LABELS, LOOP_CONDITIONS, Plan, Redis, report, run_bench
from tests.harness.redis_proc import RedisProc


def test_every_row_from_tiny_counts(tmp_path: Path) -> None:
    plan = Plan(requests=4, loop_requests=4, rounds=2, quiet_wait=0.0, warm_deadline_s=60.0)
    with RedisProc() as rds:
        results = run_bench(plan, tmp_path, Redis(rds.url, rds.pid))

    assert [r.state for r in results] == ["memory", "redis"]
    for r in results:
        assert r.error is None, r.error
        for kind in KINDS:  # each request answered, and answered by the tier it measures
            s = r.kinds[kind]
            assert (s["count"], s["unexpected"], s["errors"]) == (4, {}, {}), (r.state, kind, s)
            assert s["p50"] > 0 and s["p99"] >= s["p50"]
        for kind in KINDS[1:]:  # the gateway saw a lookup for each cached kind (from its /metrics)
            assert r.kinds[kind]["lookup_mean_ms"] > 0, (r.state, kind)
        assert r.kinds["off"]["lookup_mean_ms"] == 0.0  # the route without a cache never looks up
        for condition in LOOP_CONDITIONS:
            s = r.loop[condition]
            assert (s["count"], s["unexpected"], s["errors"]) == (4, {}, {}), (r.state, condition, s)
        for condition in BACKGROUND:  # the concurrent stream ran (its first answer came before the timed ones)
            s = r.background[condition]
            assert s["count"] >= 1 and s["unexpected"] == {} and s["errors"] == {}, (r.state, condition, s)
        assert r.questions_used > 4  # warm-up misses + (d) + the concurrent misses, each a new question

    table = report(results, plan)
    for label in LABELS.values():
        assert label in table
    assert "n/a" not in table and "failed" not in table
