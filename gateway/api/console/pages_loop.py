"""The Learning loop page, rendered from the document /admin/api/loop returns (gateway.api.console.loop)."""

from __future__ import annotations

import time

from gateway.api.console.html import bar_chart, esc, num, page, table
from gateway.api.console.loop import Loop, Trial
from gateway.api.console.pages import window_label
from gateway.capture.compare import ROWS, fmt

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


_TRIALS = {
    "none": "No route of the running policy has a shadow or canary: there is no candidate to compare.",
    "no_captures": "Live vs candidate is read from captured answers; there are none to compare here.",
    "failed": "Comparing live and candidate answers failed (the gateway's log says why).",
}
# Two pairs of columns (section and side of the comparison, heading): shadow's, then canary's.
_COLUMNS = (
    (("shadow", "live", "Shadow: live"), ("shadow", "candidate", "Shadow: candidate")),
    (("canary", "candidate", "Canary: candidate"), ("canary", "others", "Canary: other models")),
)


def _trial(t: Trial, day: str) -> str:
    """One route's live vs candidate: the figures `strait datasets compare` prints, the sides it has."""
    c = t.comparison
    shadow = c["shadow"]
    columns = [
        col
        for group in _COLUMNS
        if any(c[col[0]][col[1]]["records"] for col in group)  # a side with records: its pair of columns
        for col in group
    ]
    figure = f"{esc(t.route)}:{esc(t.candidate)}"
    rows = [
        [esc(label), *(esc(fmt(c[trial][side][key], unit)) for trial, side, _ in columns)] for label, key, unit in ROWS
    ]
    caption = f"Route {t.route}: live vs candidate {t.candidate} ({t.kind}), {day}"
    parts = [
        table(
            caption,
            ["", *(head for _, _, head in columns)],
            rows if columns else [],
            empty="No captured answer of this route from the candidate or beside it in the last day.",
        )
    ]
    if shadow["live"]["records"] or shadow["candidate"]["records"]:
        parts.append(
            f"<p>Shadow pairs: <span data-figure='pairs:{figure}'>{num(shadow['pairs'])}</span>; agreement, "
            f"normalised exact match: <span data-figure='agreement:{figure}'>{esc(fmt(shadow['agreement_exact']))}"
            f"</span>, mean word-set Jaccard: {esc(fmt(shadow['agreement_similarity']))}; live answers without a "
            f"copy: {num(shadow['live_without_copy'])}, copies without their live answer: "
            f"{num(shadow['copies_without_live'])}.</p>"
        )
    return "".join(parts)


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
        if doc.shadow_captured:
            parts.append(
                f"<p>Plus <span data-figure='shadow-captured'>{num(doc.shadow_captured)}</span> shadow copies' "
                "answers stored beside their live ones (not requests: compared under Live vs candidate).</p>"
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
    day = f"{_utc(doc.since_ms)} to {_utc(doc.until_ms)}"
    said = (
        f"<p class='empty' data-trials='{esc(doc.trials_state)}'>{esc(_TRIALS[doc.trials_state])}</p>"
        if doc.trials_state in _TRIALS
        else ""
    )
    parts.append(
        "<section aria-labelledby='trials-h'><h2 id='trials-h'>Live vs candidate (as strait datasets compare, "
        f"last day)</h2>{said}{''.join(_trial(t, day) for t in doc.trials)}</section>"
    )
    # Not refreshed by itself: each load reads a day of the capture store.
    return page("Learning loop", "/ui/loop", "".join(parts), csrf=csrf, refresh=False)
