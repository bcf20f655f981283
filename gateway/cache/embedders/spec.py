"""How a policy names an embedder (the lead embeds `EmbedderSpec` in the policy's `cache:` section)."""

from __future__ import annotations

import re
from typing import Annotated

import msgspec

_ENV_REF = re.compile(r"^env:[A-Za-z_][A-Za-z0-9_]*$")


class EmbedderSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """One embedder the semantic tier may use. Checked when the policy is decoded (a bad spec is a policy
    error, not a first-request one).

    `local`: a model packaged on PyPI and run in process (`model`: a name from
    gateway.cache.embedders.local.MODELS; None is the default model). `remote`: an OpenAI-compatible
    embeddings API; `base_url` ends where the OpenAI SDK's does (`https://host/v1`; Strait POSTs
    `{base_url}/embeddings`), `model` is sent as the request's model.
    """

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    # `local` or `remote` (shipped), or any kind an installed plugin registers (entry points
    # `strait.embedders`); the checks below are the shipped kinds' own.
    kind: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] = "local"
    model: str | None = None
    base_url: str | None = None
    # Only `env:NAME`; the secret itself never appears in a policy file.
    api_key: str | None = None
    # Cosine similarity at or above which a candidate may be served; None: the local model's measured
    # default (required for a remote embedder: see loadtest/cache_eval.py to measure one).
    threshold: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    timeout_s: Annotated[float, msgspec.Meta(gt=0.0, le=120.0)] = 5.0
    # Remote only: the vector size the backend must answer with (checked on every answer); None: learnt
    # from the first answer and then enforced.
    dims: Annotated[int, msgspec.Meta(ge=1, le=16384)] | None = None

    def __post_init__(self) -> None:
        if self.api_key is not None and not _ENV_REF.match(self.api_key):
            # Never echo the value: it may be the secret itself.
            raise ValueError(f"embedder {self.name!r}: api_key must be an env:NAME reference, never the secret itself")
        if self.kind == "remote":
            if not self.base_url or not self.base_url.startswith(("http://", "https://")):
                raise ValueError(f"embedder {self.name!r}: a remote embedder needs base_url (http:// or https://)")
            if not self.model:
                raise ValueError(f"embedder {self.name!r}: a remote embedder needs model")
            if self.threshold is None:
                # Cosine scales differ between models (e5-small scores unrelated prompts ~0.92): a default
                # measured on the local model could serve almost anything from another one.
                raise ValueError(f"embedder {self.name!r}: a remote embedder needs a threshold measured for its model")
        elif self.kind == "local" and (self.base_url is not None or self.api_key is not None or self.dims is not None):
            raise ValueError(f"embedder {self.name!r}: base_url, api_key and dims are for remote embedders")
