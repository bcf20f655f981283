"""A namespace's searchable entries in process: `VectorSet` (an immutable snapshot handed to the
matcher) and `VectorIndex` (what this process knows of one namespace, kept in step with the store).

numpy is not imported here at module level: the exact tier runs without it. A `VectorSet` holds each
entry's raw float32 bytes; its `matrix` (n, dims) is built on first use, importing numpy then.

Cost of keeping up (a hot namespace changes between most lookups): the index keeps its rows in
insertion order in append-only lists over one growing numpy buffer. New rows are appended; the common
removals, eviction (oldest first) and expiry of the oldest (one TTL per namespace), drop a prefix by
moving a start offset; so a new snapshot costs copying the row references (C speed) and converting
only the new rows, and its matrix is a view of the buffer. Anything else (a delete, an overwrite, an
expiry out of order, a prefix grown past half the lists) rebuilds the lists once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, TypeVar, overload

from gateway.cache.entry import VectorRecord

_FAR = 2**62
T = TypeVar("T")


class Rows(Sequence[T]):
    """A read-only window [start, end) of an append-only list: a snapshot's column without copying it
    (the list only grows past `end`, so the window never changes). Compares equal to any sequence with
    the same items."""

    __slots__ = ("_end", "_items", "_start")

    def __init__(self, items: list[T], start: int = 0, end: int | None = None) -> None:
        self._items = items
        self._start = start
        self._end = len(items) if end is None else end

    def __len__(self) -> int:
        return self._end - self._start

    @overload
    def __getitem__(self, i: int) -> T: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[T]: ...
    def __getitem__(self, i: int | slice) -> T | Sequence[T]:
        if isinstance(i, slice):
            return tuple(self._items[self._start : self._end][i])
        n = self._end - self._start
        if not -n <= i < n:
            raise IndexError("row index out of range")
        return self._items[self._start + (i % n)]

    def __iter__(self) -> Iterator[T]:
        items = self._items
        for i in range(self._start, self._end):
            yield items[i]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=False))

    __hash__ = None  # type: ignore[assignment]  # a window onto a list: unhashable, like a list

    def __repr__(self) -> str:
        return f"Rows({list(self)!r})"


class _Rows:
    """Float32 rows, appended in order, in one buffer that grows by doubling (built on first use)."""

    __slots__ = ("_buf", "_filled", "dims", "vectors")

    def __init__(self, dims: int) -> None:
        self.dims = dims
        self.vectors: list[bytes] = []  # raw rows, shared with the index (appended only)
        self._buf: Any = None
        self._filled = 0

    def view(self, start: int, end: int) -> Any:
        import numpy as np  # type: ignore[import-not-found,unused-ignore]  # optional: the `cache` extra

        if self._buf is None or self._buf.shape[0] < end:
            grown = np.empty((max(end, 2 * self._filled, 64), self.dims), dtype=np.float32)
            if self._buf is not None:
                grown[: self._filled] = self._buf[: self._filled]
            self._buf = grown
        if self._filled < end:
            new = np.frombuffer(b"".join(self.vectors[self._filled : end]), dtype="<f4")
            self._buf[self._filled : end] = new.reshape(end - self._filled, self.dims)
            self._filled = end
        # Rows before `end` are never rewritten, so this view stays valid for its snapshot.
        return self._buf[start:end]


class VectorSet:
    """Rows i = (keys[i], queries[i], vectors[i]) of one namespace, none expired when it was taken.
    The columns are read-only sequences (windows onto the index's lists: taking a snapshot copies
    nothing).

    Every row has `dims` float32 values (rows of another width were left out when the set was built:
    a namespace has one embedder, so a different width can only be garbage).
    """

    __slots__ = ("_matrix", "_rows", "_span", "dims", "expires", "keys", "queries", "vectors")

    def __init__(
        self,
        keys: Sequence[str] = (),
        queries: Sequence[str] = (),
        vectors: Sequence[bytes] = (),
        expires: Sequence[int] = (),
        *,
        rows: _Rows | None = None,
        span: tuple[int, int] = (0, 0),
    ) -> None:
        self.keys = keys
        self.queries = queries
        self.vectors = vectors
        self.expires = expires  # absolute expiry per row (epoch ms)
        self.dims = len(vectors[0]) // 4 if vectors else 0
        self._rows = rows
        self._span = span
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
            elif self._rows is not None:
                self._matrix = self._rows.view(*self._span)
            else:
                flat = np.frombuffer(b"".join(self.vectors), dtype="<f4")
                self._matrix = flat.reshape(len(self.vectors), self.dims)
        return self._matrix


EMPTY = VectorSet()


class VectorIndex:
    """One namespace's rows as this process last saw them, plus where it is in the store's sequence.

    `born` names the namespace's current life in the store, `removed` counts deletions in that life;
    either changing means this copy must be rebuilt from scratch. `seen` is the highest insertion
    sequence applied: the next sync fetches only rows after it. Expired rows leave at snapshot time
    by this process's clock.
    """

    __slots__ = (
        "_expires",
        "_keys",
        "_next_expiry",
        "_queries",
        "_rows",
        "_seqs",
        "_snapshot",
        "_stale",
        "_start",
        "born",
        "removed",
        "rows",
        "seen",
    )

    def __init__(self) -> None:
        self.born = ""
        self.removed = ""
        self.seen = 0
        self.rows: dict[str, tuple[int, VectorRecord]] = {}  # key -> (sequence, record)
        self._clear_lists()

    def _clear_lists(self) -> None:
        # The snapshot's order: positions [_start, len) of these lists are the live rows, by sequence.
        self._keys: list[str] = []
        self._queries: list[str] = []
        self._expires: list[int] = []
        self._seqs: list[int] = []
        self._rows: _Rows | None = None
        self._start = 0
        self._next_expiry = _FAR
        self._stale = False  # the lists no longer match `rows` (rebuild before the next snapshot)
        self._snapshot: VectorSet | None = None

    def reset(self, born: str, removed: str) -> None:
        self.born, self.removed, self.seen = born, removed, 0
        self.rows = {}
        self._clear_lists()

    def put(self, key: str, seq: int, record: VectorRecord | None) -> None:
        """Row `key` now has insertion sequence `seq` (an overwrite moves it to the end); None: the
        entry has no vector (exact tier only), so no row."""
        self.seen = max(self.seen, seq)
        if self.rows.pop(key, None) is not None:
            self._stale = True  # an overwrite: the old row sits somewhere in the lists
        if record is None:
            self._snapshot = None if self._stale else self._snapshot
            return
        self.rows[key] = (seq, record)
        self._snapshot = None
        if self._stale:
            return
        if self._rows is None:
            self._rows = _Rows(len(record.vector) // 4)
        if len(record.vector) != self._rows.dims * 4 or (self._seqs and seq < self._seqs[-1]):
            self._stale = True  # out of order or another width: rebuilt (and filtered) once
            return
        self._keys.append(key)
        self._queries.append(record.query)
        self._rows.vectors.append(record.vector)
        self._expires.append(record.expires_ms)
        self._seqs.append(seq)
        self._next_expiry = min(self._next_expiry, record.expires_ms)

    def remove(self, key: str) -> None:
        if self.rows.pop(key, None) is None:
            return
        self._snapshot = None
        if not self._stale and self._start < len(self._keys) and self._keys[self._start] == key:
            self._start += 1
        else:
            self._stale = True

    def drop_below(self, floor: int) -> None:
        """Every entry with a sequence below `floor` was evicted (eviction goes oldest first)."""
        if floor <= 0 or not self.rows:
            return
        if self._stale:
            for key in [key for key, (seq, _) in self.rows.items() if seq < floor]:
                del self.rows[key]
            return
        # The lists hold the rows in sequence order: the evicted ones are a prefix (usually none).
        while self._start < len(self._seqs) and self._seqs[self._start] < floor:
            del self.rows[self._keys[self._start]]
            self._start += 1
            self._snapshot = None

    def snapshot(self, now_ms: int) -> VectorSet:
        if now_ms >= self._next_expiry:
            self._expire(now_ms)
        if self._stale or (self._start > 1024 and self._start * 2 > len(self._keys)):
            self._rebuild()
        if self._snapshot is None:
            start, end = self._start, len(self._keys)
            self._snapshot = VectorSet(
                Rows(self._keys, start, end),
                Rows(self._queries, start, end),
                Rows(self._rows.vectors, start, end) if self._rows is not None else (),
                Rows(self._expires, start, end),
                rows=self._rows,
                span=(start, end),
            )
        return self._snapshot

    def _expire(self, now_ms: int) -> None:
        if not self._stale:
            # The oldest first (one TTL per namespace: the usual case) ...
            while self._start < len(self._expires) and self._expires[self._start] <= now_ms:
                del self.rows[self._keys[self._start]]
                self._start += 1
                self._snapshot = None
            following = min(self._expires[self._start :], default=_FAR)
            if following > now_ms:
                self._next_expiry = following
                return
        # ... else (a TTL the policy changed, or the lists are being rebuilt anyway) a scan.
        expired = [key for key, (_, record) in self.rows.items() if record.expires_ms <= now_ms]
        for key in expired:
            del self.rows[key]
        if expired:
            self._stale = True
            self._snapshot = None
        self._next_expiry = min((r.expires_ms for _, r in self.rows.values()), default=_FAR)

    def _rebuild(self) -> None:
        rows = sorted(self.rows.items(), key=lambda item: item[1][0])
        self._clear_lists()
        width = len(rows[0][1][1].vector) if rows else 0
        for key, (seq, record) in rows:
            if len(record.vector) != width:
                continue
            if self._rows is None:
                self._rows = _Rows(width // 4)
            self._keys.append(key)
            self._queries.append(record.query)
            self._rows.vectors.append(record.vector)
            self._expires.append(record.expires_ms)
            self._seqs.append(seq)
        self._next_expiry = min((r.expires_ms for _, (_, r) in rows), default=_FAR)
