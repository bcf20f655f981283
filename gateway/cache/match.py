"""The semantic tier's decision: the nearest cached question inside one namespace, served only above the
threshold and only if the veto has no objection. numpy is imported here, not at the package's top."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec

from gateway.cache.veto import DEFAULT_RULES, Analysed, veto

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

# Candidates above the threshold the veto looks at, best first: a vetoed best candidate may hide a good
# second one (the same question cached in other words), but each look costs a few microseconds.
VETO_CANDIDATES = 4


class Match(msgspec.Struct, frozen=True, kw_only=True):
    """The decision for one lookup. `index` is the served row (None: a miss); `similarity` the best
    candidate's cosine; `vetoed` the veto's reason when every candidate above the threshold was refused."""

    index: int | None
    similarity: float
    vetoed: str | None = None


def best_match(query_vec: npt.NDArray[np.float32], matrix: npt.NDArray[np.float32]) -> tuple[int, float] | None:
    """Top-1 cosine over L2-normalised rows (a dot product), or None for an empty matrix."""
    if matrix.shape[0] == 0:
        return None
    sims = matrix @ query_vec
    i = int(sims.argmax())
    return i, float(sims[i])


def decide(
    query_text: str,
    query_vec: npt.NDArray[np.float32],
    candidates_texts: Sequence[str],
    matrix: npt.NDArray[np.float32],
    threshold: float,
    *,
    rules: tuple[str, ...] = DEFAULT_RULES,
) -> Match | None:
    """None when nothing is cached or nothing reaches the threshold; else a Match, served (`index` set) or
    vetoed (`vetoed` set, for metrics). `rules=()` is cosine only."""
    import numpy as np

    if matrix.shape[0] == 0:
        return None
    if matrix.shape[0] != len(candidates_texts):
        raise ValueError(f"{matrix.shape[0]} vectors for {len(candidates_texts)} cached questions")
    sims = matrix @ query_vec
    above = np.flatnonzero(sims >= threshold)
    if above.size == 0:
        return None
    if above.size > VETO_CANDIDATES:  # only the best few are read: select them, do not sort them all
        above = above[np.argpartition(-sims[above], VETO_CANDIDATES - 1)[:VETO_CANDIDATES]]
    order = above[np.argsort(-sims[above], kind="stable")]
    best = float(sims[order[0]])
    first_reason: str | None = None
    query = Analysed(query_text) if rules else query_text
    for i in order:
        reason = veto(query, candidates_texts[int(i)], rules) if rules else None
        if reason is None:
            return Match(index=int(i), similarity=float(sims[i]))
        first_reason = first_reason or reason
    return Match(index=None, similarity=best, vetoed=first_reason)
