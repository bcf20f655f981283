"""The Redis store's data layout (version 2) and the script arguments one (limits, tenant, key, route,
day) binds to, built once and memoised so a request only fills in its numbers.

Everything one admission or reconcile touches is a field of ONE hash per tenant, plus one small hash
per budget window (its spent counter), all under the tenant's hash tag `strait:{t:<tenant>}` (one Redis
Cluster slot). An admission is then one HMGET, one HGET per budget and one HSET (Lua-internal commands
included), where version 1 spent ~19 commands on a string per rate, a zset per concurrency scope, a
hash + zset per budget and a string per ticket.

    strait:{t:<tenant>}:v2:st                                  hash, the tenant's live state:
        g|<sid>|<req|tok>|<period_s>   "<debt> <at_ms> <expiry_ms>"  GCRA state (gcra.py; expired = absent)
        c|<sid>                        holders of concurrency scope <sid> (= its live h| fields)
        h|<sid>|<rid>                  "<lease expiry ms>"            a held concurrency slot
        v|<bname>                      reserved sum of budget window <bname> (= its live r| fields)
        r|<bname>|<rid>                "<amount> <lease expiry ms>"   a budget reservation
        t|<rid>                        "<expiry ms>"                  an un-reconciled ticket
        n                              no h|, r| or t| field expires before this (swept when passed)
        x                              the hash's own expiry as last set (PEXPIRE only when it must grow)
    strait:{t:<tenant>}:v2:bud:<bscope>:<usd|tokens>:<window>  hash {s: spent}; TTL window end + grace

with <sid> = `t` | `k:<key>` | `r:<route>`, <bname> = `<t|k:<key>>|<usd|tokens>|<2026-11-28|2026-11>` and
identifiers (key, route, request id) percent-encoded, so `|`, `:`, `{` and `}` never occur inside them.

Expired slots, reservations and tickets (a dead replica's orphans) stay in the hash until `n` passes;
then the next script reads the whole hash once, drops them and recounts `c|` and `v|` (`prelude.lua`).
Since `n` is never later than the earliest such expiry, counts read while `n` is in the future are the
exact live counts: the same numbers MemoryStore computes (the model and contract tests compare them).

Rolling upgrade: version 1 replicas (`...:gcra:`, `...:cc:`, `...:bud:`, `...:tk:` keys) and version 2
replicas do not see each other's state; while both run, each set enforces its own limits (up to twice
the limit for the length of the rollout). Version 1 keys expire by themselves.
"""

from __future__ import annotations

from typing import Final

from gateway.state.base import Limit, Limits
from gateway.state.keys import BUDGET_GRACE_MS, _enc, tenant_tag, window_end_ms
from gateway.state.scripts import bulk

VERSION: Final = "v2"


def state_key(tenant: str) -> str:
    return f"{tenant_tag(tenant)}:{VERSION}:st"


def encode_id(value: str) -> str:
    """A request id as it appears inside field names (percent-encoded like every identifier)."""
    return _enc(value)


def _head(sha: str, keys: list[str], n_args: int) -> bytes:
    """`EVALSHA sha numkeys keys...` in RESP, for a command that has `n_args` arguments after the keys."""
    items = ["EVALSHA", sha, str(len(keys)), *keys]
    return b"*%d\r\n" % (len(items) + n_args) + b"".join(bulk(i.encode()) for i in items)


