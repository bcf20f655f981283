"""The Redis store's v2 layout: key names, script templates, and the memo that builds them once."""

from __future__ import annotations

from gateway.state import Limits
from gateway.state.layout import Bindings
from tests.state.helpers import budget, rpm, slots, tpm

LIMITS = Limits(
    rates=(rpm(100, "key"), tpm(5_000, "tenant")),
    concurrency=(slots(3, "route"),),
    budgets=(budget(2_000_000, "tenant"), budget(9_000, "key", "tokens", "month")),
)


def test_a_binding_names_every_key_and_field_of_one_request_shape() -> None:
    b = Bindings(min_ttl_ms=1000, admit_sha="0" * 40).get(LIMITS, "a}{b", "k:1", "chat/v1", "2026-11-24", "2026-11")
    tag = "strait:{t:a%7D%7Bb}"  # braces encoded: the hash tag cannot be broken out of
    assert b.keys == [f"{tag}:v2:st", f"{tag}:v2:bud:t:usd:2026-11-24", f"{tag}:v2:bud:k:k%3A1:tokens:2026-11"]
    assert b.budget_keys == tuple(b.keys[1:])
    day_end, month_end = 1_795_564_800_000, 1_796_083_200_000  # 2026-11-25 and 2026-12-01, 00:00 UTC
    head = ["1000", "2", "1", "2"]
    rates = ["g|k:k%3A1|req|60", "0", "100", "60000", "100", "g|t|tok|60", "1", "5000", "60000", "5000"]
    budgets = ["t|usd|2026-11-24", "0", "2000000", str(day_end), "k:k%3A1|tokens|2026-11", "1", "9000", str(month_end)]
    assert b.admit_template.split() == [*head, *rates, "r:chat%2Fv1", "3", *budgets]
    grace = 2 * 86_400_000
    settle_budgets = [
        "t|usd|2026-11-24",
        "0",
        str(day_end + grace),
        "k:k%3A1|tokens|2026-11",
        "1",
        str(month_end + grace),
    ]
    assert b.settle_template.split() == [
        "1000",
        "1",
        "1",
        "2",
        "g|t|tok|60",
        "5000",
        "60000",
        "r:chat%2Fv1",
        *settle_budgets,
    ]
    assert b.all_limits == (*LIMITS.rates, *LIMITS.concurrency, *LIMITS.budgets)
    # The admission's EVALSHA header in RESP: 3 + 3 keys + 5 arguments.
    assert b.admit_head.startswith(b"*11\r\n$7\r\nEVALSHA\r\n$40\r\n" + b"0" * 40 + b"\r\n$1\r\n3\r\n")


def test_bindings_are_built_once_per_limits_object_and_request_shape() -> None:
    memo = Bindings(min_ttl_ms=1000, admit_sha="0" * 40, max_entries=3)
    first = memo.get(LIMITS, "acme", "k1", "chat", "2026-11-24", "2026-11")
    assert memo.get(LIMITS, "acme", "k1", "chat", "2026-11-24", "2026-11") is first
    # An equal but distinct Limits object (a reloaded policy) gets its own binding.
    reloaded = Limits(rates=LIMITS.rates, concurrency=LIMITS.concurrency, budgets=LIMITS.budgets)
    assert memo.get(reloaded, "acme", "k1", "chat", "2026-11-24", "2026-11") is not first
    assert memo.get(LIMITS, "acme", "k2", "chat", "2026-11-24", "2026-11") is not first
    # Bounded: the memo is cleared whole when full, and rebuilt on demand.
    rebuilt = memo.get(LIMITS, "acme", "k1", "chat", "2026-11-25", "2026-11")
    assert rebuilt is not first and rebuilt.keys[1].endswith("2026-11-25")
    assert memo.get(LIMITS, "acme", "k1", "chat", "2026-11-24", "2026-11") is not first
