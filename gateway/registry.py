"""Plugin discovery through entry points (group `strait.adapters`), read once at start-up."""

from __future__ import annotations

from importlib.metadata import entry_points
from types import MappingProxyType
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:  # the policy's offline tools import this module: no upstream code at run time
    from gateway.contracts import AdapterFactory

ADAPTER_GROUP = "strait.adapters"


def discover_adapters() -> MappingProxyType[str, AdapterFactory]:
    """Adapter name -> factory, frozen. An installed distribution adds adapters by declaring
    `[project.entry-points."strait.adapters"] name = "module:factory"`."""
    found: dict[str, AdapterFactory] = {}
    for ep in entry_points(group=ADAPTER_GROUP):
        found[ep.name] = cast("AdapterFactory", ep.load())
    return MappingProxyType(found)
