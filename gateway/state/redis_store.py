"""The shared store on Redis (single server or Redis Cluster): one Lua script call per admission.

Data layout (version 2: one state hash per tenant, a spent counter per budget window) and the memoised
per-(limits, tenant, key, route, day) script arguments: `layout.py`. An admission is 5 Redis commands
for a tenant with three rates, a concurrency limit and a budget (EVALSHA, TIME, HMGET, HGET, HSET);
a batch of reconciles of one tenant is one script call (6 commands for the same limits, any batch size).

Failure mode, declared per limit type (the store being unreachable, slow, frozen, or the breaker open):
- rate and concurrency limits fail OPEN: the admission is allowed with `degraded=True` and no rate
  checks (so no rate-limit headers), at a cost of at most `timeout_s` (about 0 once the breaker opens);
- budgets fall back to this replica's local share, `remaining / replicas_hint` where `remaining` is the
  last value Redis reported for that budget (the whole limit if never seen), enforced in memory.
Each call is bounded by a hard `Deadline(timeout_s)` on top of the socket timeouts (connect + handshake
+ reply together), and is never retried: a retried script could consume twice (LiteLLM #30460).
Starting with Redis down works (nothing connects at construction) and reconnection needs no restart.

Scripts use Redis `TIME`, so every replica decides on one clock. In test mode (`clock` given) they get
`now_ms` from that clock instead, so tests drive Redis and the memory store on the same fake time.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Sequence
from functools import partial
from importlib.resources import files
from typing import Any

import msgspec
from redis.asyncio import Redis, RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import RedisClusterException, RedisError

from gateway.state.base import (
    Admission,
    AdmissionRequest,
    BudgetLimit,
    CheckResult,
    Clock,
    Limits,
    Reconciliation,
    StoreKind,
    StoreStatus,
    Ticket,
    Usage,
)
from gateway.state.breaker import Breaker
from gateway.state.deadline import Deadline, Gate
from gateway.state.keys import Calendar
from gateway.state.layout import Binding, Bindings, encode_id
from gateway.state.memory import MemoryStore, ticket_ttl_ms, wall_clock_ms
from gateway.state.scripts import DirectConnections, bulk, pack

log = logging.getLogger(__name__)

# What "the store is unreachable" looks like: refused, reset, timed out (socket or our own deadline),
# pool exhausted, cluster without a slot map, or a script error. All fail the same declared way.
_FAILURES = (RedisError, RedisClusterException, OSError)
# The late result of a call whose caller was cancelled, when nobody waited to see it.
_UNKNOWN = object()
# Marks one life of the Redis data set (see check_epoch); refreshed far more often than it expires.
EPOCH_KEY = "strait:epoch"
EPOCH_TTL_MS = 7 * 86_400_000
_TIME = pack(["TIME"])
# How much earlier than the caller's own give-up an admission's deadline falls (at most a tenth of it).
DEADLINE_SLACK_MS = 5
_PING = pack(["PING"])
# Bound on remembered budget remainders (one per budget key seen today); cleared when exceeded.
_SEEN_MAX = 50_000


def _lua(name: str) -> str:
    """A script with the shared prelude (clock, request id, integer arguments) in front."""
    folder = files("gateway.state").joinpath("lua")
    return folder.joinpath("prelude.lua").read_text(encoding="utf-8") + folder.joinpath(name).read_text(
        encoding="utf-8"
    )


def _source(script: AsyncScript) -> str:
    source = script.script
    assert isinstance(source, str)  # registered from text (_lua)
    return source


class RedisStore:
    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        kind: StoreKind = "redis",
        timeout_s: float = 0.08,
        replicas_hint: int = 1,
        breaker: Breaker | None = None,
        clock: Clock | None = None,
        min_ttl_ms: int | None = None,
        max_connections: int = 64,
    ) -> None:
        self._client = client
        self._kind: StoreKind = kind
        self._timeout_s = timeout_s
        self._timeout_ms = max(1, int(timeout_s * 1000))
        # The script's deadline comes this much before the caller gives up: both clocks are read in whole
        # milliseconds and the offset is learnt to within one, so without it a script run in the very
        # millisecond the caller gave up (Redis frozen, thawed right then) still took a concurrency slot
        # for the whole lease (the failure-mode test's flake, ~1 run in 10).
        self._deadline_slack_ms = min(DEADLINE_SLACK_MS, self._timeout_ms // 10)
        # Redis TIME minus our wall clock (ms), learned from each admission's answer; see _deadline.
        self._offset_ms: int | None = None
        # Admissions the script refused as past their deadline while we still waited (offset corrected).
        self._expired = 0
        # The data set's epoch id as last seen (None before the first check).
        self._epoch: str | None = None
        self._clock_probe: asyncio.Future[None] | None = None
        self._replicas = max(1, replicas_hint)
        self._breaker = breaker or Breaker()
        # Test mode sends `now_ms`; production lets the scripts read Redis `TIME`.
        self._test_clock = clock
        self._clock: Clock = clock or wall_clock_ms
        # On fake time, real-time TTLs must not expire state the fake clock still needs.
        self._min_ttl_ms = min_ttl_ms if min_ttl_ms is not None else (600_000 if clock else 1000)
        self._calendar = Calendar()
        self._admit = client.register_script(_lua("admit.lua"))
        self._reconcile = client.register_script(_lua("reconcile.lua"))
        self._renew = client.register_script(_lua("renew.lua"))
        self._bindings = Bindings(self._min_ttl_ms, self._admit.sha)
        # One Redis: scripts go out on connections of our own, packed (see DirectConnections).
        self._direct = DirectConnections(client) if kind == "redis" and isinstance(client, Redis) else None
        self._local = MemoryStore(clock=self._clock)
        self._seen: dict[str, int] = {}
        # In-flight calls are capped at the pool size, so a burst waits for a connection (within the
        # deadline) instead of failing on an exhausted pool (Redis Cluster's node pools do not block).
        self._inflight = Gate(max_connections)
        self._failures = 0
        self._skipped = 0
        self._saturated = 0
        self._shield = kind == "redis-cluster"
        # Calls whose caller left, finishing on their own (kept referenced until done).
        self._background: set[asyncio.Future[Any]] = set()

    # -- the contract -------------------------------------------------------------------------------

    async def admit(self, request: AdmissionRequest) -> Admission:
        now = self._clock()
        w = self._calendar.at(now)
        limits = request.limits
        binding = self._bindings.get(limits, request.tenant, request.key, request.route, w.day, w.month)
        if not self._breaker.allow():
            self._skipped += 1
            return self._degraded(request, binding.budget_keys)
        lease = request.lease_ms
        if self._offset_ms is None and self._test_clock is None and self._clock_probe is None:
            # In the background: the first admissions go without a deadline rather than wait for it.
            self._clock_probe = asyncio.ensure_future(self._learn_clock())
            self._background.add(self._clock_probe)
            self._clock_probe.add_done_callback(self._clock_probed)
        now_arg = "" if self._test_clock is None else str(now)
        deadline = self._deadline(now)
        rid = encode_id(request.request_id)
        nums = f"{lease} {ticket_ttl_ms(lease) if limits.needs_ticket else 0} {request.tokens} {request.cost_micro_usd}"
        args: list[str | int] = [now_arg, deadline, rid, binding.admit_template, nums]
        orphan = partial(self._release_late, request, w.day, w.month)
        if self._direct is not None:
            packed = b"".join(
                (
                    binding.admit_head,
                    bulk(now_arg.encode()),
                    bulk(deadline.encode()),
                    bulk(rid.encode()),
                    binding.admit_template_bulk,
                    bulk(nums.encode()),
                )
            )
            raw = await self._call(
                partial(self._direct.call, packed, _source(self._admit)), None, None, on_orphan=orphan
            )
        else:
            raw = await self._call(self._admit, binding.keys, args, on_orphan=orphan)
        if raw is None:
            return self._degraded(request, binding.budget_keys)
        self._learn_offset(raw[1])
        if raw[0] == -1:
            # Past its deadline by Redis's clock although we were still waiting: our estimate of the
            # clock offset was wrong (it is corrected now). Nothing was consumed; fail open this once.
            self._expired += 1
            return self._degraded(request, binding.budget_keys)
        return self._admission(request, raw, binding, w.day, w.month)

    def _deadline(self, now: int) -> str:
        """The admission's deadline on Redis's clock: our send time plus the call's bound, shifted by
        the clock offset last observed (a lower bound, so the deadline errs early by at most a round
        trip), less a few milliseconds of rounding: a script that runs after the caller gave up never
        takes anything. Unknown before the first answer (no deadline), and unneeded on a test clock (the
        script then uses our clock)."""
        if self._offset_ms is None or self._test_clock is not None:
            return ""
        return str(now + self._offset_ms + self._timeout_ms - self._deadline_slack_ms)

    async def _learn_clock(self) -> None:
        """Redis TIME, asked at the first admission, so admissions carry a deadline from then on."""
        raw = await self._call(
            self._client.time if self._direct is None else partial(self._direct.call, _TIME), None, None
        )
        if raw and self._offset_ms is None:
            seconds, micros = raw
            self._learn_offset(int(seconds) * 1000 + int(micros) // 1000)

    def _clock_probed(self, task: asyncio.Future[None]) -> None:
        self._background.discard(task)
        if self._offset_ms is None:
            self._clock_probe = None  # failed (Redis away): the next admission asks again

    def _learn_offset(self, redis_now: int) -> None:
        if self._test_clock is None:
            # Redis's time at execution minus ours at the answer: <= the true offset.
            self._offset_ms = int(redis_now) - wall_clock_ms()

    async def reconcile(self, ticket: Ticket, usage: Usage) -> Reconciliation:
        if ticket.local:
            return msgspec.structs.replace(self._local.reconcile_now(ticket, usage), degraded=True)
        if not self._breaker.allow():
            self._skipped += 1
            return Reconciliation(applied=False, degraded=True)
        call_keys, args = self._reconcile_call([(ticket, usage)], self._clock())
        raw = await self._script_call(self._reconcile, call_keys, args)
        if raw is None:
            # Slots and reservations expire with their lease; token debt stays (conservative).
            return Reconciliation(applied=False, degraded=True)
        return Reconciliation(applied=bool(raw[1]))

    async def reconcile_many(self, items: Sequence[tuple[Ticket, Usage]]) -> int:
        applied = 0
        # One script call per tenant (its keys share one hash slot); a batch of one tenant is one call.
        groups: dict[str, list[tuple[Ticket, Usage]]] = {}
        for ticket, usage in items:
            if ticket.local:
                applied += self._local.reconcile_now(ticket, usage).applied
            else:
                groups.setdefault(ticket.request.tenant, []).append((ticket, usage))
        if not groups:
            return applied
        if not self._breaker.allow():
            self._skipped += 1
            return applied
        now = self._clock()
        calls = [self._reconcile_call(group, now) for group in groups.values()]
        if len(calls) == 1 or self._direct is None:
            # Cluster: each tenant's keys live in its own slot, maybe on another node; one call each.
            for call_keys, args in calls:
                raw = await self._script_call(self._reconcile, call_keys, args)
                applied += sum(raw[1:]) if raw else 0
            return applied
        results = await self._call(partial(self._reconcile_batch, calls), None, None)
        return applied + sum(sum(raw[1:]) for raw in results or ())

    async def _reconcile_batch(self, calls: list[tuple[list[str], list[str | int]]]) -> list[Any]:
        """Several tenants' reconcile calls in one round trip (one Redis)."""
        assert self._direct is not None
        sha = self._reconcile.sha
        commands = [pack(["EVALSHA", sha, len(keys), *keys, *args]) for keys, args in calls]
        replies = await self._direct.call_many(commands, _source(self._reconcile))
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    def _reconcile_call(self, items: Sequence[tuple[Ticket, Usage]], now: int) -> tuple[list[str], list[str | int]]:
        """One tenant's tickets as one reconcile.lua call (see the script for the argument layout)."""
        templates: dict[str, int] = {}
        call_keys: list[str] = []
        key_index: dict[str, int] = {}
        specs: list[str] = []
        for ticket, usage in items:
            request = ticket.request
            binding = self._bindings.get(
                request.limits, request.tenant, request.key, request.route, ticket.day, ticket.month
            )
            if not call_keys:
                call_keys.append(binding.state_key)
            index = templates.setdefault(binding.settle_template, len(templates) + 1)
            spec = (
                f"{index} {encode_id(request.request_id)} {usage.tokens - request.tokens} {usage.tokens} "
                f"{usage.cost_micro_usd}"
            )
            for key in binding.budget_keys:
                i = key_index.get(key)
                if i is None:
                    call_keys.append(key)
                    i = key_index[key] = len(call_keys)
                spec += f" {i}"
            specs.append(spec)
        args: list[str | int] = ["" if self._test_clock is None else now, len(templates), *templates, *specs]
        return call_keys, args

    async def renew(self, ticket: Ticket, lease_s: float) -> bool:
        if ticket.local:
            return self._local.renew_now(ticket, lease_s)
        if not self._breaker.allow():
            self._skipped += 1
            return False
        request = ticket.request
        binding = self._bindings.get(
            request.limits, request.tenant, request.key, request.route, ticket.day, ticket.month
        )
        lease = max(1, int(lease_s * 1000))
        now = self._clock()
        args: list[str | int] = [
            "" if self._test_clock is None else now,
            binding.settle_template,
            encode_id(request.request_id),
            f"{lease} {ticket_ttl_ms(lease)}",
        ]
        raw = await self._script_call(self._renew, [binding.state_key], args)
        return bool(raw)

    async def ping(self) -> bool:
        """A real round trip whatever the breaker says (for readiness); its outcome feeds the breaker."""
        result = await self._call(
            self._client.ping if self._direct is None else partial(self._direct.call, _PING), None, None
        )
        return bool(result)

    async def check_epoch(self) -> bool:
        """`strait:epoch` holds a random id set by whichever replica finds it missing. Each replica
        remembers the id it last saw: a different one (or finding it missing again) means Redis lost its
        data (restarted without persistence) since then. The key has a TTL like every other, refreshed
        by each check, so it outlives any gap between checks by far. On Redis Cluster it lives on one
        node: a reset of another node alone goes unnoticed."""
        token = secrets.token_hex(8)

        async def exchange() -> Any:
            if self._direct is not None:
                return await self._direct.call_many(
                    [
                        pack(["SET", EPOCH_KEY, token, "NX", "PX", EPOCH_TTL_MS]),
                        pack(["GET", EPOCH_KEY]),
                        pack(["PEXPIRE", EPOCH_KEY, EPOCH_TTL_MS]),
                    ]
                )
            pipe = self._client.pipeline(transaction=False)
            pipe.set(EPOCH_KEY, token, nx=True, px=EPOCH_TTL_MS)
            pipe.get(EPOCH_KEY)
            pipe.pexpire(EPOCH_KEY, EPOCH_TTL_MS)
            return await pipe.execute()

        raw = await self._call(exchange, None, None)
        if raw is None:
            return False
        value = raw[1].decode() if isinstance(raw[1], bytes) else str(raw[1])
        previous, self._epoch = self._epoch, value
        return previous is not None and previous != value

    def status(self) -> StoreStatus:
        return StoreStatus(
            kind=self._kind,
            shared=True,
            breaker=self._breaker.state,
            failures=self._failures,
            skipped=self._skipped,
            saturated=self._saturated,
        )

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._direct is not None:
            await self._direct.close()
        await self._client.aclose()

    # -- plumbing ------------------------------------------------------------------------------------

    async def _script_call(self, script: AsyncScript, keys: list[str], args: list[str | int]) -> Any:
        """`_call` of a script, on our own connections when there is one Redis."""
        if self._direct is None:
            return await self._call(script, keys, args)
        packed = pack(["EVALSHA", script.sha, len(keys), *keys, *args])
        return await self._call(partial(self._direct.call, packed, _source(script)), None, None)

    async def _call(
        self,
        fn: Any,
        keys: list[str] | None,
        args: list[str | int] | None,
        on_orphan: Callable[[Any], None] | None = None,
    ) -> Any:
        """One call under the deadline; None when the store failed or was saturated (already counted).

        If the caller is cancelled mid-call (client gone, shutdown), `on_orphan` learns the late result
        (or `_UNKNOWN`) so an admission can give back what it took. On Redis Cluster the call runs in its
        own task shielded from the caller, because redis-py's cluster client mishandles a connection torn
        mid-command (other in-flight calls then fail and would trip the breaker); the orphan still ends
        within the deadline and reports its real outcome. On one Redis, redis-py drops a cancelled
        connection safely, so the ~30 us of a task per call is not spent: the release is best effort.
        """
        if not self._shield:
            try:
                return await self._attempt(fn, keys, args)
            except asyncio.CancelledError:
                if on_orphan is not None:
                    on_orphan(_UNKNOWN)
                raise
        task = asyncio.ensure_future(self._attempt(fn, keys, args))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            if on_orphan is not None:
                task.add_done_callback(lambda t: on_orphan(t.result()) if not t.cancelled() else None)
            raise

    async def _attempt(self, fn: Any, keys: list[str] | None, args: list[str | int] | None) -> Any:
        # The deadline covers waiting for one of `max_connections` in-flight slots too. Running out of
        # time mostly in that wait is this process's overload, not Redis failing: it fails open like an
        # outage but does not feed the breaker (else a flood of requests could switch the limiter off
        # for everyone). Redis is blamed when it had at least half the deadline to answer.
        loop = asyncio.get_running_loop()
        started = loop.time()
        in_redis_since = 0.0
        gate = self._inflight
        # `async with Deadline(...), gate:` spelled out: two async context managers cost four coroutines
        # a call, twice per request (admission, release); the same steps in the same order cost none.
        deadline = Deadline(self._timeout_s)
        deadline.arm()
        try:
            try:
                if not gate.enter_now():
                    await gate.enter()
                try:
                    in_redis_since = loop.time()
                    result = await (fn() if keys is None else fn(keys=keys, args=args))
                finally:
                    gate.leave()
            except BaseException as exc:
                deadline.disarm(type(exc), exc)
                raise
            deadline.disarm(None, None)
        except _FAILURES as exc:
            if isinstance(exc, TimeoutError) and self._direct is not None:
                # Redis did not answer in time: the pipelined connection is suspect (if still stuck, or if
                # every call on it was given up, also when this one mostly waited here for a slot).
                self._direct.reset(self._timeout_s / 2)
            if in_redis_since and (
                not isinstance(exc, TimeoutError) or loop.time() - in_redis_since >= self._timeout_s / 2
            ):
                self._failed(exc)
            else:
                self._saturated += 1
                self._breaker.abandon()
                log.debug("state store saturated: no connection within %.3fs", loop.time() - started)
            return None
        except asyncio.CancelledError:
            self._breaker.abandon()
            raise
        except Exception as exc:
            # A bug in the client library (seen: redis-py cluster races) must fail open, not fail the request.
            log.debug("state store call raised", exc_info=True)
            self._failed(exc)
            return None
        self._succeeded()
        return result

    def _release_late(self, request: AdmissionRequest, day: str, month: str, raw: Any) -> None:
        """An admission whose caller left: give back what it took (the request will never run).

        Reconcile is idempotent (only the call that deletes the ticket books), so releasing an admission
        that never ran, or was denied, is a harmless no-op.
        """
        if (raw is _UNKNOWN or (raw and raw[0] == 1)) and request.limits.needs_ticket:
            ticket = Ticket(request=request, day=day, month=month)
            task = asyncio.ensure_future(self.reconcile(ticket, Usage(tokens=0)))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _failed(self, exc: BaseException) -> None:
        self._failures += 1
        if self._breaker.failure():
            log.warning(
                "state store %s unreachable (%s: %s): rate limits fail open, budgets use the local share",
                self._kind,
                type(exc).__name__,
                exc,
            )

    def _succeeded(self) -> None:
        if self._breaker.state != "closed":
            log.warning("state store %s reachable again", self._kind)
        self._breaker.success()

    def _admission(
        self, request: AdmissionRequest, raw: list[int], binding: Binding, day: str, month: str
    ) -> Admission:
        checks: list[CheckResult] = []
        i = 2
        for limit in binding.all_limits:
            checks.append(
                CheckResult(
                    limit=limit,
                    allowed=raw[i] == 1,
                    remaining=raw[i + 1],
                    reset_ms=raw[i + 2],
                    retry_after_ms=raw[i + 3],
                    fits=raw[i + 4] == 1,
                )
            )
            i += 5
        budget_keys = binding.budget_keys
        if budget_keys:
            if len(self._seen) > _SEEN_MAX:
                self._seen.clear()
            for key, check in zip(budget_keys, checks[-len(budget_keys) :], strict=True):
                self._seen[key] = check.remaining
        allowed = raw[0] == 1
        ticket = Ticket(request=request, day=day, month=month) if allowed and request.limits.needs_ticket else None
        return Admission(allowed=allowed, checks=tuple(checks), ticket=ticket)

    def _degraded(self, request: AdmissionRequest, budget_keys: tuple[str, ...]) -> Admission:
        """Fail open on rates and slots; budgets against this replica's share of what Redis last reported."""
        if not request.limits.budgets:
            return Admission(allowed=True, degraded=True)
        shares = tuple(self._local_share(b, key) for b, key in zip(request.limits.budgets, budget_keys, strict=True))
        local = msgspec.structs.replace(request, limits=Limits(budgets=shares))
        result = self._local.admit_now(local)
        ticket = msgspec.structs.replace(result.ticket, local=True) if result.ticket is not None else None
        return msgspec.structs.replace(result, degraded=True, ticket=ticket)

    def _local_share(self, budget: BudgetLimit, key: str) -> BudgetLimit:
        remaining = self._seen.get(key, budget.limit)
        return msgspec.structs.replace(budget, limit=max(0, min(remaining, budget.limit)) // self._replicas)
