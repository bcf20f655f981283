"""Plugin discovery through entry points, read once at start-up: adapters (group `strait.adapters`) and
the semantic cache's embedders (group `strait.embedders`)."""

from __future__ import annotations

from importlib.metadata import entry_points
from types import MappingProxyType
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:  # the policy's offline tools import this module: no upstream code at run time
    from gateway.cache.embedders import EmbedderFactory
    from gateway.contracts import AdapterFactory

ADAPTER_GROUP = "strait.adapters"
EMBEDDER_GROUP = "strait.embedders"


def discover_adapters() -> MappingProxyType[str, AdapterFactory]:
    """Adapter name -> factory, frozen. An installed distribution adds adapters by declaring
    `[project.entry-points."strait.adapters"] name = "module:factory"`."""
    found: dict[str, AdapterFactory] = {}
    for ep in entry_points(group=ADAPTER_GROUP):
        found[ep.name] = cast("AdapterFactory", ep.load())
    return MappingProxyType(found)


def embedder_kinds() -> frozenset[str]:
    """The embedder kinds installed, by name only (nothing is imported): what a policy's `kind` may say."""
    return frozenset(ep.name for ep in entry_points(group=EMBEDDER_GROUP))


def discover_embedders() -> MappingProxyType[str, EmbedderFactory]:
    """Embedder kind -> factory, frozen. A distribution adds a kind by declaring
    `[project.entry-points."strait.embedders"] name = "module:factory"`; the factory takes the policy's
    `EmbedderSpec` (and the environment, for `env:` keys) and returns an `Embedder`, which must pass the
    contract suite in tests/unit/cache/test_embedders.py."""
    found: dict[str, EmbedderFactory] = {}
    for ep in entry_points(group=EMBEDDER_GROUP):
        found[ep.name] = cast("EmbedderFactory", ep.load())
    return MappingProxyType(found)
