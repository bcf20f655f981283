"""The Learning loop page's document (/ui/loop, /admin/api/loop): what capture took in over the last day (from
the capture store, gateway.capture, the reader `strait datasets` uses), what this replica's capture writer
counted (strait_capture_records_total: queued, written, dropped, failed), the feedback on captured requests
per route and model, the routes' shadow copies by outcome (strait_shadow_requests_total), and for each route
with a shadow or canary in the running policy, live against the candidate over the same day: the numbers of
`strait datasets compare --route R --candidate M --json`, computed by the same function
(gateway.capture.compare.compare, within its own bounds).

Reading a day of captures is bounded: at most MAX_SCANNED records (the document says when it stopped there).
The comparisons read the route's day whole (compare keeps O(1) per record but the latencies, and at most
MAX_WAITING unpaired answers): they run in a worker thread, on their own event loop and their own
connection to the store, so normalising and scoring answers never holds the gateway's loop.
Nothing here shows a captured text: counts and scores only."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import msgspec

from gateway.api.console.alerting import Reader
from gateway.api.console.history import HOUR_S, Window
from gateway.capture.compare import Comparison, compare, prices_of
from gateway.capture.records import Captured
from gateway.capture.store import CaptureQuery, open_capture_store, scan
from gateway.policy.model import PolicySet, Price
from gateway.runtime import Gateway
from gateway.stages.capture import captures_any

log = logging.getLogger("strait.console")

DAY_MS = 86_400_000
MAX_SCANNED = 20_000


class CaptureVolume(msgspec.Struct, kw_only=True):
    tenant: str
    route: str
    records: int
    # Of those, answered with an error (captured too: status and outcome, no answer).
    failed: int


class FeedbackScores(msgspec.Struct, kw_only=True):
    route: str
    # The policy model that answered ("-" for a request no model answered).
    model: str
    records: int
    # Records with at least one feedback of any kind.
    with_feedback: int
    scores: int
    # Mean of `score` feedback (-10..10); None without any.
    mean_score: float | None
    thumbs_up: int
    thumbs_down: int
    regenerated: int
    corrections: int
    labels: int


class ShadowOutcomes(msgspec.Struct, kw_only=True):
    route: str
    outcomes: dict[str, int]


class Trial(msgspec.Struct, kw_only=True):
    route: str
    candidate: str
    # How the running policy tries the candidate on the route: "shadow", "canary" or "shadow+canary".
    kind: str
    # What `strait datasets compare --route R --candidate M --json` prints for the same day (its `as_dict`).
    comparison: dict[str, Any]


class Loop(msgspec.Struct, kw_only=True):
    # "off" (STRAIT_CAPTURE=off), "no_consent" (no tenant of the policy captures), "empty" (nothing stored
    # yet), "unreadable" (the store did not answer), or "on".
    capture: str
    store: str | None
    since_ms: int
    until_ms: int
    scanned: int
    # The day held more than MAX_SCANNED records: the figures cover the oldest MAX_SCANNED.
    truncated: bool
    volume: list[CaptureVolume]
    # Shadow copies' records among those scanned (not in volume or feedback: see trials).
    shadow_captured: int = 0
    feedback: list[FeedbackScores]
    # What the counters below cover (the last hour, or since this replica started).
    window: Window
    writer: dict[str, int]
    shadow: list[ShadowOutcomes]
    # Live vs candidate per route with a shadow or canary (empty without captures to compare).
    trials: list[Trial] = []
    # "ok", "none" (no route of the running policy has a shadow or canary), "no_captures" (capture off,
    # nothing stored, or the store unreadable: nothing to compare), or "failed" (the comparison raised).
    trials_state: str = "none"


class _Tally:
    """Counts of the captures seen so far; a record is folded in and let go (a day can hold large texts)."""

    def __init__(self) -> None:
        self.seen = 0
        self.copies = 0
        self.volume: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        self.scores: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0] * 9)

    def add(self, item: Captured) -> None:
        self.seen += 1
        r = item.record
        if r.shadow_of is not None:
            # A shadow copy's answer, stored beside its live record: not a request of the route, and nobody
            # rated it; live vs candidate (the trials) compares it.
            self.copies += 1
            return
        v = self.volume[(r.tenant, r.route)]
        v[0] += 1
        v[1] += r.status >= 400
        s = self.scores[(r.route, r.model or "-")]
        s[0] += 1
        s[1] += bool(item.feedback)
        for f in item.feedback:
            if f.kind == "score" and f.score is not None:
                s[2] += 1
                s[3] += f.score
            elif f.kind == "boolean":
                s[4 if (f.score or 0) > 0 else 5] += 1
            elif f.kind == "regenerate":
                s[6] += 1
            elif f.kind == "correction":
                s[7] += 1
            elif f.kind == "label":
                s[8] += 1

    def volumes(self) -> list[CaptureVolume]:
        return [CaptureVolume(tenant=t, route=r, records=n, failed=f) for (t, r), (n, f) in sorted(self.volume.items())]

    def feedback(self) -> list[FeedbackScores]:
        return [
            FeedbackScores(
                route=route,
                model=model,
                records=int(s[0]),
                with_feedback=int(s[1]),
                scores=int(s[2]),
                mean_score=round(s[3] / s[2], 2) if s[2] else None,
                thumbs_up=int(s[4]),
                thumbs_down=int(s[5]),
                regenerated=int(s[6]),
                corrections=int(s[7]),
                labels=int(s[8]),
            )
            for (route, model), s in sorted(self.scores.items())
        ]


def trials_of(policy: PolicySet) -> list[tuple[str, str, str]]:
    """(route, candidate, kind) for each route's shadow and canary; one entry when both name one model."""
    kinds: dict[tuple[str, str], list[str]] = defaultdict(list)
    for route in policy.routes:
        if route.shadow is not None:
            kinds[(route.name, route.shadow.model)].append("shadow")
        if route.canary is not None:
            kinds[(route.name, route.canary.model)].append("canary")
    return [(route, candidate, "+".join(k)) for (route, candidate), k in sorted(kinds.items())]


