"""The embedders a running gateway holds: opened once per distinct spec and kept across policy reloads
(a local model loads once, a remote one keeps its connection pool), closed at shutdown."""

from __future__ import annotations

from collections.abc import Callable

from gateway.cache.embedders import Embedder, open_embedder
from gateway.cache.embedders.spec import EmbedderSpec
from gateway.policy.model import Backend, CacheEmbedder


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
