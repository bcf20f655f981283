"""Token accounting: a usage record per request and per upstream attempt, written idempotently to a
ledger (Redis Stream + per-day aggregates, or in-process), batched in the background, spooled to
disk while the ledger is unreachable and replayed exactly once when it returns."""
