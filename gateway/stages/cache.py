"""Stage `cache` (after `limits`): answers a request from an earlier answer, or lets it go on and keeps
the answer once it completed.

Lookup. The cache is in play only for a tenant that opted in, on a route that allows it (the compiled
`CachePlan`), for a chat request the route's bounds admit (temperature, tools, response_format, one
choice, no logprobs): otherwise `x-strait-cache: bypass`. Every comparison happens inside one namespace
(gateway.cache.scope: tenant, route, the deployment the plan would use first, every answer-changing
parameter, the system prompt, the turns before the last user turn, the embedder), so tenants never share
an entry. The exact tier is one store round trip; the semantic tier embeds the last user message (off the
event loop), takes the namespace's nearest neighbour and serves it only above the threshold and past the
lexical veto (gateway.cache.match). A store or embedder failure is a miss, never an error.

A hit short-circuits the pipeline with a whole answer (or its replay as SSE chunks for a streamed
request) carrying an `End` with `cache` set: the pipeline ends it through the taps like any answer, so
accounting records it (`cache_hit`, tokens saved, the route's hit price), the access log and the span see
it, and the limits reservation is released with no tokens (RPM counted the request; TPM is not charged).
Every hit gets a fresh response id, remembered for the tenant so `POST /v1/cache/feedback` can report it.
Entries are OpenAI answers keyed on the canonical request, whatever the client's protocol: a /v1/messages
request is looked up and stored like the equal chat request (the edge translates the answer it gets, a
hit included; its `msg_` id is the hit's `chatcmpl-` id, which feedback accepts too).

Store. On a miss, `on_response` keeps the answer if it completed: a JSON body at once (in the background),
a stream through a recorder around the relay that rebuilds the complete answer from its chunks. Never
partial streams, errors, or answers cut by `max_tokens` unless the route allows them. `Cache-Control:
no-cache` skips the lookup (and, right after a semantic hit for the same request, reports that hit as
bad); `no-store` skips the write.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import msgspec

from gateway.cache.entry import CacheEntry
from gateway.cache.replay import StreamAggregator, replay_chunks, replayable, with_id
from gateway.cache.scope import Scope, scope_of
from gateway.cache.store import CacheStore
from gateway.canonical import Request
from gateway.context import RequestContext
from gateway.contracts import End, Outcome
from gateway.policy.compile import CachePlan
from gateway.policy.index import PolicyIndex, Principal, Target
from gateway.policy.model import CacheConfig, RouteCache
from gateway.reply import EventStream, Reply
from gateway.stages.respond import response_headers
from gateway.telemetry import Metrics
from gateway.upstream.wire import Usage

if TYPE_CHECKING:
    from gateway.cache.embedders import Embedder

log = logging.getLogger("strait.cache")

CacheResult = Literal["hit", "semantic-hit", "miss", "bypass"]
# A served hit's response id stays reportable (feedback) this long; a regeneration with
# `Cache-Control: no-cache` this soon after a semantic hit reports it as bad.
SERVED_TTL_S = 3600
REGENERATE_WINDOW_S = 300
# Semantic lookups waiting for an embedding at most; beyond, a lookup skips the semantic tier (a miss).
MAX_EMBEDDING_BACKLOG = 64
# Namespaces larger than this are searched in a worker thread (about 0.4-1.8 ms for 10,000 rows).
SEARCH_IN_THREAD_ROWS = 2048
# Writes waiting in the background at most (beyond: skipped, counted): a slow store never piles up memory.
MAX_PENDING_WRITES = 256


@dataclass(slots=True)
class CacheTicket:
    """A request the cache may store the answer of: where (scope) and under which bounds."""

    scope: Scope
    plan: CachePlan
    target: Target
    store: bool
    # The embedded query (float32 bytes) when the semantic tier is on: stored with the entry.
    vector: bytes | None = None


class _Choice(msgspec.Struct):
    finish_reason: str | None = None


class _AnswerProbe(msgspec.Struct):
    """What the cache reads of a complete answer before keeping it."""

    choices: list[_Choice] = []
    usage: Usage | None = None
    model: str | None = None


_probe = msgspec.json.Decoder(_AnswerProbe).decode


def _cache_control(headers: Mapping[str, str]) -> tuple[bool, bool]:
    """(no-cache, no-store) from the request's Cache-Control."""
    value = headers.get("cache-control")
    if not value:
        return False, False
    tokens = {t.strip().lower() for t in value.split(",")}
    return "no-cache" in tokens, "no-store" in tokens


