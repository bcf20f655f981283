"""The cache latency bench (`loadtest/cache_bench.py`) with tiny counts, so it cannot rot: real gateway
processes (memory, and redis on a throwaway redis-server), the fast upstream, the packaged embedder. It
asserts that every row is produced and every request came back as the kind it measures (exact hit,
semantic hit, miss, no cache), never a timing bound. Every process is stopped by PID."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gateway.cache.embedders import DEFAULT_THRESHOLD, EmbedderSpec, open_embedder
from gateway.cache.match import decide
from loadtest.cache_bench import (
    BACKGROUND,
    KINDS,
    LABELS,
    LOOP_CONDITIONS,
    PAIRS,
    Plan,
    Redis,
    long_question,
    miss_questions,
    report,
    run_bench,
)
from tests.harness.redis_proc import RedisProc


def test_the_questions_are_what_the_rows_say() -> None:
    """Each paraphrase is served its own question by the real decision (threshold, then veto); no new
    question reaches the threshold against a cached one or another new one; long questions are all new."""

    async def check() -> None:
        embedder = open_embedder(EmbedderSpec(name="default", kind="local"))
        try:
            cached, paraphrases = [q for q, _ in PAIRS], [p for _, p in PAIRS]
            cached_vecs, para_vecs = await embedder.embed(cached), await embedder.embed(paraphrases)
            for i, paraphrase in enumerate(paraphrases):
                match = decide(paraphrase, para_vecs[i], cached, cached_vecs, DEFAULT_THRESHOLD)
                assert match is not None and match.index == i, (paraphrase, match)
            new = miss_questions()
            assert len(set(new)) == len(new) and not set(new) & (set(cached) | set(paraphrases))
            new_vecs = await embedder.embed(new)
            assert float((new_vecs @ cached_vecs.T).max()) < DEFAULT_THRESHOLD
            sims = new_vecs @ new_vecs.T
            sims[range(len(new)), range(len(new))] = 0.0
            assert float(sims.max()) < DEFAULT_THRESHOLD
            longs = [long_question(i, new) for i in range(50)]
            assert len(set(longs)) == len(longs)
        finally:
            await embedder.aclose()

    asyncio.run(check())


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
