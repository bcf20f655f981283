"""Calling upstreams: walking the plan with fallback, and normalising what comes back."""
