"""The policy model: what platform teams write in `policies/*.yaml`, decoded once into frozen Structs.

Every Struct forbids unknown keys so a typo is an error with a file and line, not a silently ignored
setting. Later issues grow these Structs (compliance, limits, budgets, cache); keep new fields optional
with safe defaults so older files stay valid.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

Tier = Literal["edge", "self-hosted", "provider"]
Capability = Literal["chat", "completions", "tools", "vision", "json", "embeddings"]
# What a deployment's serving engine can do beyond the model's capabilities: `prefill` continues a final
# assistant message (llama.cpp's server; vLLM with `continue_final_message`; Anthropic): the target of
# a route's `resume: continue`. `responses`: the upstream serves OpenAI's Responses API too (OpenAI, vLLM):
# the `openai` adapter passes a Responses client's request through to it (read from the backend's list).
ServingCapability = Literal["prefill", "responses"]


class _Base(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


# A rate in USD per million tokens, or a fee in USD per request: never negative, bounded so that a cost
# stays an exact integer of micro-USD (gateway.policy.rates) far below the state store's exact range.
PriceUsd = Annotated[float, msgspec.Meta(ge=0, le=1_000_000)]


class Price(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """A deployment's rate card: USD per million tokens of each kind, and a fee per request; for own
    hardware, the amortised cost. How a usage record is priced: gateway.policy.rates.

    A deployment of a backend other than `simulated` whose price is all zero (or omitted) is *unpriced*:
    a warning at load, a log line and `strait_deployment_unpriced` = 1 (never silently $0), unless it
    says `free: true` (free on purpose: own hardware not charged back, a free tier)."""

    # Prompt tokens read neither from nor into the provider's prompt cache.
    input_per_mtok: PriceUsd = 0.0
    output_per_mtok: PriceUsd = 0.0
    # Prompt tokens read from the provider's prompt cache. None: the input price.
    cached_input_per_mtok: PriceUsd | None = None
    # Prompt tokens written to the provider's prompt cache (Anthropic's cache_creation_input_tokens;
    # Anthropic charges 1.25x input for a 5-minute write, 2x for 1 hour: state it). None: the input price.
    cache_write_per_mtok: PriceUsd | None = None
    # Reasoning (thinking) tokens, a part of the completion tokens. None: the output price.
    reasoning_per_mtok: PriceUsd | None = None
    # USD per request that reached this deployment (a per-call fee, a search), charged with its tokens.
    per_request: PriceUsd = 0.0
    # Zero on purpose: no unpriced warning. Every rate must then be zero.
    free: bool = False


class Timeouts(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    connect_s: float = 5.0
    # Time allowed between two reads from the upstream (first byte included).
    read_s: float = 120.0


class UpstreamLimits(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """How much of an upstream's answer Strait reads (`server.upstream` for every backend; a backend's
    own `limits` replace it for that backend)."""

    # Largest answer body (JSON or error, after decompression): the read stops there, the connection is
    # dropped and the client gets 502 `upstream_response_too_large`. Never buffered whole first.
    max_body_bytes: int = 16 * 1024 * 1024
    # Longest SSE line or event of a stream: past it the stream fails (error event
    # `upstream_event_too_large`, no [DONE]), the connection is aborted, what was produced is charged.
    max_event_bytes: int = 1024 * 1024


class Hosting(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Where and by whom a backend is run: a different fact from who built the model it serves.
    Every attribute left out is unknown, and an unknown attribute fails closed (policies/README.md §4)."""

    # The name of an entry of the top-level `operators` list (who runs it, headquartered where).
    operator: str | None = None
    # Where it runs, in the operator's or the gateway's terms (`eu-west`): compared with the ingress
    # region of the replica a request entered through, for a route's `prefer: ingress_region`.
    region: str | None = None
    # Where the tokens are computed: an ISO country code or a bloc (EU, EEA, one of the policy's `blocs`).
    jurisdiction: str | None = None
    retention_days: int | None = None
    # None: not declared, which a `no_training` tenant treats as "it may train".
    trains_on_data: bool | None = None
    certifications: tuple[str, ...] = ()


