"""The cache's own exceptions (no third-party imports, so anything may catch them)."""

from __future__ import annotations

EXTRA_HINT = "pip install 'strait-gateway[cache]'"


class CacheDependencyError(RuntimeError):
    """An optional dependency of the semantic tier is not installed: a start-up error naming the extra."""

    def __init__(self, module: str, *, what: str = "the semantic cache") -> None:
        self.module = module
        super().__init__(f"{what} needs the Python module {module!r}, which is not installed: {EXTRA_HINT}")


class EmbedderError(Exception):
    """An embedder could not produce vectors for this request (a remote backend down, slow, or answering
    garbage; a local model failing). The cache stage treats it as a miss, never as the client's error."""
