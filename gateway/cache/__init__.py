"""The response cache: an exact tier (a hash of the whole request inside a fail-closed namespace) and a
semantic tier (nearest neighbour of the last user message inside the same namespace, then a lexical veto).

This package's top level imports nothing heavy: `scope` and `veto` are pure Python, and numpy, onnxruntime
and tokenizers (the `cache` extra) are imported only by `match` and the embedders, when the semantic tier
is used, so the exact tier and the rest of the gateway run without them.
"""

from __future__ import annotations

from gateway.cache.errors import CacheDependencyError, EmbedderError

__all__ = ["CacheDependencyError", "EmbedderError"]