class Hardware(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """What a backend runs on; rules and routes may select and prefer by it, explain shows it."""

    # The accelerator's name as the policy's rules name it: H100, H200, MI300X, L4, TPU-v5e, LPU...
    chip: str | None = None
    count: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None
    # Memory per chip, in GB.
    memory_gb: Annotated[float, msgspec.Meta(gt=0, le=1_000_000)] | None = None

    def describe(self) -> str:
        """`8x H100 80GB`, with what is unknown left out (explain's `hardware` column)."""
        parts = [f"{self.count}x" if self.count else "", self.chip or "unknown chip"]
        if self.memory_gb:
            parts.append(f"{self.memory_gb:g}GB")
        return " ".join(p for p in parts if p)


class Capacity(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """How much a backend can take. Utilisation is the engine's own gauge (KV-cache use, or running /
    max_concurrency) when its metrics are scraped and fresh, else in-flight / max_concurrency."""

    max_concurrency: int | None = None
    # committed: reserved or owned capacity, already paid for; on-demand: paid per token.
    commitment: Literal["committed", "on-demand"] = "on-demand"
    # The engine's Prometheus page (vLLM, SGLang, TGI, llama.cpp), scraped off the request path. The
    # `simulated` adapter serves its own in process: it needs no URL.
    metrics_url: str | None = None
    # None: recognised from the metric names on the page.
    metrics_format: Literal["vllm", "sglang", "tgi", "llamacpp"] | None = None
    # How often the page is fetched, how long a fetch may take, and how old the last good scrape may be
    # before routing falls back to in-flight counting (flagged `stale` in explain). None: the timeout is
    # the interval (at most 1 s); stale after 3 intervals.
    scrape_interval_s: Annotated[float, msgspec.Meta(ge=0.05, le=3600)] = 2.0
    scrape_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=60)] | None = None
    stale_after_s: Annotated[float, msgspec.Meta(gt=0, le=86_400)] | None = None

    def scrape_timeout(self) -> float:
        return self.scrape_timeout_s if self.scrape_timeout_s is not None else min(1.0, self.scrape_interval_s)


ProbeKind = Literal["auto", "health", "models", "metrics", "none"]


