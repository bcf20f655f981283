"""The Learning loop page, rendered from the document /admin/api/loop returns (gateway.api.console.loop)."""

from __future__ import annotations

import time

from gateway.api.console.html import bar_chart, esc, num, page, table
from gateway.api.console.loop import Loop
from gateway.api.console.pages import window_label

_STATE = {
    "off": "Capture is off on this replica (STRAIT_CAPTURE=off): nothing is captured, so there is no volume or "
    "feedback to show. Shadow copies are counted below all the same.",
    "no_consent": "Capture is on, but no tenant of the policy in force consents to it (tenants' capture: "
    "{enabled: true}): nothing is captured.",
    "empty": "Capture is on and nothing has been captured yet.",
    "unreadable": "The capture store did not answer; the volume and feedback are not shown. The counters below "
    "are this replica's own.",
}


def _utc(ms: int) -> str:
    # Plain text: a table caption is escaped whole.
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ms / 1000))


def loop(doc: Loop, csrf: str | None) -> str:
    parts = []
    if doc.capture in _STATE:
        parts.append(f"<p class='warn' data-capture='{esc(doc.capture)}'>{esc(_STATE[doc.capture])}</p>")
    if doc.capture in ("on", "no_consent"):
        day = f"{_utc(doc.since_ms)} to {_utc(doc.until_ms)}"
        stopped = f", the first {num(doc.scanned)} only: the day holds more" if doc.truncated else ""
        parts.append(
            table(
                f"Captured requests over the last day ({day}, {doc.store} store{stopped})",
                ["Tenant", "Route", "Records", "Answered with an error"],
                (
                    [
                        esc(v.tenant),
                        esc(v.route),
                        f'<span data-figure="captured:{esc(v.tenant)}:{esc(v.route)}">{num(v.records)}</span>',
                        num(v.failed),
                    ]
                    for v in doc.volume
                ),
                empty="No request was captured in the last day.",
            )
        )
        if doc.volume:
            parts.append(
                bar_chart(
                    "Captured requests per tenant and route, last day",
                    [(f"{v.tenant} / {v.route}", float(v.records), num(v.records)) for v in doc.volume],
                )
            )
        parts.append(
            table(
                "Feedback per route and model (captured requests of the last day)",
                [
                    "Route",
                    "Model",
                    "Records",
                    "With feedback",
                    "Scores",
                    "Mean score",
                    "Thumbs up",
                    "Thumbs down",
                    "Regenerated",
                    "Corrections",
                    "Labels",
                ],
                (
                    [
                        esc(f.route),
                        esc(f.model),
                        num(f.records),
                        f'<span data-figure="feedback:{esc(f.route)}:{esc(f.model)}">{num(f.with_feedback)}</span>',
                        num(f.scores),
                        num(f.mean_score, digits=2),
                        num(f.thumbs_up),
                        num(f.thumbs_down),
                        num(f.regenerated),
                        num(f.corrections),
                        num(f.labels),
                    ]
                    for f in doc.feedback
                ),
                empty="No captured request to score.",
            )
        )
    span = window_label(doc.window)
    parts.append(
        table(
            f"This replica's capture writer ({span})",
            ["Result", "Records"],
            (
                [esc(result), f'<span data-figure="writer:{esc(result)}">{num(n)}</span>']
                for result, n in doc.writer.items()
            ),
            empty="Nothing was handed to the capture writer.",
        )
    )
    outcomes = sorted({o for s in doc.shadow for o in s.outcomes})
    parts.append(
        table(
            f"Shadow copies by route and outcome ({span})",
            ["Route", *outcomes],
            ([esc(s.route), *(num(s.outcomes.get(o, 0)) for o in outcomes)] for s in doc.shadow),
            empty="No shadow copy was sent (no route of the policy has a shadow target, or no traffic).",
        )
    )
    # Not refreshed by itself: each load reads a day of the capture store.
    return page("Learning loop", "/ui/loop", "".join(parts), csrf=csrf, refresh=False)