class Binding:
    """Everything about one (limits, tenant, key, route, day) that does not change per request.

    `admit_template` (space-separated, parsed by admit.lua):
        min_ttl_ms nr nc nb, per rate: field tokens?(0|1) limit period_ms capacity,
        per concurrency scope: sid limit, per budget: bname tokens?(0|1) limit window_end_ms
    `settle_template` (reconcile.lua and renew.lua):
        min_ttl_ms nt nc nb, per token rate: field limit period_ms, per concurrency scope: sid,
        per budget: bname tokens?(0|1) grace_end_ms (the window's end + grace, epoch ms)
    """

    __slots__ = (
        "admit_head",
        "admit_template",
        "admit_template_bulk",
        "all_limits",
        "budget_keys",
        "keys",
        "limits",
        "settle_template",
        "state_key",
    )

    def __init__(
        self, limits: Limits, tenant: str, key: str, route: str, day: str, month: str, min_ttl_ms: int, admit_sha: str
    ):
        # Held so the memo's `id(limits)` cannot be reused by another object while this entry lives.
        self.limits = limits
        tag = tenant_tag(tenant)
        sids = {"tenant": "t", "key": f"k:{_enc(key)}", "route": f"r:{_enc(route)}"}
        self.state_key = f"{tag}:{VERSION}:st"
        admit: list[object] = [min_ttl_ms, len(limits.rates), len(limits.concurrency), len(limits.budgets)]
        token_rates: list[object] = []
        for r in limits.rates:
            field = f"g|{sids[r.scope]}|{'req' if r.unit == 'requests' else 'tok'}|{r.period_s}"
            admit += (field, int(r.unit == "tokens"), r.limit, r.period_ms, r.capacity)
            if r.unit == "tokens":
                token_rates += (field, r.limit, r.period_ms)
        conc: list[object] = []
        for c in limits.concurrency:
            admit += (sids[c.scope], c.limit)
            conc.append(sids[c.scope])
        budget_keys: list[str] = []
        settle_budgets: list[object] = []
        for b in limits.budgets:
            window = day if b.window == "day" else month
            bid = sids[b.scope]
            budget_keys.append(f"{tag}:{VERSION}:bud:{bid}:{b.metric}:{window}")
            end = window_end_ms(b, day, month)
            bname = f"{bid}|{b.metric}|{window}"
            admit += (bname, int(b.metric == "tokens"), b.limit, end)
            settle_budgets += (bname, int(b.metric == "tokens"), end + BUDGET_GRACE_MS)
        self.admit_template = " ".join(map(str, admit))
        settle: list[object] = [min_ttl_ms, len(token_rates) // 3, len(conc), len(limits.budgets)]
        self.settle_template = " ".join(map(str, [*settle, *token_rates, *conc, *settle_budgets]))
        self.budget_keys: tuple[str, ...] = tuple(budget_keys)
        self.keys: list[str] = [self.state_key, *budget_keys]
        # The admission's EVALSHA in RESP up to its per-request arguments (now, deadline, request id),
        # and the template as a bulk string: a request packs only its own few bytes.
        self.admit_head = _head(admit_sha, self.keys, n_args=5)
        self.admit_template_bulk = bulk(self.admit_template.encode())
        self.all_limits: tuple[Limit, ...] = (*limits.rates, *limits.concurrency, *limits.budgets)


class Bindings:
    """The memo: one `Binding` per (Limits object, tenant, key, route, day). Limits objects are built
    once per policy version (the limits stage memoises them), so their identity is a stable, cheap key;
    a new policy brings new objects and new entries. Cleared whole when it grows past `max_entries`
    (days roll over, keys come and go)."""

    __slots__ = ("_admit_sha", "_max", "_memo", "_min_ttl_ms")

    def __init__(self, min_ttl_ms: int, admit_sha: str, max_entries: int = 20_000) -> None:
        self._min_ttl_ms = min_ttl_ms
        self._admit_sha = admit_sha
        self._max = max_entries
        self._memo: dict[tuple[int, str, str, str, str], Binding] = {}

    def get(self, limits: Limits, tenant: str, key: str, route: str, day: str, month: str) -> Binding:
        memo_key = (id(limits), tenant, key, route, day)
        found = self._memo.get(memo_key)
        if found is not None and found.limits is limits:
            return found
        if len(self._memo) >= self._max:
            self._memo.clear()
        binding = self._memo[memo_key] = Binding(
            limits, tenant, key, route, day, month, self._min_ttl_ms, self._admit_sha
        )
        return binding
