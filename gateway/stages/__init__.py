"""Pipeline stages, each one job: auth, route, upstream (later: limits, cache, accounting)."""