def compare_all(
    url: str, wanted: list[tuple[str, str, str]], prices: Mapping[str, Price], since_ms: int, until_ms: int
) -> list[Comparison]:
    """Each (route, candidate) compared over the window: run in a worker thread (its own loop and store)."""

    async def run() -> list[Comparison]:
        store = await open_capture_store(url)
        try:
            return [
                await compare(store, route, candidate, prices, since_ms=since_ms, until_ms=until_ms)
                for route, candidate, _ in wanted
            ]
        finally:
            await store.aclose()

    return asyncio.run(run())


async def loop(gateway: Gateway, read: Reader, *, now_ms: int | None = None) -> Loop:
    until_ms = int(time.time() * 1000) if now_ms is None else now_ms
    since_ms = until_ms - DAY_MS
    window, samples = read(HOUR_S)
    writer = {labels["result"]: int(v) for labels, v in samples.rows("strait_capture_records_total")}
    shadow: dict[str, dict[str, int]] = defaultdict(dict)
    for labels, v in samples.rows("strait_shadow_requests_total"):
        if v:
            shadow[labels["route"]][labels["outcome"]] = int(v)
    capture = gateway.services.capture
    state, kind, truncated = "on", None, False
    tally = _Tally()
    if capture is None or not capture.enabled:
        state = "off"
    else:
        try:
            store = await capture.existing_store()
            if store is None:
                state = "empty"
            else:
                kind = store.kind
                async for item in scan(store, CaptureQuery(since_ms=since_ms, until_ms=until_ms)):
                    if tally.seen >= MAX_SCANNED:
                        truncated = True
                        break
                    tally.add(item)
        except Exception:  # the console reports a store that does not answer; it does not fail the page
            log.warning("console: the capture store could not be read", exc_info=True)
            state = "unreadable"
        if state in ("on", "empty") and not tally.seen and not captures_any(gateway.runtime.index):
            state = "no_consent"
    policy = gateway.runtime.index.policy
    wanted = trials_of(policy)
    trials: list[Trial] = []
    trials_state = "none" if not wanted else "no_captures"
    if wanted and capture is not None and kind is not None and state in ("on", "no_consent"):
        try:
            found = await asyncio.to_thread(compare_all, capture.url, wanted, prices_of(policy), since_ms, until_ms)
        except Exception:  # said on the page; the rest of it stands
            log.warning("console: comparing live and candidate answers failed", exc_info=True)
            trials_state = "failed"
        else:
            trials_state = "ok"
            trials = [
                Trial(route=route, candidate=candidate, kind=how, comparison=c.as_dict())
                for (route, candidate, how), c in zip(wanted, found, strict=True)
            ]
    return Loop(
        capture=state,
        store=kind,
        since_ms=since_ms,
        until_ms=until_ms,
        scanned=tally.seen,
        truncated=truncated,
        volume=tally.volumes(),
        shadow_captured=tally.copies,
        feedback=tally.feedback(),
        window=window,
        writer=dict(sorted(writer.items())),
        shadow=[ShadowOutcomes(route=r, outcomes=dict(sorted(o.items()))) for r, o in sorted(shadow.items())],
        trials=trials,
        trials_state=trials_state,
    )
