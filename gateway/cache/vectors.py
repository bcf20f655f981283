"""A namespace's searchable entries in process: `VectorSet` (an immutable snapshot handed to the
matcher) and `VectorIndex` (what this process knows of one namespace, kept in step with the store).

numpy is not imported here at module level: the exact tier runs without it. A `VectorSet` holds each
entry's raw float32 bytes; its `matrix` (n, dims) is built on first use, importing numpy then.
"""

from __future__ import annotations

from typing import Any

from gateway.cache.entry import VectorRecord


class VectorSet:
    """Rows i = (keys[i], queries[i], vectors[i]) of one namespace, none expired when it was taken.

    Every row has `dims` float32 values (rows of another width were left out when the set was built:
    a namespace has one embedder, so a different width can only be garbage).
    """

    __slots__ = ("_matrix", "dims", "expires", "keys", "queries", "vectors")

    def __init__(
        self,
        keys: tuple[str, ...] = (),
        queries: tuple[str, ...] = (),
        vectors: tuple[bytes, ...] = (),
        expires: tuple[int, ...] = (),
    ) -> None:
        self.keys = keys
        self.queries = queries
        self.vectors = vectors
        self.expires = expires  # absolute expiry per row (epoch ms)
        self.dims = len(vectors[0]) // 4 if vectors else 0
        self._matrix: Any = None

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def matrix(self) -> Any:
        """numpy.ndarray (n, dims) float32, one row per entry (typed Any so this module type-checks and
        imports without numpy; the import happens here, on the semantic path only). Built once."""
        if self._matrix is None:
            import numpy as np  # type: ignore[import-not-found,unused-ignore]  # optional: the `cache` extra

            if not self.vectors:
                self._matrix = np.zeros((0, 0), dtype=np.float32)
            else:
                flat = np.frombuffer(b"".join(self.vectors), dtype="<f4")
                self._matrix = flat.reshape(len(self.vectors), self.dims).astype(np.float32, copy=False)
        return self._matrix


EMPTY = VectorSet()


class VectorIndex:
    """One namespace's rows as this process last saw them, plus where it is in the store's sequence.

    `born` names the namespace's current life in the store, `removed` counts deletions in that life;
    either changing means this copy must be rebuilt from scratch. `seen` is the highest insertion
    sequence applied: the next sync fetches only rows after it. Expired rows leave at snapshot time
    by this process's clock.
    """

    __slots__ = ("_snapshot", "_snapshot_until", "born", "removed", "rows", "seen")

    def __init__(self) -> None:
        self.born = ""
        self.removed = ""
        self.seen = 0
        self.rows: dict[str, tuple[int, VectorRecord]] = {}  # key -> (sequence, record), in sequence order
        self._snapshot: VectorSet | None = None
        self._snapshot_until = 0  # the snapshot is valid until this time (its earliest expiry)

    def reset(self, born: str, removed: str) -> None:
        self.born, self.removed, self.seen = born, removed, 0
        self.rows = {}
        self._snapshot = None

    def put(self, key: str, seq: int, record: VectorRecord | None) -> None:
        """Row `key` now has insertion sequence `seq` (an overwrite moves it to the end); None: the
        entry has no vector (exact tier only), so no row."""
        self.rows.pop(key, None)
        if record is not None:
            self.rows[key] = (seq, record)
        self.seen = max(self.seen, seq)
        self._snapshot = None

    def remove(self, key: str) -> None:
        if self.rows.pop(key, None) is not None:
            self._snapshot = None

    def drop_below(self, floor: int) -> None:
        """Every entry with a sequence below `floor` was evicted (eviction goes oldest first)."""
        if floor <= 0 or not self.rows:
            return
        stale = [key for key, (seq, _) in self.rows.items() if seq < floor]
        for key in stale:
            del self.rows[key]
        if stale:
            self._snapshot = None

    def snapshot(self, now_ms: int) -> VectorSet:
        if self._snapshot is not None and now_ms < self._snapshot_until:
            return self._snapshot
        expired = [key for key, (_, record) in self.rows.items() if record.expires_ms <= now_ms]
        for key in expired:
            del self.rows[key]
        keys: list[str] = []
        queries: list[str] = []
        vectors: list[bytes] = []
        expires: list[int] = []
        width = 0
        for key, (_, record) in self.rows.items():
            width = width or len(record.vector)
            if len(record.vector) != width:
                continue
            keys.append(key)
            queries.append(record.query)
            vectors.append(record.vector)
            expires.append(record.expires_ms)
        self._snapshot = VectorSet(tuple(keys), tuple(queries), tuple(vectors), tuple(expires))
        self._snapshot_until = min(expires, default=2**62)
        return self._snapshot
