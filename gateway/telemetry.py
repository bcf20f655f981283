"""Prometheus metrics, one registry per app (no module globals), exposed at GET /metrics.

The request path counts through `Metrics.child`: a labelled counter's increments are summed in a
plain float (`Tally`) and handed to prometheus_client when the metrics are read (`render`), because
each prometheus_client increment takes a lock (about 0.4 us; a JSON request makes about nine). A
histogram's observations are counted per bucket the same way (`Spread`).
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Tally:
    """A counter child's increments since the metrics were last read; only ever touched on the event
    loop's thread (the request path and GET /metrics), so no lock."""

    __slots__ = ("child", "pending")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.pending = 0.0

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.pending += amount

    def fold(self) -> None:
        if self.pending:
            self.child.inc(self.pending)
            self.pending = 0.0


class Spread:
    """A histogram child's observations since the metrics were last read, counted per bucket here (one
    C bisect and two additions) and handed to prometheus_client in bulk when the metrics are read:
    `Histogram.observe` walks the bucket bounds in Python and takes two locks per call, and a request
    observes three to five histograms. Event-loop thread only, as `Tally`."""

    __slots__ = ("bounds", "child", "counts", "total")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.bounds: list[float] = list(child._upper_bounds)  # ends with +Inf
        self.counts = [0] * len(self.bounds)
        self.total = 0.0

    def observe(self, amount: float) -> None:
        # The first bucket whose bound is >= amount, as prometheus_client's `amount <= bound` walk.
        at = bisect_left(self.bounds, amount)
        if at < len(self.counts):
            self.counts[at] += 1
        self.total += amount

    def fold(self) -> None:
        counts = self.counts
        if not any(counts) and not self.total:
            return
        buckets = self.child._buckets
        for i, n in enumerate(counts):
            if n:
                buckets[i].inc(n)
                counts[i] = 0
        self.child._sum.inc(self.total)
        self.total = 0.0