_CACHED_TOOL_KINDS = frozenset({"function"})


def uncacheable(request: Request, bounds: RouteCache) -> str | None:
    """Why the route's cache bounds exclude this request, or None."""
    if request.operation != "chat":
        return "operation"
    if request.temperature is not None and request.temperature > bounds.max_temperature:
        return "temperature"
    if request.tools and not bounds.tools:
        return "tools"
    if request.tool_outside(_CACHED_TOOL_KINDS) is not None:
        return "tools"  # a custom tool's call (`custom.input`) has no place in a stored answer's replay
    if request.response_format is not None and request.response_format.type != "text" and not bounds.response_format:
        return "response_format"
    if request.n not in (None, 1) or request.best_of not in (None, 1):
        return "n"
    if request.logprobs:
        return "logprobs"
    return None


class CacheStage:
    name = "cache"

    def __init__(
        self,
        index: PolicyIndex,
        store: CacheStore,
        embedders: Mapping[str | None, Embedder],
        metrics: Metrics,
        thresholds: Mapping[str | None, float],
    ) -> None:
        self.index = index
        self.store = store
        # By the plan's embedder name (None: the packaged default); only those the policy's plans use,
        # each with its similarity threshold (the policy's, or the one measured for its model).
        self.embedders = embedders
        self._thresholds = thresholds
        self.metrics = metrics
        self.config: CacheConfig = index.policy.cache
        self._timeout_s = self.config.semantic_timeout_ms / 1000
        # Semantic lookups waiting for (or in) an embedding right now.
        self._embedding = 0
        self._writes: set[asyncio.Future[object]] = set()

    async def warm(self) -> None:
        """Load every embedder's model (off the event loop) before the first lookup needs it."""
        for embedder in self.embedders.values():
            await embedder.warm()

    # ---- lookup ----

    async def on_request(self, ctx: RequestContext) -> Reply | None:
        principal, route, request = ctx.principal, ctx.route, ctx.request
        if principal is None or route is None or request is None or not ctx.plan:
            return None
        tables = self.index.tenant_tables.get(principal.tenant)
        plan = tables.cache.get(route.name) if tables is not None else None
        if plan is None:
            return None  # no tenant (an open policy), or this tenant does not cache on this route
        no_cache, no_store = _cache_control(ctx.headers)
        if uncacheable(request, plan.route) is not None:
            self._mark(ctx, "bypass")
            return None
        owner = _owner(plan, principal, request)
        if owner is None:
            self._mark(ctx, "bypass")  # partitioned by end user, and the request names none
            return None
        target = ctx.plan[0]
        embedder = self.embedders.get(plan.embedder) if plan.semantic else None
        tag = f"{embedder.id}@{embedder.version}" if embedder is not None else ""
        # The route's generation is part of it: bumping it in the policy retires every entry of the route.
        scope = scope_of(
            request,
            tenant=owner,
            route=f"{route.name}#{plan.route.generation}",
            deployment=target.label,
            embedder_tag=tag,
        )
        ticket = CacheTicket(scope=scope, plan=plan, target=target, store=not no_store)
        ctx.cache = ticket
        if no_cache:
            await self._regenerated(ctx, scope)
            if embedder is not None and scope.query is not None and ticket.store:
                # The fresh answer will be stored with its vector, computed now (a write never waits on it).
                ticket.vector = await self._embed(ctx, embedder, scope.query)
            self._mark(ctx, "bypass")
            return None
        started = time.perf_counter()
        entry = await self.store.get(scope.namespace, scope.exact_key) if plan.exact else None
        self.metrics.child(self.metrics.cache_lookup_seconds, "exact").observe(time.perf_counter() - started)
        if entry is not None:
            hit = self._hit(ctx, ticket, entry, "hit", None)
            if hit is not None:
                return hit
        if embedder is not None and scope.query is not None:
            found = await self._semantic(ctx, ticket, embedder, scope.query)
            if found is not None:
                return found
        self._mark(ctx, "miss")
        return None

    async def _semantic(self, ctx: RequestContext, ticket: CacheTicket, embedder: Embedder, query: str) -> Reply | None:
        from gateway.cache.match import decide  # numpy: only with the semantic tier (the `cache` extra)

        scope, plan = ticket.scope, ticket.plan
        if self._embedding >= MAX_EMBEDDING_BACKLOG:
            # The embedder is behind (one model thread): a lookup would wait longer than it could save.
            self._count(ctx, "busy")
            return None
        started = time.perf_counter()
        self._embedding += 1
        try:
            try:
                vectors = await asyncio.wait_for(embedder.embed([query]), self._timeout_s)
            finally:
                self._embedding -= 1
            ticket.vector = vectors[0].tobytes()
            candidates = await self.store.vectors(scope.namespace)
            if not candidates.keys:
                return None
            base = self._threshold(plan)
            if len(candidates) > SEARCH_IN_THREAD_ROWS:
                # numpy releases the GIL: a big namespace's search does not hold up the event loop.
                match = await asyncio.to_thread(decide, query, vectors[0], candidates.queries, candidates.matrix, base)
            else:
                match = decide(query, vectors[0], candidates.queries, candidates.matrix, base)
            if match is not None and match.index is not None:
                bad = await self.store.bad_hits(scope.namespace) if self.config.feedback_step > 0 else 0
                threshold = self._raised(base, bad)
                if match.similarity < threshold:
                    self._count(ctx, "raised_threshold")
                    return None
                key = candidates.keys[match.index]
                entry = await self.store.get(scope.namespace, key)
                if entry is not None:
                    return self._hit(ctx, ticket, entry, "semantic-hit", match.similarity, key)
            elif match is not None:
                self._count(ctx, "vetoed")
            return None
        except TimeoutError:
            self._count(ctx, "timeout")
            return None
        except Exception:  # an embedder or store failure is a miss, never the client's error
            log.warning("request %s: semantic cache lookup failed", ctx.request_id, exc_info=True)
            self._count(ctx, "error")
            return None
        finally:
            self.metrics.child(self.metrics.cache_lookup_seconds, "semantic").observe(time.perf_counter() - started)

    async def _embed(self, ctx: RequestContext, embedder: Embedder, query: str) -> bytes | None:
        try:
            return bytes((await asyncio.wait_for(embedder.embed([query]), self._timeout_s))[0].tobytes())
        except Exception:  # a timeout or a failure: the exact tier can still keep the answer
            log.warning("request %s: embedding for the cache failed", ctx.request_id, exc_info=True)
            self._count(ctx, "error")
            return None

    def _threshold(self, plan: CachePlan) -> float:
        base = self._thresholds[plan.embedder]
        return max(base, plan.threshold) if plan.threshold is not None else base

    def _raised(self, base: float, bad_hits: int) -> float:
        """A namespace reported wrong gets stricter, by a step per report, bounded."""
        raise_by = min(bad_hits * self.config.feedback_step, self.config.feedback_max_raise)
        return min(base + raise_by, 1.0)

    def _hit(
        self,
        ctx: RequestContext,
        ticket: CacheTicket,
        entry: CacheEntry,
        kind: Literal["hit", "semantic-hit"],
        similarity: float | None,
        key: str | None = None,
    ) -> Reply | None:
        """The hit's reply, or None (a miss) when the stored body cannot be served, or was produced by a
        deployment this request may not use (the tenant's compliance, as in force now, excludes it)."""
        plan = ctx.route_plan
        producers = entry.producers or ((entry.deployment,) if entry.deployment else ())
        if not producers or plan is None or not all(plan.may_use(label) for label in producers):
            self._count(ctx, "noncompliant")
            return None
        response_id = f"chatcmpl-{ctx.request_id}"
        created = int(time.time())
        chunks: list[bytes] | None = None
        body = b""
        try:
            if ctx.stream:
                chunks = replay_chunks(
                    entry.body, response_id=response_id, created=created, include_usage=ctx.include_usage
                )
            elif replayable(entry.body):  # the shape a fresh answer has, or not served at all
                body = with_id(entry.body, response_id, created)
            else:
                raise ValueError("the stored body is not a chat.completion")
        except Exception:  # an entry written by another version, or damaged: a miss, never the client's error
            log.warning("request %s: a cached answer could not be served", ctx.request_id, exc_info=True)
            self._count(ctx, "error")
            return None
        ctx.target = ticket.target
        ctx.cache = None  # nothing to store: the answer came from the cache
        headers = response_headers(ctx)
        headers["x-strait-cache"] = kind
        if similarity is not None:
            headers["x-strait-cache-similarity"] = f"{similarity:.4f}"
        saved = Usage(
            prompt_tokens=entry.prompt_tokens,
            completion_tokens=entry.completion_tokens,
            total_tokens=entry.prompt_tokens + entry.completion_tokens,
        )
        hit_price = ticket.plan.route.hit_price
        principal = ctx.principal
        assert principal is not None
        scope = ticket.scope
        self._background(
            self.store.remember_served(
                principal.tenant, response_id, scope.namespace, key or scope.exact_key, SERVED_TTL_S
            )
        )
        if kind == "semantic-hit":
            # A regeneration of this very request soon after says the neighbour's answer was wrong.
            self._background(
                self.store.remember_served(
                    principal.tenant,
                    _regenerate_key(scope),
                    scope.namespace,
                    key or scope.exact_key,
                    REGENERATE_WINDOW_S,
                )
            )
        self._count(ctx, "semantic_hit" if kind == "semantic-hit" else "hit")
        # The hit's result header is the request's too (the access log and the span read it there).
        ctx.extra_headers["x-strait-cache"] = kind
        self.metrics.child(self.metrics.requests, ctx.route_name, "200").inc()
        # The route's latency includes hits, as its request count does (what clients of the route see;
        # no deployment answered, so the deployment's latency does not).
        self.metrics.child(self.metrics.latency, ctx.route_name).observe(time.perf_counter() - ctx.started)
        self.metrics.child(self.metrics.cache_tokens_saved, principal.tenant, ctx.route_name).inc(
            entry.prompt_tokens + entry.completion_tokens
        )
        if chunks is not None:
            headers["cache-control"] = "no-cache"
            return Reply(
                status=200,
                headers=headers,
                stream=ReplayStream(chunks, kind, saved, hit_price),
                media_type="text/event-stream",
                extra=[ticket.target.header],
            )
        end = End("completed", 200, cache=kind, saved=saved, hit_price=hit_price)
        return Reply(status=200, headers=headers, body=body, end=end, extra=[ticket.target.header])

    async def _regenerated(self, ctx: RequestContext, scope: Scope) -> None:
        """`no-cache` right after a semantic hit for the same request: that hit was wrong."""
        principal = ctx.principal
        assert principal is not None
        served = await self.store.served(principal.tenant, _regenerate_key(scope))
        if served is not None:
            await self.report_bad("regenerate", served[0], served[1])

    async def report_bad(self, source: Literal["feedback", "regenerate"], namespace: str, key: str) -> int:
        """A served answer reported wrong: it leaves the cache and its namespace gets stricter."""
        await self.store.delete(namespace, key)
        self.metrics.child(self.metrics.cache_bad_hits, source).inc()
        return await self.store.add_bad_hit(namespace)

    def _mark(self, ctx: RequestContext, result: CacheResult) -> None:
        ctx.extra_headers["x-strait-cache"] = result
        self._count(ctx, result)

    def _count(self, ctx: RequestContext, result: str) -> None:
        self.metrics.child(self.metrics.cache_lookups, ctx.route_name, result).inc()

    # ---- store ----

    async def on_response(self, ctx: RequestContext, reply: Reply) -> Reply:
        ticket = ctx.cache
        if ticket is None or not ticket.store or reply.status != 200:
            return reply
        if reply.stream is not None:
            reply.stream = Recorder(reply.stream, self, ctx, ticket)
            return reply
        end = reply.end
        if end is not None and end.outcome == "completed":
            self.keep(ctx, ticket, reply.body)
        return reply

    def keep(self, ctx: RequestContext, ticket: CacheTicket, body: bytes | None) -> None:
        """Store a complete answer in the background (never on the request's time)."""
        route = ctx.route_name
        reason = self._unkeepable(ticket, body)
        if reason is not None or body is None:
            self.metrics.child(self.metrics.cache_stores, route, reason or "incomplete").inc()
            return
        if len(self._writes) >= MAX_PENDING_WRITES:
            self.metrics.child(self.metrics.cache_stores, route, "backlog").inc()
            return
        prompt = ctx.usage_in or 0
        completion = ctx.usage_out or 0
        self._background(self._write(ctx, ticket, body, prompt, completion))

    def _unkeepable(self, ticket: CacheTicket, body: bytes | None) -> str | None:
        if body is None:
            return "incomplete"
        bounds = ticket.plan.route
        if len(body) > bounds.max_bytes:
            return "too_large"
        try:
            probe = _probe(body)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return "unreadable"
        if not replayable(body):
            return "unreadable"
        if len(probe.choices) != 1:
            return "incomplete"
        finish = probe.choices[0].finish_reason
        if finish is None:
            return "incomplete"
        if finish == "length" and not bounds.truncated:
            return "truncated"
        if finish not in ("stop", "length", "tool_calls"):
            return "incomplete"
        return None

    async def _write(self, ctx: RequestContext, ticket: CacheTicket, body: bytes, prompt: int, completion: int) -> None:
        scope, plan = ticket.scope, ticket.plan
        vector = ticket.vector
        # The deployment that answered (a fallback's, when the first choice failed), not the one the
        # namespace was keyed on: a hit is checked against what really produced it.
        answered = ctx.target or ticket.target
        if prompt or completion:
            body = _with_usage(body, prompt, completion)
        now_ms = int(time.time() * 1000)
        entry = CacheEntry(
            body=body,
            query=scope.query,
            vector=vector,
            created_ms=now_ms,
            expires_ms=now_ms + plan.ttl_s * 1000,
            prompt_tokens=prompt,
            completion_tokens=completion,
            model=answered.deployment.upstream_model,
            deployment=answered.label,
            producers=tuple(dict.fromkeys([*(c.target.label for c in ctx.continued), answered.label])),
        )
        await self.store.put(
            scope.namespace,
            scope.exact_key,
            entry,
            max_entries=plan.route.max_entries,
            max_bytes=plan.route.max_bytes,
        )
        self.metrics.child(self.metrics.cache_stores, ctx.route_name, "stored").inc()

    def _background(self, work: Awaitable[object]) -> None:
        task = asyncio.ensure_future(work)
        self._writes.add(task)
        task.add_done_callback(self._written)

    def _written(self, task: asyncio.Future[object]) -> None:
        self._writes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("cache write failed: %s", task.exception())

    async def drain(self) -> None:
        """Wait for the writes still in flight (shutdown, tests)."""
        while self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)


