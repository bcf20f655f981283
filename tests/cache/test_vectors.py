"""The in-process vectors: VectorIndex bookkeeping, the lazily built numpy matrix, and the exact tier
running with numpy absent (it is in the optional `cache` extra)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.cache.entry import VectorRecord
from gateway.cache.vectors import EMPTY, Rows, VectorIndex, VectorSet
from tests.cache.conftest import vec
from tests.harness.procs import REPO_ROOT


def record(query: str, *values: float, expires: int = 10_000) -> VectorRecord:
    return VectorRecord(query, vec(*values), expires)


def test_the_index_keeps_sequence_order_and_applies_overwrites_evictions_and_expiry() -> None:
    index = VectorIndex()
    index.put("a", 1, record("qa", 1, 0))
    index.put("b", 2, record("qb", 0, 1, expires=500))
    index.put("c", 3, record("qc", 1, 1))
    assert index.snapshot(0).keys == ("a", "b", "c") and index.seen == 3
    index.put("a", 4, record("qa2", 0, 0))  # an overwrite moves the row to the end
    assert index.snapshot(0).queries == ("qb", "qc", "qa2")
    index.drop_below(3)  # sequences 1 and 2 were evicted
    assert index.snapshot(0).keys == ("c", "a")
    index.put("c", 5, None)  # overwritten by an entry without a vector
    assert index.snapshot(0).keys == ("a",)
    index.put("d", 6, record("qd", 1, 0, expires=500))
    assert index.snapshot(499).keys == ("a", "d")
    assert index.snapshot(500).keys == ("a",)  # expired rows leave by this process's clock


def test_a_snapshot_is_reused_until_something_changes_or_expires() -> None:
    index = VectorIndex()
    index.put("a", 1, record("qa", 1, 0, expires=1000))
    first = index.snapshot(0)
    assert index.snapshot(999) is first
    assert index.snapshot(1000) is not first
    index.put("b", 2, record("qb", 1, 0, expires=5000))
    second = index.snapshot(1000)
    assert second.keys == ("b",)
    index.remove("b")
    assert len(index.snapshot(1000)) == 0


def test_rows_of_another_width_are_left_out() -> None:
    index = VectorIndex()
    index.put("a", 1, record("qa", 1, 0, 0))
    index.put("b", 2, record("qb", 1, 0))  # 2 dims in a 3-dim namespace: garbage
    index.put("c", 3, record("qc", 0, 0, 1))
    vs = index.snapshot(0)
    assert vs.keys == ("a", "c") and vs.dims == 3


def test_the_matrix_is_float32_rows_built_once() -> None:
    import numpy as np  # the `cache` extra, in the test lock

    index = VectorIndex()
    index.put("a", 1, record("qa", 0.6, 0.8, 0.0))
    index.put("b", 2, record("qb", 0.0, 0.0, 1.0))
    vs = index.snapshot(0)
    m = vs.matrix
    assert m.dtype == np.float32 and m.shape == (2, 3)
    assert np.allclose(m, [[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])
    assert vs.matrix is m
    assert EMPTY.matrix.shape[0] == 0


def test_the_exact_tier_runs_without_numpy() -> None:
    """With numpy made unimportable: stores, entries and replay import and work; only `matrix` needs it."""
    code = textwrap.dedent(
        """
        import asyncio, struct, sys
        sys.modules["numpy"] = None  # any `import numpy` now raises ImportError
        from gateway.cache.entry import CacheEntry
        from gateway.cache.store import open_cache_store
        import gateway.cache.redis_store, gateway.cache.replay

        async def main():
            store = open_cache_store("memory", timeout_s=0.1)
            e = CacheEntry(body=b"{}", query="q", vector=struct.pack("<2f", 1, 0), created_ms=0, expires_ms=2**50)
            await store.put("ns", "k", e, max_entries=10, max_bytes=10**6)
            assert await store.get("ns", "k") == e
            vs = await store.vectors("ns")
            assert vs.keys == ("k",) and vs.vectors == (e.vector,)
            try:
                vs.matrix
            except ImportError:
                print("exact tier ok; matrix needs numpy")

        asyncio.run(main())
        """
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "exact tier ok; matrix needs numpy"


def test_importing_the_store_loads_no_numpy() -> None:
    code = (
        "import sys\n"
        "import gateway.cache.store, gateway.cache.memory, gateway.cache.redis_store, gateway.cache.replay\n"
        "print('numpy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# (op, key index, value): put (value: ttl), put-none, remove, evict-below (value: how many of the oldest), advance
index_ops = st.lists(
    st.tuples(
        st.sampled_from(["put", "put", "put", "put-none", "remove", "evict", "advance"]),
        st.integers(0, 7),
        st.sampled_from([10, 10, 10, 3, 50]),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(index_ops)
def test_the_index_matches_a_plain_rebuild_after_any_changes(program: list[tuple[str, int, int]]) -> None:
    """The incremental bookkeeping (appends, prefix drops, a shared growing buffer) against the
    obvious definition: live rows by sequence, unexpired. Older snapshots must stay as they were."""
    try:
        import numpy as np
    except ImportError:  # the `cache` extra is absent: rows and bytes are still checked
        np = None
    index = VectorIndex()
    model: dict[str, tuple[int, VectorRecord]] = {}
    now, seq = 0, 0
    kept: list[tuple[VectorSet, tuple[str, ...], bytes]] = []
    for op, k, value in program:
        key = f"k{k}"
        if op in ("put", "put-none"):
            seq += 1
            rec = record(f"q{seq}", float(seq), float(k), expires=now + value) if op == "put" else None
            index.put(key, seq, rec)
            model.pop(key, None)
            if rec is not None:
                model[key] = (seq, rec)
        elif op == "remove":
            index.remove(key)
            model.pop(key, None)
        elif op == "evict":
            live = sorted(s for s, _ in model.values())
            floor = live[min(value, len(live)) - 1] + 1 if live and value <= len(live) else 0
            index.drop_below(floor)
            model = {kk: v for kk, v in model.items() if v[0] >= floor}
        else:
            now += value
        model = {kk: v for kk, v in model.items() if v[1].expires_ms > now}
        want = sorted(model.items(), key=lambda item: item[1][0])
        vs = index.snapshot(now)
        assert vs.keys == tuple(kk for kk, _ in want)
        assert vs.vectors == tuple(r.vector for _, (_, r) in want)
        assert vs.queries == tuple(r.query for _, (_, r) in want)
        if np is not None and len(vs):
            assert vs.matrix.tobytes() == b"".join(vs.vectors)
        kept.append((vs, tuple(vs.keys), b"".join(vs.vectors)))
    for vs, keys, raw in kept:  # a snapshot never changes after it was taken
        assert tuple(vs.keys) == keys and b"".join(vs.vectors) == raw
        if np is not None and len(vs):
            assert vs.matrix.tobytes() == raw


def test_rows_is_a_read_only_window_that_later_appends_do_not_change() -> None:
    items = ["a", "b", "c", "d"]
    window = Rows(items, 1, 3)
    items.append("e")
    assert len(window) == 2 and list(window) == ["b", "c"] and window == ("b", "c") and window != ("b",)
    assert window[0] == "b" and window[-1] == "c" and window[::-1] == ("c", "b")
    with pytest.raises(IndexError):
        window[2]
    with pytest.raises(IndexError):
        window[-3]
    assert window != "bc" and "c" in window and window.index("c") == 1
