"""Embedders: what turns the last user message into a vector for the semantic tier.

One Protocol, two kinds: `local` (a packaged ONNX model in process, gateway/cache/embedders/local.py) and
`remote` (an OpenAI-compatible embeddings API, remote.py). Both are imported only by `open_embedder`, so
importing this package needs neither numpy nor onnxruntime nor aiohttp's client.

`DEFAULT_LOCAL_MODEL` and `DEFAULT_THRESHOLD` are what loadtest/cache_eval.py measured best on the fow-cache
benchmark (docs/cache.md): the policy uses them when an embedder spec leaves them out.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from gateway.cache.embedders.spec import EmbedderSpec
from gateway.cache.errors import CacheDependencyError, EmbedderError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "DEFAULT_LOCAL_MODEL",
    "DEFAULT_THRESHOLD",
    "CacheDependencyError",
    "Embedder",
    "EmbedderError",
    "EmbedderFactory",
    "EmbedderSpec",
    "open_embedder",
    "tag_of",
    "threshold_of",
]

# The local model and the cosine threshold chosen by measurement (docs/cache.md).
DEFAULT_LOCAL_MODEL = "minilm-l6-int8"
DEFAULT_THRESHOLD = 0.92
# Per local model: its measured default threshold (cosine scales differ between models).
LOCAL_THRESHOLDS: dict[str, float] = {"minilm-l6-int8": DEFAULT_THRESHOLD}


class Embedder(Protocol):
    """Texts in, one L2-normalised float32 row per text out. `tag_of(e)` names its vector space and goes into
    the cache namespace, so vectors of two models (or two versions) are never compared."""

    id: str
    version: str
    dims: int

    async def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """(len(texts), dims) float32, each row of norm 1. Raises EmbedderError (a miss for the stage)."""
        ...

    async def warm(self) -> None:
        """Get ready off the event loop (load a local model) so the first lookup does not pay for it."""
        ...

    async def aclose(self) -> None: ...


def tag_of(embedder: Embedder) -> str:
    return f"{embedder.id}@{embedder.version}"


def threshold_of(spec: EmbedderSpec) -> float:
    """The spec's threshold, else the measured default of its local model (a remote spec always has one)."""
    if spec.threshold is not None:
        return spec.threshold
    return LOCAL_THRESHOLDS.get(spec.model or DEFAULT_LOCAL_MODEL, DEFAULT_THRESHOLD)


class EmbedderFactory(Protocol):
    """Entry point `strait.embedders`: builds one kind of embedder from the policy's spec."""

    def __call__(self, spec: EmbedderSpec, environ: Mapping[str, str]) -> Embedder: ...


def open_embedder(
    spec: EmbedderSpec,
    *,
    environ: Mapping[str, str] | None = None,
    factories: Mapping[str, EmbedderFactory] | None = None,
) -> Embedder:
    """Build the embedder a policy names, by its kind's plugin (`local` and `remote` ship with Strait).
    Raises CacheDependencyError (naming the `cache` extra) when its dependencies are missing, ValueError
    when the spec is unusable or its kind is not installed."""
    if factories is None:
        from gateway.registry import discover_embedders

        factories = discover_embedders()
    factory = factories.get(spec.kind)
    if factory is None:
        raise ValueError(
            f"embedder {spec.name!r}: unknown kind {spec.kind!r} (installed: {', '.join(sorted(factories))})"
        )
    return factory(spec, os.environ if environ is None else environ)