class Metrics:
    def __init__(self) -> None:
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._tallies: list[Tally | Spread] = []
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "strait_requests",
            "Requests answered, by route and status: upstream answers, cache hits and the gateway's own refusals "
            "and failures (route '-' when refused before a route was chosen).",
            ("route", "status"),
            registry=self.registry,
        )
        self.upstream_attempts = Counter(
            "strait_upstream_attempts",
            "Upstream attempts by backend and outcome (HTTP status, connect_error, reset, timeout).",
            ("backend", "outcome"),
            registry=self.registry,
        )
        self.tokens = Counter(
            "strait_tokens",
            "Tokens reported by upstream usage, by route and kind (prompt, completion; cached and cache_write "
            "are parts of prompt, reasoning a part of completion).",
            ("route", "kind"),
            registry=self.registry,
        )
        self.policy_reloads = Counter(
            "strait_policy_reloads", "Policy reload attempts by result.", ("result",), registry=self.registry
        )
        self.shadow_decisions = Counter(
            "strait_shadow_decisions",
            "Decisions of the shadow policy (STRAIT_SHADOW_POLICY) next to the live one: agree or disagree.",
            ("result",),
            registry=self.registry,
        )
        # Shadow copies of live requests to a route's candidate model (gateway.stages.shadow). Labels: the
        # policy's routes x a fixed set of outcomes, reasons and kinds.
        self.shadow_requests = Counter(
            "strait_shadow_requests",
            "Shadow copies by route and outcome: completed (the candidate answered 2xx), failed (an error "
            "status, a connection failure or a bad answer), timed_out (past the route's shadow.timeout_s), "
            "dropped (the shadow queue was full), paused (the candidate failed PAUSE_AFTER copies in a row: not tried "
            "for a while), excluded (no deployment of the candidate may take the request).",
            ("route", "outcome"),
            registry=self.registry,
        )
        self.shadow_excluded = Counter(
            "strait_shadow_excluded",
            "Sampled requests not copied because no candidate deployment may take them, by route and reason "
            "(compliance, constraints, capability, context_length, ejected, no_deployment, stream).",
            ("route", "reason"),
            registry=self.registry,
        )
        self.shadow_latency = Histogram(
            "strait_shadow_request_duration_seconds",
            "Time a shadow copy took, from its start (after the client's answer) to the candidate's whole answer.",
            ("route",),
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.shadow_tokens = Counter(
            "strait_shadow_tokens",
            "Tokens the candidate reported for shadow copies, by route and kind (prompt, completion): "
            "accounted here only, never to a tenant's usage, limits or budgets.",
            ("route", "kind"),
            registry=self.registry,
        )
        self.shadow_cost = Counter(
            "strait_shadow_cost_usd",
            "What shadow copies cost at the candidate deployment's price, by route (never charged to a tenant).",
            ("route",),
            registry=self.registry,
        )
        self.shadow_sink_errors = Counter(
            "strait_shadow_sink_errors",
            "Shadow copies whose result the shadow sink (capture) failed to take, by route.",
            ("route",),
            registry=self.registry,
        )
        self.shadow_captures = Counter(
            "strait_shadow_captures",
            "Shadow copies' answers offered to the capture store, by result: queued (the live request was "
            "captured: the tenant consents), no_consent (not stored, only counted), dropped (queue full).",
            ("route", "result"),
            registry=self.registry,
        )
        self.shadow_pending = Gauge(
            "strait_shadow_pending",
            "Shadow copies running or waiting for a slot on this replica (bounded by server.shadow).",
            registry=self.registry,
        )
        self.limits_degraded = Counter(
            "strait_limits_degraded",
            "Admissions decided without the shared store (rate limits open, budgets on the local share).",
            registry=self.registry,
        )
        self.state_resets = Counter(
            "strait_state_resets",
            "Times the shared store was found empty after having held data (Redis restarted without "
            "persistence: limits and budgets started over).",
            registry=self.registry,
        )
        self.usage_records = Counter(
            "strait_usage_records",
            "Usage records handed to the ledger writer, by source.",
            ("source",),
            registry=self.registry,
        )
        self.upstream_auth_failures = Counter(
            "strait_upstream_auth_failures",
            "Upstream answers refusing the gateway's own credentials (401/403), by backend.",
            ("backend",),
            registry=self.registry,
        )
        self.ttft = Histogram(
            "strait_time_to_first_token_seconds",
            "Time from request to the first streamed event, by route.",
            ("route",),
            registry=self.registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        # The same two timings by the deployment that answered (model@backend), so a dashboard tells a slow
        # deployment from a slow route. Labels: the policy's route x deployment pairs.
        self.deployment_ttft = Histogram(
            "strait_deployment_time_to_first_token_seconds",
            "Time from request to the first streamed event, by route and the deployment that answered.",
            ("route", "deployment"),
            registry=self.registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.deployment_latency = Histogram(
            "strait_deployment_request_duration_seconds",
            "Time from request to the end of the response head (non-streaming: whole answer), by route and "
            "the deployment that answered.",
            ("route", "deployment"),
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.usage_tokens = Counter(
            "strait_usage_tokens",
            "Tokens charged (every usage record), by tenant, route, deployment and kind: prompt and completion "
            "are totals; cached (cache reads) and cache_write are parts of prompt, reasoning a part of completion.",
            ("tenant", "route", "deployment", "kind"),
            registry=self.registry,
        )
        self.usage_cost = Counter(
            "strait_usage_cost_usd",
            "Cost charged in USD (deployment prices), by tenant, route and deployment.",
            ("tenant", "route", "deployment"),
            registry=self.registry,
        )
        self.deployment_unpriced = Gauge(
            "strait_deployment_unpriced",
            "1 for a deployment whose usage is charged $0 because its policy gives it no price (and does not "
            "say `free: true`), 0 for every other deployment of the policy in force; set at start-up and on "
            "each policy reload.",
            ("deployment",),
            registry=self.registry,
        )
        # Spillover as operators budget it: which tier served a route's requests, and whether spillover
        # moved a backend behind the one that served (the request spilled). Labels: policy routes x 3 tiers x 2.
        self.served_requests = Counter(
            "strait_served_requests",
            "Requests answered by an upstream (usage records' final attempts), by route, the serving "
            "deployment's tier and whether spillover sent the request past a full backend (spilled).",
            ("route", "tier", "spilled"),
            registry=self.registry,
        )
        self.served_cost = Counter(
            "strait_served_cost_usd",
            "Cost charged in USD (every attempt), by route, the deployment's tier and spilled (as "
            "strait_served_requests): the spend spillover causes.",
            ("route", "tier", "spilled"),
            registry=self.registry,
        )
        self.policy_reload_ok = Gauge(
            "strait_policy_last_reload_successful",
            "1 when the last policy reload attempt (file change or SIGHUP) put the policy in force (or none "
            "was tried yet), 0 while the last one was refused: the running policy is older than the files.",
            registry=self.registry,
        )
        self.policy_reload_ok.set(1)
        self.fallbacks = Counter(
            "strait_fallbacks",
            "Attempts that failed before the first byte and moved on to the next deployment, by route.",
            ("route",),
            registry=self.registry,
        )
        self.retries = Counter(
            "strait_retries",
            "Attempts that retried the same deployment (after a backoff or the upstream's Retry-After), by route.",
            ("route",),
            registry=self.registry,
        )
        self.retry_budget_exhausted = Counter(
            "strait_retry_budget_exhausted",
            "Retries or fallbacks refused because the route's retry budget was spent, by route.",
            ("route",),
            registry=self.registry,
        )
        self.latency = Histogram(
            "strait_request_duration_seconds",
            "Time from request to the end of the response head (non-streaming: whole answer).",
            ("route",),
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )

        self.limit_decisions = Counter(
            "strait_limit_decisions",
            "Admissions by route and result: allowed, downgraded (a spent budget moved the request to the "
            "tenant's downgrade route), rate_limited, concurrency, budget, too_large (more than the limit's "
            "whole capacity), degraded (the state store was unreachable: rate limits open).",
            ("route", "result"),
            registry=self.registry,
        )
        self.state_latency = Histogram(
            "strait_state_call_seconds",
            "State store calls (Redis round trips) by call: admit (on the request path), reconcile (a batch "
            "of releases, in the background).",
            ("call",),
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
        )

        self.malformed_events = Counter(
            "strait_upstream_malformed_events",
            "Stream events from an upstream that were not valid JSON, skipped (a stream sending more than a "
            "few ends with an error), by backend.",
            ("backend",),
            registry=self.registry,
        )
        self.evidence_mismatch = Counter(
            "strait_compliance_evidence_mismatch",
            "Answers whose provider reported inference outside the backend's declared jurisdiction (e.g. "
            "Anthropic's usage.inference_geo 'global' for a backend declared US): a compliance alert, by "
            "deployment.",
            ("deployment",),
            registry=self.registry,
        )
        self.cache_lookups = Counter(
            "strait_cache_lookups",
            "Cache lookups by route and result: hit (exact), semantic_hit, miss, bypass (Cache-Control or "
            "not cacheable), vetoed (a neighbour above the threshold refused by the lexical veto), "
            "raised_threshold (a neighbour below its namespace's threshold raised by bad-hit reports), timeout "
            "(the embedding took longer than cache.semantic_timeout_ms), busy (too many lookups waiting for "
            "the embedder), error (the cache store or the embedder failed), noncompliant (an entry produced by a "
            "deployment the requesting tenant may not use now: never served). All but hit, semantic_hit and "
            "bypass are also counted as miss.",
            ("route", "result"),
            registry=self.registry,
        )
        self.cache_stores = Counter(
            "strait_cache_stores",
            "Answers written to the cache, by route and result (stored, skipped: incomplete, an error, cut by "
            "max_tokens, too large).",
            ("route", "result"),
            registry=self.registry,
        )
        self.cache_tokens_saved = Counter(
            "strait_cache_tokens_saved",
            "Tokens the cached answers served did not cost again, by tenant and route.",
            ("tenant", "route"),
            registry=self.registry,
        )
        self.cache_bad_hits = Counter(
            "strait_cache_bad_hits",
            "Cache hits reported bad, by source: feedback (POST /v1/cache/feedback) or regenerate (the same "
            "request again with Cache-Control: no-cache right after a semantic hit); each removes the entry and "
            "raises its namespace's threshold (bounded).",
            ("source",),
            registry=self.registry,
        )
        self.cache_lookup_seconds = Histogram(
            "strait_cache_lookup_seconds",
            "Time a cache lookup added to the request, by tier (exact, semantic).",
            ("tier",),
            registry=self.registry,
            buckets=(0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
        )
        self.shed = Counter(
            "strait_shed",
            "Requests refused with 503 because the replica had as many in flight as their priority class "
            "may have (server.shedding), by class.",
            ("priority",),
            registry=self.registry,
        )
        self.capture_records = Counter(
            "strait_capture_records",
            'Capture records (README "The learning loop") by result: queued, written, dropped (the bounded '
            "queue was full: never waited for), failed (the store refused the batch).",
            ("result",),
            registry=self.registry,
        )
        self.feedback = Counter(
            "strait_feedback",
            "Feedback recorded, by kind (score, boolean, label, correction, regenerate, cache_bad_hit).",
            ("kind",),
            registry=self.registry,
        )
        self.refusals = Counter(
            "strait_refusals",
            "Requests the gateway answered with an error (refused before an upstream: authentication, body, "
            "route, limits, budget, shedding; or an upstream failure no fallback recovered), by tenant ('-' "
            "before authentication) and error code. Labels: the policy's tenants x the gateway's error codes.",
            ("tenant", "code"),
            registry=self.registry,
        )
        self.shutdown_cut = Counter(
            "strait_shutdown_cut",
            "Requests still running when a shutdown's grace period ran out: ended with an error (a stream "
            "with an in-band error event), by whether the answer had started.",
            ("started",),
            registry=self.registry,
        )

    def child(self, metric: Any, *labels: str) -> Any:
        """A metric's child for these label values, looked up once: `labels()` hashes and locks on every
        call, measurable on the hot path. Label values come from the policy (routes, backends), so the
        cache is bounded. A counter's child is its `Tally` (read through `render`)."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = metric.labels(*labels)
            if isinstance(metric, Counter):
                found = Tally(found)
                self._tallies.append(found)
            elif isinstance(metric, Histogram):
                found = Spread(found)
                self._tallies.append(found)
            self._children[key] = found
        return found

    def fold(self) -> None:
        """Hand every pending tally to prometheus_client: the registry is up to date after this."""
        for tally in self._tallies:
            tally.fold()

    def render(self) -> bytes:
        self.fold()
        return generate_latest(self.registry)
