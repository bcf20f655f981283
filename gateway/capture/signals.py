"""Implicit feedback the gateway sees itself, recorded on a captured request (beside a regenerate, which
the capture writer detects): a semantic-cache bad-hit report.

`POST /v1/cache/feedback` names a cache hit by the response id it was served with (`chatcmpl-<request
id>`): the cache drops the entry and raises its namespace's threshold (gateway.stages.cache), and, when
the request that was served the hit was captured for the same tenant, a `cache_bad_hit` feedback is
written on it, so an export leaves the hit's answer out of the chosen side and `compare` counts it.
"""

from __future__ import annotations

import time

from gateway.capture.records import Feedback
from gateway.capture.writer import CaptureWriter, feedback_id

CACHE_RESPONSE_PREFIX = "chatcmpl-"


async def record_cache_bad_hit(writer: CaptureWriter | None, tenant: str, key_id: str, served_id: str) -> str | None:
    """The captured request the bad hit was served to, now carrying a `cache_bad_hit` feedback; None when
    it was not captured (capture off, the tenant not consenting, or another tenant's id: tenant-scoped)."""
    if writer is None or not writer.enabled or not served_id.startswith(CACHE_RESPONSE_PREFIX):
        return None
    wanted = served_id.removeprefix(CACHE_RESPONSE_PREFIX)
    request_id = None
    for attempt in range(2):
        store = await writer.existing_store()
        if store is not None:
            request_id = await store.resolve(tenant, request_id=wanted)
        if request_id is not None or attempt:
            break
        # Its batch may not have landed yet (a report right after the hit): write what is queued first.
        await writer.flush()
    if request_id is None:
        return None
    await writer.add_feedback(
        Feedback(
            id=feedback_id(),
            request_id=request_id,
            tenant=tenant,
            ts_ms=int(time.time() * 1000),
            kind="cache_bad_hit",
            label="bad_cache_hit",
            key_id=key_id,
        )
    )
    return request_id
