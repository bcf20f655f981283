"""How a policy names an embedder (the lead embeds `EmbedderSpec` in the policy's `cache:` section)."""

from __future__ import annotations

from typing import Literal

import msgspec


class EmbedderSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """One embedder the semantic tier may use.

    `local`: a model packaged on PyPI and run in process (`model`: a name from
    gateway.cache.embedders.local.MODELS; None is the default model). `remote`: an OpenAI-compatible
    embeddings API; `base_url` ends where the OpenAI SDK's does (`https://host/v1`; Strait POSTs
    `{base_url}/embeddings`), `model` is sent as the request's model.
    """

    name: str
    kind: Literal["local", "remote"] = "local"
    model: str | None = None
    base_url: str | None = None
    # Only `env:NAME`; the secret itself never appears in a policy file.
    api_key: str | None = None
    # Cosine similarity at or above which a candidate may be served; None: the embedder's measured default.
    threshold: float | None = None
    timeout_s: float = 5.0
    # Remote only: the vector size the backend must answer with (checked on every answer); None: learnt
    # from the first answer and then enforced.
    dims: int | None = None
