"""The OpenAI-compatible adapter keeps only the upstream headers a client may need."""

from __future__ import annotations

from plugins.openai_compat import _kept_headers


def test_provider_rate_limit_headers_are_not_kept() -> None:
    """x-ratelimit-* describe the gateway's provider account, not the tenant."""
    upstream = {
        "Content-Type": "application/json",
        "Retry-After": "3",
        "x-ratelimit-remaining-requests": "0",
        "X-RateLimit-Limit-Tokens": "150000",
        "server": "gpu-node-7.corp.internal",
        "openai-organization": "org-internal",
    }
    assert _kept_headers(upstream) == {"content-type": "application/json", "retry-after": "3"}
