"""The in-process store: the embedded default for a single replica, and the Redis store's local fallback.

Same contract and same arithmetic as the Redis scripts (GCRA from `gcra.py`), on plain dicts. Every
method runs without an `await` in between reads and writes, so an admission is atomic on the event
loop. Expiry mirrors Redis TTLs on the injected clock; expired entries are dropped lazily on access
and by a periodic sweep, so memory stays bounded by live state, not by history.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from gateway.state import gcra
from gateway.state.base import (
    Admission,
    AdmissionRequest,
    CheckResult,
    Clock,
    Reconciliation,
    StoreStatus,
    Ticket,
    Usage,
)
from gateway.state.keys import (
    BUDGET_GRACE_MS,
    Calendar,
    budget_amount,
    rate_cost,
    request_keys,
    window_end_ms,
)

# A denied concurrency check suggests a retry within this long (slots free when requests end, unknowable).
SLOT_RETRY_HINT_MS = 1000
_SWEEP_INTERVAL_MS = 10_000


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def ticket_ttl_ms(lease_ms: int) -> int:
    """A ticket outlives its lease, so a late reconcile still books the actual spend exactly once."""
    return 2 * lease_ms + 60_000


class _Budget:
    __slots__ = ("expires_at", "next_expiry", "reservations", "rsv", "spent")

    def __init__(self, expires_at: int) -> None:
        self.spent = 0
        self.rsv = 0
        self.expires_at = expires_at
        # request id -> (amount, expiry)
        self.reservations: dict[str, tuple[int, int]] = {}
        self.next_expiry = 0

    def purge(self, now: int) -> None:
        if not self.reservations or now < self.next_expiry:
            return
        live: dict[str, tuple[int, int]] = {}
        for rid, (amount, expiry) in self.reservations.items():
            if expiry <= now:
                self.rsv -= amount
            else:
                live[rid] = (amount, expiry)
        self.reservations = live
        self.next_expiry = min((e for _, e in live.values()), default=0)

    def reserve(self, rid: str, amount: int, expiry: int) -> None:
        if rid in self.reservations:  # admitting the same request id twice must not reserve twice
            return
        self.rsv += amount
        self.reservations[rid] = (amount, expiry)
        if not self.next_expiry or expiry < self.next_expiry:
            self.next_expiry = expiry


class _Slots:
    """One concurrency key: request id -> lease expiry, purged only once the earliest lease has passed."""

    __slots__ = ("held", "next_expiry")

    def __init__(self) -> None:
        self.held: dict[str, int] = {}
        self.next_expiry = 0

    def purge(self, now: int) -> None:
        if not self.held or now < self.next_expiry:
            return
        self.held = {rid: e for rid, e in self.held.items() if e > now}
        self.next_expiry = min(self.held.values(), default=0)

    def hold(self, rid: str, expiry: int) -> None:
        self.held[rid] = max(expiry, self.held.get(rid, 0))
        if not self.next_expiry or expiry < self.next_expiry:
            self.next_expiry = expiry


class MemoryStore:
    """Per-process limits. `shared` is False: with several replicas each would enforce its own limits."""

    def __init__(self, *, clock: Clock = wall_clock_ms, min_ttl_ms: int = 1000) -> None:
        self._clock = clock
        self._min_ttl_ms = min_ttl_ms
        self._calendar = Calendar()
        # GCRA state and its expiry; concurrency slots: key -> request id -> expiry.
        self._gcra: dict[str, tuple[gcra.GcraState, int]] = {}
        self._slots: dict[str, _Slots] = {}
        self._budgets: dict[str, _Budget] = {}
        self._tickets: dict[str, int] = {}
        self._next_sweep = 0

    # -- the contract -------------------------------------------------------------------------------

    async def admit(self, request: AdmissionRequest) -> Admission:
        return self.admit_now(request)

    async def reconcile(self, ticket: Ticket, usage: Usage) -> Reconciliation:
        return self.reconcile_now(ticket, usage)

    async def reconcile_many(self, items: Sequence[tuple[Ticket, Usage]]) -> int:
        return sum(1 for ticket, usage in items if self.reconcile_now(ticket, usage).applied)

    async def renew(self, ticket: Ticket, lease_s: float) -> bool:
        return self.renew_now(ticket, lease_s)

    async def ping(self) -> bool:
        return True

    async def check_epoch(self) -> bool:
        return False  # lives and dies with this process

    def status(self) -> StoreStatus:
        return StoreStatus(kind="memory", shared=False)

    async def close(self) -> None:
        self._gcra.clear()
        self._slots.clear()
        self._budgets.clear()
        self._tickets.clear()

    # -- synchronous bodies (also called by the Redis store's local fallback) ----------------------

    def admit_now(self, request: AdmissionRequest) -> Admission:
        now = self._clock()
        self._maybe_sweep(now)
        limits = request.limits
        w = self._calendar.at(now)
        keys = request_keys(request, w.day, w.month)
        checks: list[CheckResult] = []
        allowed = True

        new_states: list[tuple[str, gcra.GcraState, int]] = []
        for rate, key in zip(limits.rates, keys.rates, strict=True):
            entry = self._gcra.get(key)
            state = entry[0] if entry is not None and entry[1] > now else None
            d = gcra.decide(
                state, now, rate_cost(rate, request), limit=rate.limit, period_ms=rate.period_ms, capacity=rate.capacity
            )
            checks.append(
                CheckResult(
                    limit=rate,
                    allowed=d.allowed,
                    remaining=d.remaining,
                    reset_ms=d.reset_ms,
                    retry_after_ms=d.retry_after_ms,
                    fits=d.fits,
                )
            )
            allowed = allowed and d.allowed
            if d.new_state is not None:
                new_states.append((key, d.new_state, rate.limit))

        for cc, key in zip(limits.concurrency, keys.slots, strict=True):
            slots = self._live_slots(key, now)
            used = len(slots.held) if slots is not None else 0
            ok = used < cc.limit
            retry = 0
            if not ok:
                # Denials are the rare path: the exact earliest lease (next_expiry may be stale-early).
                first = min(slots.held.values()) if slots is not None else now + SLOT_RETRY_HINT_MS
                retry = min(SLOT_RETRY_HINT_MS, first - now)
            checks.append(
                CheckResult(
                    limit=cc,
                    allowed=ok,
                    remaining=max(0, cc.limit - used - ok),
                    reset_ms=0,
                    retry_after_ms=retry if cc.limit > 0 else 0,
                    fits=cc.limit > 0,
                )
            )
            allowed = allowed and ok

        budgets: list[tuple[str, _Budget | None, int, int]] = []
        for b, key in zip(limits.budgets, keys.budgets, strict=True):
            bud = self._live_budget(key, now)
            amount = budget_amount(b, request.tokens, request.cost_micro_usd)
            left = b.limit - (bud.spent + bud.rsv if bud is not None else 0)
            ok = amount <= left
            end = w.day_end_ms if b.window == "day" else w.month_end_ms
            checks.append(
                CheckResult(
                    limit=b,
                    allowed=ok,
                    remaining=left - amount if ok else left,
                    reset_ms=end - now,
                    retry_after_ms=0 if ok else end - now,
                    fits=amount <= b.limit,
                )
            )
            allowed = allowed and ok
            budgets.append((key, bud, amount, end))

        if not allowed:
            return Admission(allowed=False, checks=tuple(checks))

        # Every check passed: consume all of them (nothing above wrote).
        for key, state, limit in new_states:
            self._gcra[key] = (state, now + gcra.ttl_ms(state, limit, self._min_ttl_ms))
        lease = request.lease_ms
        for key in keys.slots:
            held = self._slots.get(key)
            if held is None:
                held = self._slots[key] = _Slots()
            held.hold(request.request_id, now + lease)
        for key, bud, amount, end in budgets:
            if amount <= 0:
                continue
            if bud is None:
                bud = self._budgets[key] = _Budget(end + BUDGET_GRACE_MS)
            bud.reserve(request.request_id, amount, now + lease)
        ticket = None
        if limits.needs_ticket:
            self._tickets[keys.ticket] = now + ticket_ttl_ms(lease)
            ticket = Ticket(request=request, day=w.day, month=w.month)
        return Admission(allowed=True, checks=tuple(checks), ticket=ticket)

    def reconcile_now(self, ticket: Ticket, usage: Usage) -> Reconciliation:
        now = self._clock()
        request = ticket.request
        rid = request.request_id
        keys = request_keys(request, ticket.day, ticket.month)
        expiry = self._tickets.pop(keys.ticket, None)
        for key in keys.slots:
            slots = self._slots.get(key)
            if slots is not None:
                slots.held.pop(rid, None)
        if expiry is None or expiry <= now:
            return Reconciliation(applied=False)

        delta = usage.tokens - request.tokens
        for rate, key in zip(request.limits.rates, keys.rates, strict=True):
            if rate.unit != "tokens" or not delta:
                continue
            entry = self._gcra.get(key)
            state = entry[0] if entry is not None and entry[1] > now else None
            new = gcra.adjust(state, now, delta, limit=rate.limit, period_ms=rate.period_ms)
            if new is None:
                self._gcra.pop(key, None)
            else:
                self._gcra[key] = (new, now + gcra.ttl_ms(new, rate.limit, self._min_ttl_ms))

        for b, key in zip(request.limits.budgets, keys.budgets, strict=True):
            bud = self._live_budget(key, now)
            if bud is not None and rid in bud.reservations:
                bud.rsv -= bud.reservations.pop(rid)[0]
            actual = budget_amount(b, usage.tokens, usage.cost_micro_usd)
            if actual <= 0:
                continue
            if bud is None:
                expires = window_end_ms(b, ticket.day, ticket.month) + BUDGET_GRACE_MS
                if expires <= now:
                    continue
                bud = self._budgets[key] = _Budget(expires)
            bud.spent += actual
        return Reconciliation(applied=True)

    def renew_now(self, ticket: Ticket, lease_s: float) -> bool:
        now = self._clock()
        request = ticket.request
        rid = request.request_id
        keys = request_keys(request, ticket.day, ticket.month)
        expiry = self._tickets.get(keys.ticket)
        if expiry is None or expiry <= now:
            return False
        lease = max(1, int(lease_s * 1000))
        self._tickets[keys.ticket] = max(expiry, now + ticket_ttl_ms(lease))
        until = now + lease
        for key in keys.slots:
            slots = self._live_slots(key, now)
            if slots is not None and rid in slots.held:
                slots.hold(rid, until)
        for key in keys.budgets:
            bud = self._live_budget(key, now)
            if bud is not None and rid in bud.reservations:
                amount, old = bud.reservations[rid]
                bud.reservations[rid] = (amount, max(old, until))
        return True

    # -- views used by tests and the fallback --------------------------------------------------------

    def budget_totals(self, key: str) -> tuple[int, int]:
        """(spent, reserved) of one budget key, as the scripts would read them."""
        bud = self._live_budget(key, self._clock())
        return (bud.spent, bud.rsv) if bud is not None else (0, 0)

    def live_keys(self) -> int:
        now = self._clock()
        self._sweep(now)
        return len(self._gcra) + len(self._slots) + len(self._budgets) + len(self._tickets)

    # -- expiry --------------------------------------------------------------------------------------

    def _live_slots(self, key: str, now: int) -> _Slots | None:
        slots = self._slots.get(key)
        if slots is None:
            return None
        slots.purge(now)
        if not slots.held:
            del self._slots[key]
            return None
        return slots

    def _live_budget(self, key: str, now: int) -> _Budget | None:
        bud = self._budgets.get(key)
        if bud is None:
            return None
        if bud.expires_at <= now:
            del self._budgets[key]
            return None
        bud.purge(now)
        return bud

    def _maybe_sweep(self, now: int) -> None:
        if now >= self._next_sweep:
            self._sweep(now)
            self._next_sweep = now + _SWEEP_INTERVAL_MS

    def _sweep(self, now: int) -> None:
        self._gcra = {k: v for k, v in self._gcra.items() if v[1] > now}
        for key in list(self._slots):
            self._live_slots(key, now)
        for key in list(self._budgets):
            self._live_budget(key, now)
        self._tickets = {k: e for k, e in self._tickets.items() if e > now}
