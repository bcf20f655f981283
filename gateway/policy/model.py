"""The policy model: what platform teams write in `policies/*.yaml`, decoded once into frozen Structs.

Every Struct forbids unknown keys so a typo is an error with a file and line, not a silently ignored
setting. Later issues grow these Structs (compliance, limits, budgets, cache); keep new fields optional
with safe defaults so older files stay valid.
"""

from __future__ import annotations

from typing import Literal

import msgspec

Tier = Literal["edge", "self-hosted", "provider"]
Capability = Literal["chat", "completions", "tools", "vision", "json", "embeddings"]


class _Base(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class Price(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """USD per million tokens; for own hardware, the amortised cost."""

    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0
    cached_input_per_mtok: float | None = None


class Timeouts(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    connect_s: float = 5.0
    # Time allowed between two reads from the upstream (first byte included).
    read_s: float = 120.0


class Hosting(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Where and by whom a backend is run: a different fact from who built the model it serves."""

    operator: str | None = None
    region: str | None = None
    jurisdiction: str | None = None
    retention_days: int | None = None
    trains_on_data: bool = False
    certifications: tuple[str, ...] = ()


class SimulatedOptions(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Behaviour of the in-process `simulated` adapter (demos, tests, load tests)."""

    ttft_ms: float = 40.0
    tokens_per_second: float = 200.0
    output_tokens: int = 48
    failure_rate: float = 0.0
    failure_status: int = 503
    embedding_dims: int = 64
    # Tokens per SSE chunk; a few per event, as real engines send.
    chunk_tokens: int = 4


class Backend(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    name: str
    adapter: str
    base_url: str | None = None
    # Only `env:NAME`; the secret itself never appears in a policy file.
    api_key: str | None = None
    tier: Tier = "provider"
    hosting: Hosting = Hosting()
    timeouts: Timeouts = Timeouts()
    max_connections: int = 256
    simulated: SimulatedOptions | None = None


class Deployment(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    backend: str
    upstream_model: str
    price: Price = Price()


class Origin(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Who built the weights (developer and country)."""

    developer: str | None = None
    country: str | None = None


class Model(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    name: str
    deployments: tuple[Deployment, ...]
    capabilities: tuple[Capability, ...] = ("chat", "completions")
    context_window: int | None = None
    origin: Origin | None = None
    licence: str | None = None
    # tiktoken encoding used to count this model's tokens when the upstream gives no usage.
    tokenizer: str = "o200k_base"


class Route(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """A name clients send as `model`; its candidate models are tried in order."""

    name: str
    models: tuple[str, ...]
    description: str | None = None
    # Upper bound on upstream attempts (first try + fallbacks) before an error goes back to the client.
    max_attempts: int = 3


class TenantKey(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    id: str
    # `sha256:<hex>` of the key, produced by `strait keys hash`; plain keys never appear in a file.
    digest: str


class Tenant(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    name: str
    keys: tuple[TenantKey, ...] = ()
    # Route names this tenant may use; "*" means every route.
    allowed_routes: tuple[str, ...] = ("*",)


class Server(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    # Requests with a larger body are refused with 413 before the body is read whole.
    max_body_bytes: int = 4 * 1024 * 1024


class PolicySet(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    version: Literal[1] = 1
    server: Server = Server()
    backends: tuple[Backend, ...] = ()
    models: tuple[Model, ...] = ()
    routes: tuple[Route, ...] = ()
    tenants: tuple[Tenant, ...] = ()