def _owner(plan: CachePlan, principal: Principal, request: Request) -> str | None:
    """Who may share this request's entries: the tenant, one of its keys, or one end user of it (always
    inside the tenant; length-prefixed so no two owners collide). None: partitioned by user, no user."""
    tenant = principal.tenant
    if plan.partition == "tenant":
        return tenant
    if plan.partition == "key":
        return f"{len(tenant)}:{tenant}|key:{principal.key_id}"
    if not request.user:
        return None
    return f"{len(tenant)}:{tenant}|user:{request.user}"


def _with_usage(body: bytes, prompt: int, completion: int) -> bytes:
    """The answer with the usage it was charged, when it came without one (a stream whose usage chunk the
    client did not ask for): a replay to a client that asks for usage must have one to send."""
    if b'"usage"' in body:
        probe = _probe(body)
        if probe.usage is not None:
            return body
    answer = msgspec.json.decode(body)
    answer["usage"] = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    return msgspec.json.encode(answer)


def _regenerate_key(scope: Scope) -> str:
    return f"regen:{scope.exact_key}"


class ReplayStream:
    """A cached answer replayed as a stream (gateway.reply.EventStream): every chunk in one batch."""

    __slots__ = ("_chunks", "_end", "_hit_price", "_kind", "_saved")

    def __init__(
        self, chunks: list[bytes], kind: Literal["hit", "semantic-hit"], saved: Usage, hit_price: float
    ) -> None:
        self._chunks: list[bytes] | None = chunks
        self._kind: Literal["hit", "semantic-hit"] = kind
        self._saved = saved
        self._hit_price = hit_price
        self._end: End | None = None

    async def next(self) -> list[bytes]:
        chunks, self._chunks = self._chunks, None
        return chunks or []

    @property
    def finished(self) -> bool:
        return self._chunks is None

    def stop(self, outcome: Outcome | None = None) -> End:
        if self._end is None:
            own: Outcome = "completed" if self._chunks is None else (outcome or "client_gone")
            self._end = End(
                own,
                200 if own == "completed" else 499,
                stream=True,
                partial=own != "completed",
                cache=self._kind,
                saved=self._saved,
                hit_price=self._hit_price,
            )
        return self._end

    def release(self) -> None:
        return None


