"""Identifier encoding, the MemoryStore's key names, and the UTC calendar windows budgets are counted in.

The Redis store's data layout (version 2, one state hash per tenant) is in `layout.py`; the names below
are the version 1 layout, still used as the MemoryStore's dictionary keys.

Every key of a tenant starts with `strait:{t:<tenant>}`: the braces are a Redis Cluster hash tag, so all
keys one admission touches (key, tenant and tenant+route limits) live in one slot and one Lua script can
read and write them atomically. Identifiers are percent-encoded, so a `:`, `{` or `}` in a tenant, key,
route or request id can neither break the hash tag nor make two different keys collide.

    strait:{t:<tenant>}:gcra:<scope>:<req|tok>:<period_s>   "<debt> <at_ms>"          GCRA state
    strait:{t:<tenant>}:cc:<scope>                          zset request id -> expiry  concurrency slots
    strait:{t:<tenant>}:bud:<bscope>:<usd|tokens>:<window>  hash spent, rsv            budget counters
    strait:{t:<tenant>}:bud:...:<window>:rsv                zset "<id> <amount>" -> expiry  live reservations
    strait:{t:<tenant>}:tk:<request id>                     "1"                        un-reconciled ticket

with <scope> = `k:<key>` | `t` | `r:<route>`, <bscope> = `k:<key>` | `t`, <window> = `2026-11-28` | `2026-11`.
"""

from __future__ import annotations

import datetime as dt
import functools
from urllib.parse import quote

import msgspec

from gateway.state.base import AdmissionRequest, BudgetLimit, Limits, RateLimit

PREFIX = "strait"
# Budget counters outlive their window by this much, so a late reconcile still lands in its window.
BUDGET_GRACE_MS = 2 * 86_400_000


_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _enc(value: str) -> str:
    # Most identifiers are already safe; checking is several times cheaper than quoting.
    return value if _SAFE.issuperset(value) else quote(value, safe="")


def tenant_tag(tenant: str) -> str:
    return f"{PREFIX}:{{t:{_enc(tenant)}}}"


class RequestKeys(msgspec.Struct, frozen=True, kw_only=True):
    rates: tuple[str, ...]
    slots: tuple[str, ...]
    budgets: tuple[str, ...]
    reservations: tuple[str, ...]
    ticket: str


def request_keys(request: AdmissionRequest, day: str, month: str) -> RequestKeys:
    rates, slots, budgets, reservations, tag = _shared_keys(
        request.limits, request.tenant, request.key, request.route, day, month
    )
    return RequestKeys(
        rates=rates,
        slots=slots,
        budgets=budgets,
        reservations=reservations,
        ticket=f"{tag}:tk:{_enc(request.request_id)}",
    )


# The keys every request of one (limits, tenant, key, route, window) shares: computed once, not twice
# per request (admit and reconcile). Bounded: the policy names the tenants, keys and routes, and only
# the current windows are asked for.
@functools.lru_cache(maxsize=4096)
def _shared_keys(
    limits: Limits, tenant: str, key: str, route: str, day: str, month: str
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...], str]:
    tag = tenant_tag(tenant)
    ids = {"tenant": "t", "key": f"k:{_enc(key)}", "route": f"r:{_enc(route)}"}
    budgets = tuple(
        f"{tag}:bud:{ids[b.scope]}:{b.metric}:{day if b.window == 'day' else month}" for b in limits.budgets
    )
    rates = tuple(
        f"{tag}:gcra:{ids[r.scope]}:{'req' if r.unit == 'requests' else 'tok'}:{r.period_s}" for r in limits.rates
    )
    slots = tuple(f"{tag}:cc:{ids[c.scope]}" for c in limits.concurrency)
    return rates, slots, budgets, tuple(f"{b}:rsv" for b in budgets), tag


def rate_cost(rate: RateLimit, request: AdmissionRequest) -> int:
    return 1 if rate.unit == "requests" else request.tokens


def budget_amount(budget: BudgetLimit, tokens: int, cost_micro_usd: int) -> int:
    return cost_micro_usd if budget.metric == "usd" else tokens


class Windows(msgspec.Struct, frozen=True):
    day: str
    month: str
    day_end_ms: int
    month_end_ms: int


def windows_at(now_ms: int) -> Windows:
    """The UTC day and month containing `now_ms`, with the epoch ms at which each ends."""
    t = dt.datetime.fromtimestamp(now_ms / 1000, dt.UTC)
    day_start = dt.datetime(t.year, t.month, t.day, tzinfo=dt.UTC)
    next_month = dt.datetime(t.year + t.month // 12, t.month % 12 + 1, 1, tzinfo=dt.UTC)
    return Windows(
        day=f"{t.year:04d}-{t.month:02d}-{t.day:02d}",
        month=f"{t.year:04d}-{t.month:02d}",
        day_end_ms=int((day_start + dt.timedelta(days=1)).timestamp() * 1000),
        month_end_ms=int(next_month.timestamp() * 1000),
    )


def window_end_ms(budget: BudgetLimit, day: str, month: str) -> int:
    """When the window a ticket reserved in ends (from its name, so reconcile needs no clock agreement)."""
    if budget.window == "day":
        y, m, d = (int(p) for p in day.split("-"))
        end = dt.datetime(y, m, d, tzinfo=dt.UTC) + dt.timedelta(days=1)
    else:
        y, m = (int(p) for p in month.split("-"))
        end = dt.datetime(y + m // 12, m % 12 + 1, 1, tzinfo=dt.UTC)
    return int(end.timestamp() * 1000)


class Calendar:
    """`windows_at` with a one-entry cache: the answer only changes at UTC midnight."""

    __slots__ = ("_cached",)

    def __init__(self) -> None:
        self._cached: tuple[int, Windows] | None = None

    def at(self, now_ms: int) -> Windows:
        cached = self._cached
        if cached is not None and cached[0] <= now_ms < cached[1].day_end_ms:
            return cached[1]
        w = windows_at(now_ms)
        self._cached = (now_ms - now_ms % 86_400_000, w)
        return w
