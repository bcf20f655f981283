"""The Learning loop page's document (/ui/loop, /admin/api/loop): what capture took in over the last day (from
the capture store, gateway.capture, the reader `strait datasets` uses), what this replica's capture writer
counted (strait_capture_records_total: queued, written, dropped, failed), the feedback on captured requests
per route and model, and the routes' shadow copies by outcome (strait_shadow_requests_total).

Reading a day of captures is bounded: at most MAX_SCANNED records (the document says when it stopped there).
Nothing here shows a captured text: counts and scores only."""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import msgspec

from gateway.api.console.alerting import Reader
from gateway.api.console.history import HOUR_S, Window
from gateway.capture.records import Captured
from gateway.capture.store import CaptureQuery, scan
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
    feedback: list[FeedbackScores]
    # What the counters below cover (the last hour, or since this replica started).
    window: Window
    writer: dict[str, int]
    shadow: list[ShadowOutcomes]


class _Tally:
    """Counts of the captures seen so far; a record is folded in and let go (a day can hold large texts)."""

    def __init__(self) -> None:
        self.seen = 0
        self.volume: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        self.scores: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0] * 9)

    def add(self, item: Captured) -> None:
        self.seen += 1
        r = item.record
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
    return Loop(
        capture=state,
        store=kind,
        since_ms=since_ms,
        until_ms=until_ms,
        scanned=tally.seen,
        truncated=truncated,
        volume=tally.volumes(),
        feedback=tally.feedback(),
        window=window,
        writer=dict(sorted(writer.items())),
        shadow=[ShadowOutcomes(route=r, outcomes=dict(sorted(o.items()))) for r, o in sorted(shadow.items())],
    )