class OutlierPolicy(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """When a backend is taken out of routing (ejected) and how it comes back (Envoy's outlier detection,
    for LLM backends). A failure is an attempt that failed: 5xx, a timeout, a connection reset or refused
    (a 429 is the retry policy's business, not a sign of a broken engine). Defaults: policies/README.md."""

    # Eject after this many failures in a row (0: never for consecutive failures).
    consecutive_failures: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 5
    # Or when failures / attempts over the last `window_s` reach this ratio, once at least
    # `min_requests` attempts were seen in the window (0: never for the ratio).
    error_ratio: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.5
    min_requests: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 20
    window_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    # The n-th ejection in a row lasts base x n seconds, never more than max (Envoy: 30 s x n).
    base_ejection_s: Annotated[float, msgspec.Meta(gt=0, le=86_400)] = 30.0
    max_ejection_s: Annotated[float, msgspec.Meta(gt=0, le=86_400)] = 300.0
    # At most this share of the policy's backends is ejected at once (at least one always may be).
    max_ejected_share: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.5
    # Half-open probe when an ejection ends, before traffic is let back: a free request only (never a
    # completion). auto: `metrics` when metrics_url is set, else `models` for a provider, `health` otherwise.
    # none: traffic comes back when the period ends (the next request is the probe).
    probe: ProbeKind = "auto"
    probe_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 2.0
    # Also probe while healthy, every so many seconds (active health checking; a failed probe counts as
    # a failure). None: only ejected backends are probed.
    active_interval_s: Annotated[float, msgspec.Meta(ge=0.05, le=3600)] | None = None


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


class AnthropicOptions(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """The native `anthropic` adapter's options (plugins.anthropic_messages)."""

    # Anthropic requires `max_tokens`; an OpenAI client may leave it out. Sent when the client gave none.
    default_max_tokens: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 4096
    # The `anthropic-version` header: the API version whose wire format the adapter speaks.
    version: str = "2023-06-01"


class Backend(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    name: str
    adapter: str
    base_url: str | None = None
    # Only `env:NAME`; the secret itself never appears in a policy file.
    api_key: str | None = None
    tier: Tier = "provider"
    hosting: Hosting = Hosting()
    timeouts: Timeouts = Timeouts()
    # None: the server's `upstream` limits (filled in when the runtime is built).
    limits: UpstreamLimits | None = None
    max_connections: int = 256
    hardware: Hardware | None = None
    capacity: Capacity = Capacity()
    simulated: SimulatedOptions | None = None
    anthropic: AnthropicOptions | None = None
    outlier: OutlierPolicy = OutlierPolicy()
    # For every deployment on this backend (a deployment may add its own).
    capabilities: tuple[ServingCapability, ...] = ()


class Deployment(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    backend: str
    upstream_model: str
    price: Price = Price()
    # Added to its backend's `capabilities`.
    capabilities: tuple[ServingCapability, ...] = ()


class Origin(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Who built the weights (developer and country)."""

    developer: str | None = None
    country: str | None = None


class Operator(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Who runs backends, as an entity (`operators:`): its headquarters country and the entity it belongs
    to. "Alibaba Cloud" with `parent: Alibaba` is Alibaba's own service, for origin rules that refuse a
    model's developer's service, and is headquartered wherever its parents are too, for compliance."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    # ISO 3166 country code of its headquarters. None: unknown (fails closed).
    headquarters: Annotated[str, msgspec.Meta(min_length=2, max_length=3)] | None = None
    # Another operator's name, or a model developer's (an entity that runs nothing itself).
    parent: str | None = None


class Bloc(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """A named set of places (`blocs:`): countries and other blocs, contained in it. EU and EEA are
    built in; a policy adds its own (FIVE_EYES) and may name them wherever a country may be named."""

    name: Annotated[str, msgspec.Meta(min_length=2, max_length=32, pattern="^[A-Za-z][A-Za-z0-9_-]*$")]
    members: Annotated[tuple[str, ...], msgspec.Meta(min_length=1, max_length=512)]


class Licence(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """The model's licence, as far as Strait acts on it: its name and whether its outputs may be used to
    train other models (captured answers in a dataset export: gateway.capture). A bare string in the
    policy (`licence: apache-2.0`) is a Licence with that name and `outputs_train` unknown."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    # Whether the licence lets this model's outputs train *other* models. None (unknown) is treated as
    # "no" wherever it matters (fail-closed, like every compliance attribute).
    outputs_train: bool | None = None


class Model(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    name: str
    deployments: tuple[Deployment, ...]
    capabilities: tuple[Capability, ...] = ("chat", "completions")
    context_window: int | None = None
    # Who built the weights. None: the `base_model`'s origin (a fine-tune of it), else unknown.
    origin: Origin | None = None
    # The model this one was fine-tuned from (a model of this policy): its origin is inherited unless
    # this model declares its own.
    base_model: str | None = None
    # `licence: apache-2.0`, or `licence: {name: apache-2.0, outputs_train: true}` (see Licence).
    licence: str | Licence | None = None
    # tiktoken encoding used to count this model's tokens when the upstream gives no usage.
    tokenizer: str = "o200k_base"

    @property
    def licence_terms(self) -> Licence | None:
        """`licence` as a Licence whichever way it was written (None: not declared)."""
        return Licence(name=self.licence) if isinstance(self.licence, str) else self.licence


Similarity = Annotated[float, msgspec.Meta(gt=0, le=1)]
Share = Annotated[float, msgspec.Meta(ge=0, le=1)]
Positive = Annotated[int, msgspec.Meta(ge=1)]


class CacheEmbedder(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """An embedder the semantic tier may use (`cache.embedders`). `local`: a model packaged with the
    `cache` extra, run in process on one thread; `remote`: any OpenAI-compatible `/v1/embeddings`
    (`base_url` with `api_key: env:NAME`, or `backend`: a backend of this policy)."""

    name: str
    # `local`, `remote`, or a kind an installed plugin registers (entry points `strait.embedders`).
    kind: str = "local"
    # local: which packaged model (None: the default); remote: the upstream model name.
    model: str | None = None
    base_url: str | None = None
    backend: str | None = None
    api_key: str | None = None
    # Cosine similarity at or above which a neighbour may be served (after the veto); calibrated per
    # embedder (docs/cache.md). None: the embedder's measured default.
    threshold: Similarity | None = None
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 5.0
    dims: Positive | None = None


class CacheConfig(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """The top-level `cache` section: the embedders tenants may name."""

    embedders: tuple[CacheEmbedder, ...] = ()
    # How far bad-hit reports may raise a namespace's threshold, and by how much each report does.
    feedback_step: Annotated[float, msgspec.Meta(ge=0, le=0.1)] = 0.01
    feedback_max_raise: Annotated[float, msgspec.Meta(ge=0, le=0.5)] = 0.04
    # The most a semantic lookup may wait for its embedding (the model runs one text at a time); past
    # it the lookup is a miss, counted as `timeout`.
    semantic_timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 250


class RouteCache(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """What a route allows of the cache (a tenant opts in; the route sets the bounds and may forbid)."""

    allowed: bool = True
    ttl_s: Positive = 3600
    # Per namespace (tenant x route x deployment x answer-changing parameters): oldest evicted first.
    max_entries: Positive = 10_000
    max_bytes: Positive = 64 * 1024 * 1024
    # Only deterministic requests (temperature 0, or unset) unless this allows more.
    max_temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] = 0.0
    # Whether answers to requests with tools, and with a response_format, may be cached.
    tools: bool = False
    response_format: bool = True
    # Whether answers cut by max_tokens (finish_reason `length`) may be stored.
    truncated: bool = False
    # A hit is charged this share of what the answer cost when it was made (0: hits are free).
    hit_price: Share = 0.0
    # Part of every namespace of the route: bump it to retire every entry at once (a new prompt or model).
    generation: Annotated[int, msgspec.Meta(ge=0)] = 0


class CacheSettings(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """A tenant's opt-in. It can only tighten what the route allows (a shorter TTL, a higher threshold)."""

    exact: bool = False
    semantic: bool = False
    # Older files: `enabled: true` means the exact tier.
    enabled: bool = False
    # Routes the tenant caches on; "*": every route that allows it.
    routes: tuple[str, ...] = ("*",)
    # Who shares entries: the whole tenant, each API key, or each end user (the request's `user` field;
    # a request without one is not cached).
    partition: Literal["tenant", "key", "user"] = "tenant"
    # An embedder of `cache.embedders` (None: the first one, or the packaged default when none is named).
    embedder: str | None = None
    threshold: Similarity | None = None
    ttl_s: Positive | None = None


# What a capture record may hold (a tenant's `capture.include`): the request's messages, the answer's
# text, the tool calls (the request's tools and tool messages, the answer's calls).
CaptureInclude = Literal["prompts", "completions", "tool_calls"]
CAPTURE_INCLUDE: Final[tuple[CaptureInclude, ...]] = ("prompts", "completions", "tool_calls")
# The built-in pattern redactor's kinds (gateway.capture.redact); a plugin redactor adds its own name.
BUILTIN_REDACTIONS: Final[tuple[str, ...]] = ("email", "phone", "card", "iban", "api_key", "ip")
RedactorName = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern="^[a-z][a-z0-9_.-]*$")]


class CaptureSettings(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """A tenant's consent to data capture (README "The learning loop"): off unless `enabled`. A request
    may opt out (`x-strait-capture: off`), never in beyond this."""

    enabled: bool = False
    # The share of the tenant's answered requests captured (decided per request, at random).
    sample_rate: Share = 1.0
    include: tuple[CaptureInclude, ...] = CAPTURE_INCLUDE
    # Records older than this are deleted (checked periodically by the capture writer).
    retention_days: Annotated[int, msgspec.Meta(ge=1, le=3650)] = 30
    # Redactors run over every captured text before anything is written, in order: the built-in pattern
    # kinds (BUILTIN_REDACTIONS) and plugin redactors by name (entry point `strait.redactors`). An empty
    # list captures the text as sent (only for data the tenant knows holds no personal data).
    redact: tuple[RedactorName, ...] = BUILTIN_REDACTIONS
    # Whether the consent covers training models on the captured data (a dataset export for fine-tuning
    # leaves out records captured without it); evaluation and analytics are covered by `enabled`.
    training: bool = False
    # A request re-sending the same conversation within this many seconds (a regenerate) is recorded as
    # implicit feedback (kind `regenerate`) on the earlier one; 0: not recorded.
    regenerate_window_s: Annotated[int, msgspec.Meta(ge=0, le=86_400)] = 600


Objective = Literal["cost", "latency", "balanced", "ordered"]


class Weights(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """For the `balanced` objective: how much cost and latency each count (normalised over the candidates)."""

    cost: float = 0.5
    latency: float = 0.5


class Spillover(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Prefer tiers in this order; a backend at or above `threshold` utilisation (or `queue_threshold`
    waiting requests) moves behind all others, and comes back only once its utilisation is at or below
    `resume_below` (and its queue at or below `queue_resume_below`): hysteresis, so it does not flap."""

    tiers: tuple[Tier, ...] = ("edge", "self-hosted", "provider")
    threshold: float = 0.8
    # None: threshold - 0.2 (at least 0).
    resume_below: float | None = None
    # Requests waiting in the engine's queue (scraped metrics only). None: the queue does not spill.
    queue_threshold: Annotated[int, msgspec.Meta(ge=1)] | None = None
    # None: queue_threshold // 2.
    queue_resume_below: Annotated[int, msgspec.Meta(ge=0)] | None = None

    def resume_mark(self) -> float:
        return self.resume_below if self.resume_below is not None else max(0.0, self.threshold - 0.2)

    def queue_resume_mark(self) -> int | None:
        if self.queue_threshold is None:
            return None
        return self.queue_resume_below if self.queue_resume_below is not None else self.queue_threshold // 2


# Longest value of an affinity session header: a longer one is a client mistake (400), never hashed whole.
AFFINITY_HEADER_MAX: Final = 256


class Affinity(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Session affinity (gateway.policy.affinity): requests of one conversation go to the same replica of
    the model the objective ranked first, while it is healthy and not saturated, so its prompt cache
    stays warm. The replica is chosen by rendezvous hashing of the conversation's key over the replicas:
    the same on every gateway replica without shared state, and only a leaving replica's conversations move."""

    # prefix: a hash of the conversation's stable start (the leading messages through the first user
    # message, or the first `prefix_messages`); header: the value of the request header `header`.
    key: Literal["prefix", "header"] = "prefix"
    header: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern="^[A-Za-z0-9-]+$")] | None = None
    prefix_messages: Annotated[int, msgspec.Meta(ge=1, le=64)] | None = None
    # The tiers whose replicas are kept per conversation (a provider keeps its own caches).
    tiers: tuple[Tier, ...] = ("edge", "self-hosted")
    # A replica at or above this utilisation is saturated: the conversation goes to its next replica in
    # hashing order, and comes back once the preferred one is below it again.
    max_utilisation: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.9


# A failure class a route retries (before any byte reached the client): `connect` (the upstream could not
# be reached), `timeout` (no answer head within the try's timeout, or an upstream 408), `reset` (the
# connection dropped before the answer's head), `429`, `5xx` (500-599), `context_length` (a 400
# context_length_exceeded: moves on to a candidate with a larger context window, never the same model).
RetryOn = Literal["connect", "timeout", "reset", "429", "5xx", "context_length"]


class RetryPolicy(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """How a route retries a failed attempt. Only before the first byte of the answer reached the client;
    every attempt counts against the route's `max_attempts` and, after the first, against the retry budget."""

    retry_on: tuple[RetryOn, ...] = ("connect", "timeout", "reset", "429", "5xx", "context_length")
    # Retries of one deployment before the next is tried: after a 500/502/504 or a reset (backoff), a 429
    # without Retry-After (backoff), or a 429/503/529 whose Retry-After is within `max_retry_after_s`.
    # Connect failures, timeouts and a 503/529 without Retry-After move on at once.
    same_deployment: Annotated[int, msgspec.Meta(ge=0, le=5)] = 1
    # Backoff before retrying the same deployment: exponential, capped, with jitter (half fixed, half
    # random: never less than half the step, so a retry never comes at once).
    backoff_base_ms: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 100
    backoff_max_ms: Annotated[int, msgspec.Meta(ge=1, le=60_000)] = 1_000
    # The longest upstream Retry-After (429/503/529) waited out to retry the same deployment; a longer
    # one moves to the next deployment at once. Never retried sooner than the upstream asked.
    max_retry_after_s: Annotated[float, msgspec.Meta(ge=0, le=60)] = 5.0
    # Retry budget, two conditions, both counted per replica: a retry starts only while the route's
    # retries in flight are fewer than max(`budget_min`, `budget_ratio` x its active requests) (Envoy's),
    # and while its retries in the last `budget_window_s` stay within `budget_ratio` x its requests in
    # that window + `budget_min` (Finagle's), which bounds the total a brown-out adds, not only the
    # retries at one moment.
    budget_ratio: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.2
    budget_min: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 3
    budget_window_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 10.0


class TryTimeouts(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Per attempt. The connect timeout is the backend's own (`timeouts.connect_s`); a timed-out attempt
    fails over like any other failure (retry class `timeout`)."""

    # A streaming request: from sending it to the upstream's status line (connect included). Engines
    # answer a stream's head before generating, so this waits out only a dead or hung upstream.
    stream_headers_s: Annotated[float, msgspec.Meta(gt=0, le=600)] = 15.0
    # A non-streaming request: the whole answer (its head comes with it, after the generation). None:
    # only the backend's `read_s` bounds the silence between reads.
    response_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] | None = None
    # A streaming request: from sending it to the upstream's first content event (a chunk with content,
    # a tool call, reasoning or a finish_reason; the role-only first chunk does not count). The client's
    # answer is committed to an upstream only then: an attempt without content by this time, or whose
    # stream fails or ends before content, is a failed attempt like one before the response head.
    first_token_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    # A committed stream: the longest silence between two reads from the upstream. Past it the stream
    # ends as timed out (an error event, no [DONE]) and the deployment counts as failed. Distinct from
    # the backend's `read_s` (which bounds every read of every route). None: only `read_s`.
    stall_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] | None = 30.0


class Shadow(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """A candidate model the route's traffic is copied to (gateway.stages.shadow): a sampled request is
    sent to it again after the client's answer is complete, off the client's path, and its answer is
    counted (and handed to the shadow sink, for capture) but never returned. The copy is filtered by
    the tenant's compliance like any candidate; it never touches the tenant's limits or budgets."""

    model: str
    # The share of the route's completed answers that are copied (0: none, 1: every one).
    sample_rate: Share = 1.0
    # The copy's whole answer must come within this; past it the copy is counted `timed_out`.
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=600)] = 60.0
    # The copies' own spend cap, in USD a day (UTC) per replica, at the candidate deployment's price
    # (gateway.stages.shadow_budget): past it a copy is not made, counted `over_budget`. None: no cap.
    usd_per_day: Annotated[float, msgspec.Meta(ge=0, le=1_000_000_000)] | None = None


class Canary(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """A candidate model that serves `weight` of the route's conversations (gateway.policy.trials): a
    conversation's share is a hash of the tenant and the conversation's stable start, so every turn of
    it goes to the same side. Compliance and the request's needs filter the candidate like any; when it
    cannot serve, the request stays on the route's own plan. A failing canary falls back to that plan."""

    model: str
    weight: Share = 0.0


class ShadowLimits(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """What shadow copies may take of a replica, all routes together: copies running at once, and copies
    waiting for one of those slots. A copy that finds the queue full is dropped and counted."""

    max_concurrency: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 4
    max_queue: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 64


class Route(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """A name clients send as `model`: candidate models, how to rank them, how to fall back."""

    name: str
    models: tuple[str, ...]
    description: str | None = None
    objective: Objective = "ordered"
    weights: Weights = Weights()
    # Soft preferences applied before the objective's score (hardware, nearness to the ingress region).
    prefer: Prefer | None = None
    spillover: Spillover | None = None
    # None: no session affinity (nothing about it is computed per request).
    affinity: Affinity | None = None
    # Other routes whose candidates are appended (after this route's own) as the last resort; the
    # tenant's compliance applies to them exactly as to the route's own candidates.
    fallback: tuple[str, ...] = ()
    # Upper bound on upstream attempts (first try + same-deployment retries + fallbacks) before an error
    # goes back to the client; the plan holds at most this many deployments.
    max_attempts: int = 3
    cache: RouteCache = RouteCache()
    # Retries and failover before the first byte (gateway.upstream.retry), and per-attempt timeouts.
    retry: RetryPolicy = RetryPolicy()
    timeouts: TryTimeouts = TryTimeouts()
    # A committed stream that breaks (cut, stall, error event): `off` ends it with an error event;
    # `continue` re-issues it to the plan's next deployment with capability `prefill`, the text already
    # sent as the assistant's prefix, and stitches the continuation into the same stream; `restart`
    # holds the whole stream until it completes (no streaming latency) and restarts a broken one on
    # the next deployment, so the client only ever sees one complete answer.
    resume: Literal["off", "continue", "restart"] = "off"
    # A candidate model copied to after the answer (never returned), and one serving a share of the
    # route's conversations: how a customised model is tried on live traffic before it is promoted.
    shadow: Shadow | None = None
    canary: Canary | None = None


class TenantKey(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    id: str
    # `sha256:<hex>` of the key, produced by `strait keys hash`; plain keys never appear in a file.
    digest: str


class OriginRule(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """A constraint that applies only to models of the given origins (countries or developers):
    e.g. Chinese-origin weights only on self-hosted US/EU hardware, never through the origin lab's own API."""

    origin_countries: tuple[str, ...] = ()
    developers: tuple[str, ...] = ()
    allowed_tiers: tuple[Tier, ...] | None = None
    allowed_jurisdictions: tuple[str, ...] | None = None
    # Refuse deployments operated by the model's own developer (its API), whatever the jurisdiction:
    # an operator is the developer's when the developer is the operator or one of its parents.
    deny_developer_operated: bool = False


class Compliance(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Where a tenant's requests may run, on five attributes: the model's origin, the backend's operator
    (an entity, with headquarters and parents), the ingress region, the inference jurisdiction, and
    retention and training. Every one fails closed when unknown, for allow-lists, deny-lists and maximums
    alike (gateway.policy.compliance; policies/README.md §4)."""

    allowed_jurisdictions: tuple[str, ...] | None = None
    denied_jurisdictions: tuple[str, ...] = ()
    allowed_origin_countries: tuple[str, ...] | None = None
    denied_origin_countries: tuple[str, ...] = ()
    allowed_developers: tuple[str, ...] | None = None
    denied_developers: tuple[str, ...] = ()
    allowed_tiers: tuple[Tier, ...] | None = None
    # By the headquarters of the backend's operator and of every parent of it ("no provider headquartered
    # in CN, wherever it hosts"); an operator or a headquarters not declared fails closed.
    allowed_operator_countries: tuple[str, ...] | None = None
    denied_operator_countries: tuple[str, ...] = ()
    # By name: the operator or any of its parents.
    denied_operators: tuple[str, ...] = ()
    # The ingress regions (STRAIT_REGION of the replica that received the request) this tenant's
    # requests may enter through; a request entering elsewhere is refused (403 ingress_region_not_allowed).
    required_ingress_regions: tuple[str, ...] | None = None
    max_retention_days: int | None = None
    no_training: bool = False
    required_certifications: tuple[str, ...] = ()
    origin_rules: tuple[OriginRule, ...] = ()


# The largest limits the state store computes exactly: its scripts run on Lua's doubles, so every
# product they form (a rate's capacity x its period in ms; a budget in micro-USD) stays below 2**50.
# Declared here, in the policy's own terms, so that a policy the loader accepts always converts to store
# limits (tests/unit/test_policy_compile.py ties the two together) and an out-of-range value is refused at its line.
EXACT_MAX: Final = 2**50 - 1
PER_MINUTE_MAX: Final = EXACT_MAX // 60_000
PER_DAY_MAX: Final = EXACT_MAX // 86_400_000
# USD budgets are stored in micro-USD.
USD_MAX: Final = float(EXACT_MAX // 1_000_000)

PerMinute = Annotated[int, msgspec.Meta(ge=0, le=PER_MINUTE_MAX)]
PerDay = Annotated[int, msgspec.Meta(ge=0, le=PER_DAY_MAX)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Usd = Annotated[float, msgspec.Meta(ge=0, le=USD_MAX)]
Tokens = Annotated[int, msgspec.Meta(ge=0, le=EXACT_MAX)]


class RateLimits(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """GCRA limits: an idle caller may spend a whole period's allowance at once, never more, and it
    refills smoothly (no fixed-window double bursts). A rate of 0, or none: no such limit;
    `max_concurrency: 0` admits nothing."""

    requests_per_minute: PerMinute | None = None
    tokens_per_minute: PerMinute | None = None
    requests_per_day: PerDay | None = None
    tokens_per_day: PerDay | None = None
    max_concurrency: NonNegative | None = None


class TenantLimits(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Rate limits for the tenant as a whole, for each of its keys, and per route (within the tenant)."""

    tenant: RateLimits = RateLimits()
    per_key: RateLimits = RateLimits()
    routes: dict[str, RateLimits] = {}


class Budget(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    usd_per_day: Usd | None = None
    usd_per_month: Usd | None = None
    tokens_per_month: Tokens | None = None


class Budgets(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    tenant: Budget = Budget()
    per_key: Budget = Budget()
    # What happens when a budget is spent: refuse (429 insufficient_quota, as OpenAI does) or move to a cheaper route.
    on_exhausted: Literal["block", "downgrade"] = "block"
    downgrade_route: str | None = None


# Priority classes a request may name (header `x-strait-priority`), most important first. Under load,
# lower classes are refused earlier (`server.shedding`); a tenant's policy says which it may use.
PriorityClass = Literal["interactive", "batch"]
PRIORITY_CLASSES: Final[tuple[PriorityClass, ...]] = ("interactive", "batch")


class TenantPriority(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Which priority classes the tenant's requests may ask for, and the class of a request that names none."""

    allowed: Annotated[tuple[PriorityClass, ...], msgspec.Meta(min_length=1)] = PRIORITY_CLASSES
    # None: the most important of `allowed`.
    default: PriorityClass | None = None

    @property
    def default_class(self) -> PriorityClass:
        if self.default is not None:
            return self.default
        return next(c for c in PRIORITY_CLASSES if c in self.allowed)


class Tenant(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    name: str
    keys: tuple[TenantKey, ...] = ()
    # Route names this tenant may use; "*" means every route.
    allowed_routes: tuple[str, ...] = ("*",)
    compliance: Compliance = Compliance()
    # May ask for the full decision table with `x-strait-explain: 1`.
    explain: bool = False
    limits: TenantLimits = TenantLimits()
    budgets: Budgets = Budgets()
    cache: CacheSettings = CacheSettings()
    priority: TenantPriority = TenantPriority()
    # Consent to data capture (off by default: nothing is captured without it).
    capture: CaptureSettings = CaptureSettings()


class HeaderMatch(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    name: str
    equals: str | None = None
    one_of: tuple[str, ...] | None = None


class TimeWindow(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Inclusive start, exclusive end, "HH:MM" in `tz`; a window may wrap midnight (22:00-06:00)."""

    start: str
    end: str
    tz: str = "UTC"


class When(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """All given conditions must hold; an empty `when` always matches."""

    tenants: tuple[str, ...] | None = None
    routes: tuple[str, ...] | None = None
    header: HeaderMatch | None = None
    min_prompt_tokens: int | None = None
    max_prompt_tokens: int | None = None
    time_of_day: TimeWindow | None = None


class Constraints(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Extra constraints a rule or a request adds; they only ever narrow the tenant's compliance."""

    allowed_jurisdictions: tuple[str, ...] | None = None
    allowed_origin_countries: tuple[str, ...] | None = None
    allowed_tiers: tuple[Tier, ...] | None = None
    max_price_per_mtok: float | None = None
    # Only backends declaring one of these chips, and at least this much memory per chip (a backend whose
    # hardware is not declared does not satisfy either).
    chips: tuple[str, ...] | None = None
    min_memory_gb: Annotated[float, msgspec.Meta(gt=0)] | None = None


class Prefer(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Soft preferences (a route's or a rule's): the candidates that match rank first, within their
    fallback and spillover group, before the objective's score decides among equals. Nothing is excluded."""

    # Chips in order of preference (e.g. cheapest first for batch traffic); others after them.
    chips: tuple[str, ...] | None = None
    # Backends with at least this much memory per chip first (long prompts on high-memory chips).
    min_memory_gb: Annotated[float, msgspec.Meta(gt=0)] | None = None
    # Backends whose `hosting.region` is the ingress region of the replica that received the request first.
    ingress_region: bool = False


class Then(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    objective: Objective | None = None
    weights: Weights | None = None
    constraints: Constraints | None = None
    # Send the request to another route (a rewrite); applied once per rule, in rule order.
    route: str | None = None
    # Replaces the route's `prefer` for this request (the last matching rule's wins).
    prefer: Prefer | None = None


class Rule(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    name: str
    when: When = When()
    then: Then


class Shedding(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Load shedding, per replica (one gateway process): requests on the model endpoints in flight at once
    (from arrival to their last byte) above which new ones are refused at once with 503 and
    `Retry-After`, instead of queueing until a timeout. 0: no cap."""

    max_in_flight: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 0
    # `batch` requests are refused once this share of the cap is in flight (`interactive` at the cap), so
    # interactive traffic keeps the rest.
    batch_share: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.7
    # The `Retry-After` (seconds) of a refusal.
    retry_after_s: Annotated[int, msgspec.Meta(ge=1, le=3600)] = 1


class Cors(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Browser clients (`server.cors`): which web origins may call the API from a page. None by default."""

    # Origins exactly as browsers send them (`https://app.example.com`, `http://localhost:5173`: scheme,
    # host, port; no path), or "*" for any origin (then never with credentials).
    allowed_origins: tuple[str, ...] = ()
    # Whether pages may send credentials (cookies); Strait's own keys travel in `Authorization`, which
    # needs no credentials mode. Never with "*".
    allow_credentials: bool = False
    # How long a browser may reuse a preflight's answer.
    max_age_s: Annotated[int, msgspec.Meta(ge=0, le=86_400)] = 600


class StoredResponses(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """`POST /v1/responses` with `store` (OpenAI's default): the response and the conversation that led to it,
    kept in the state store (memory, or the state's Redis: every replica reads it) for `previous_response_id`
    and `GET /v1/responses/{id}` (docs/responses.md)."""

    # How long a stored response can be read back (OpenAI keeps them 30 days); never renewed by a read.
    ttl_s: Annotated[int, msgspec.Meta(ge=1, le=365 * 86_400)] = 30 * 86_400
    # The largest stored response (its whole conversation, as JSON); a larger one is answered but not stored.
    max_bytes: Annotated[int, msgspec.Meta(ge=1024, le=256 * 1024 * 1024)] = 16 * 1024 * 1024
    # Responses kept per tenant; beyond it the tenant's oldest go first.
    max_per_tenant: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 10_000


class Server(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    # Requests with a larger body are refused with 413 before the body is read whole.
    max_body_bytes: int = 4 * 1024 * 1024
    cors: Cors = Cors()
    # What Strait reads of an upstream's answer, for every backend without `limits` of its own.
    upstream: UpstreamLimits = UpstreamLimits()
    # Digests (`strait keys hash`) of keys that may read every tenant's usage at /admin/usage.
    admin_keys: tuple[str, ...] = ()
    shedding: Shedding = Shedding()
    responses: StoredResponses = StoredResponses()
    # Shadow copies' own caps on this replica (every route's `shadow` together).
    shadow: ShadowLimits = ShadowLimits()


class SilencedWarning(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """A `strait policy check` warning the platform team has reviewed and accepts, with why: it is no
    longer printed (`--show-silenced` lists it). `tenant` and `route` narrow which warnings it covers (at
    least one is required); a silence that matches no warning is itself a warning, so none goes stale."""

    # empty_route: a tenant allowed every route (`*`) whose compliance leaves one with no candidate;
    # retry_budget: a route whose retry budget can never allow a retry.
    warning: Literal["empty_route", "retry_budget"]
    tenant: str | None = None
    route: str | None = None
    reason: Annotated[str, msgspec.Meta(min_length=1)]


class PolicySet(_Base, kw_only=True, frozen=True, forbid_unknown_fields=True):
    version: Literal[1] = 1
    server: Server = Server()
    # Entities that run backends (a backend's `hosting.operator` names one) and user-defined blocs.
    operators: tuple[Operator, ...] = ()
    blocs: tuple[Bloc, ...] = ()
    backends: tuple[Backend, ...] = ()
    models: tuple[Model, ...] = ()
    routes: tuple[Route, ...] = ()
    tenants: tuple[Tenant, ...] = ()
    rules: tuple[Rule, ...] = ()
    cache: CacheConfig = CacheConfig()
    silenced_warnings: tuple[SilencedWarning, ...] = ()