class Recorder:
    """Around a stream the cache may keep: the same events, rebuilt into the complete answer, stored
    once the stream completed (never a partial one)."""

    __slots__ = ("_aggregator", "_ctx", "_inner", "_stage", "_ticket")

    def __init__(self, inner: EventStream, stage: CacheStage, ctx: RequestContext, ticket: CacheTicket) -> None:
        self._inner = inner
        self._stage = stage
        self._ctx = ctx
        self._ticket = ticket
        self._aggregator: StreamAggregator | None = StreamAggregator()

    async def next(self) -> list[bytes]:
        batch = await self._inner.next()
        aggregator = self._aggregator
        if aggregator is not None:
            for event in batch:
                aggregator.feed(event)
        return batch

    @property
    def finished(self) -> bool:
        return self._inner.finished

    def stop(self, outcome: Outcome | None = None) -> End:
        end = self._inner.stop(outcome)
        aggregator, self._aggregator = self._aggregator, None
        if aggregator is not None and end.outcome == "completed" and end.status == 200:
            # The usage chunk is not among the relayed events when the client did not ask for it: the
            # answer is kept with what accounting charged (set by its tap, in the stop above).
            ctx = self._ctx
            usage = None
            if ctx.usage_in is not None and ctx.usage_out is not None:
                usage = msgspec.json.encode(
                    {
                        "prompt_tokens": ctx.usage_in,
                        "completion_tokens": ctx.usage_out,
                        "total_tokens": ctx.usage_in + ctx.usage_out,
                    }
                )
            self._stage.keep(ctx, self._ticket, aggregator.result(usage=usage))
        return end

    def release(self) -> Awaitable[None] | None:
        return self._inner.release()
