"""Small HTML building blocks for the console: every text goes through `esc` (html.escape, quotes too), so
policy names, client ids and reasons can never become markup. No inline script or style anywhere (the
Content-Security-Policy forbids both): behaviour is /ui/static/console.js, looks are /ui/static/console.css,
charts are inline SVG styled by class."""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Iterable, Mapping, Sequence
from urllib.parse import urlencode

PAGES = (
    ("/ui", "Overview"),
    ("/ui/decisions", "Decisions"),
    ("/ui/tenants", "Tenants"),
    ("/ui/backends", "Backends"),
    ("/ui/policy", "Policy"),
)


def esc(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def link(path: str, text: str, **query: str) -> str:
    href = path + ("?" + urlencode(query) if query else "")
    return f'<a href="{esc(href)}">{esc(text)}</a>'


def when(ts: float | None) -> str:
    if ts is None:
        return "—"
    stamp = dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f'<time datetime="{esc(dt.datetime.fromtimestamp(ts, dt.UTC).isoformat())}">{stamp}</time>'


def num(value: float | int | None, digits: int = 1, unit: str = "") -> str:
    if value is None:
        return "—"
    text = f"{value:,}" if isinstance(value, int) else f"{value:,.{digits}f}"
    return esc(text + unit)


def pct(value: float | None) -> str:
    return "—" if value is None else esc(f"{value * 100:.1f} %")


def usd(value: float | None) -> str:
    return "—" if value is None else esc(f"${value:,.6f}")


def table(
    caption: str, head: Sequence[str], rows: Iterable[Sequence[str]], *, cls: str = "", empty: str = "Nothing yet."
) -> str:
    """`rows` hold already-escaped cell HTML; the first cell of a row is its header cell."""
    body = []
    for row in rows:
        cells = [f'<th scope="row">{row[0]}</th>', *(f"<td>{c}</td>" for c in row[1:])]
        body.append("<tr>" + "".join(cells) + "</tr>")
    if not body:
        body.append(f'<tr><td colspan="{len(head)}" class="empty">{esc(empty)}</td></tr>')
    heads = "".join(f'<th scope="col">{esc(h)}</th>' for h in head)
    # A wide table scrolls inside its own box on a phone (the page never scrolls sideways); the box is
    # focusable so a keyboard can scroll it.
    return (
        f'<div class="scroll" tabindex="0" role="region" aria-label="{esc(caption)}"><table class="{esc(cls)}">'
        f"<caption>{esc(caption)}</caption><thead><tr>{heads}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
    )


def bar_chart(title: str, bars: Sequence[tuple[str, float, str]], *, limit: float | None = None) -> str:
    """Horizontal bars, one per (label, value, text shown): an inline SVG with a <title> for screen readers.
    `limit` (e.g. a budget) draws a marker line; the scale covers the larger of it and the largest bar."""
    if not bars:
        return f'<p class="empty">{esc(title)}: nothing yet.</p>'
    row_h, label_w, bar_w, text_w = 26, 150, 300, 130
    top = max([v for _, v, _ in bars] + ([limit] if limit else []) + [0])
    scale = bar_w / top if top > 0 else 0.0
    height = row_h * len(bars) + 8
    width = label_w + bar_w + text_w
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}" '
        f'preserveAspectRatio="xMinYMin meet"><title>{esc(title)}</title>'
    ]
    for i, (label, value, text) in enumerate(bars):
        y = 4 + i * row_h
        w = max(0.0, value * scale)
        parts.append(
            f'<text class="label" x="{label_w - 8}" y="{y + 17}" text-anchor="end">{esc(label[:24])}</text>'
            f'<rect class="track" x="{label_w}" y="{y + 4}" width="{bar_w}" height="16" rx="3"></rect>'
            f'<rect class="bar bar{i % 4}" x="{label_w}" y="{y + 4}" width="{w:.1f}" height="16" rx="3"></rect>'
            f'<text class="value" x="{label_w + bar_w + 8}" y="{y + 17}">{esc(text)}</text>'
        )
    if limit and scale:
        x = label_w + limit * scale
        parts.append(f'<line class="limit" x1="{x:.1f}" y1="0" x2="{x:.1f}" y2="{height}"></line>')
    parts.append("</svg>")
    return f"<figure><figcaption>{esc(title)}</figcaption>{''.join(parts)}</figure>"


def column_chart(title: str, columns: Sequence[tuple[str, Mapping[str, int]]], series: Sequence[str]) -> str:
    """Stacked columns, one per (label, value by series), oldest left; a legend names the series' colours."""
    if not columns or not any(sum(v.values()) for _, v in columns):
        return f'<p class="empty">{esc(title)}: nothing yet.</p>'
    width, height, left, bottom = 600, 160, 40, 20
    top = max(sum(v.values()) for _, v in columns)
    # An hour's worth of slots, whatever is known yet: a column's width means the same minute every time.
    step = (width - left) / max(len(columns), 60)
    bar = max(1.0, step * 0.8)
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}">'
        f"<title>{esc(title)}</title>"
        f'<text class="label" x="{left - 4}" y="12" text-anchor="end">{top}</text>'
        f'<text class="label" x="{left - 4}" y="{height - bottom}" text-anchor="end">0</text>'
    ]
    usable = height - bottom - 8
    for i, (label, values) in enumerate(columns):
        x = left + i * step
        y = float(height - bottom)
        tip = ", ".join(f"{name} {values.get(name, 0)}" for name in series)
        for k, name in enumerate(series):
            h = values.get(name, 0) / top * usable if top else 0.0
            if h <= 0:
                continue
            y -= h
            parts.append(
                f'<rect class="bar bar{k % 4}" x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}">'
                f"<title>{esc(label)}: {esc(tip)}</title></rect>"
            )
    parts.append(f'<text class="label" x="{left}" y="{height - 4}">{esc(columns[0][0])}</text>')
    parts.append(f'<text class="label" x="{width}" y="{height - 4}" text-anchor="end">{esc(columns[-1][0])}</text>')
    parts.append("</svg>")
    legend = "".join(f'<li><span class="swatch bar{k % 4}"></span>{esc(name)}</li>' for k, name in enumerate(series))
    return f'<figure><figcaption>{esc(title)}</figcaption>{"".join(parts)}<ul class="legend">{legend}</ul></figure>'


def page(title: str, current: str, body: str, *, csrf: str | None, refresh: bool = True) -> str:
    nav = "".join(
        f'<li><a href="{path}"{" aria-current=page" if path == current else ""}>{esc(name)}</a></li>'
        for path, name in PAGES
    )
    logout = (
        f'<form method="post" action="/ui/logout" class="logout"><input type="hidden" name="csrf" value="{esc(csrf)}">'
        '<button type="submit">Log out</button></form>'
        if csrf is not None
        else ""
    )
    refresh_attr = ' data-refresh="10"' if refresh else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="color-scheme" content="light dark">'
        f"<title>{esc(title)} · Strait console</title>"
        '<link rel="stylesheet" href="/ui/static/console.css">'
        '<script src="/ui/static/console.js" defer></script></head><body>'
        '<a class="skip" href="#main">Skip to content</a>'
        f'<header><span class="brand">Strait</span><nav aria-label="Console pages"><ul>{nav}</ul></nav>{logout}</header>'
        f'<main id="main" tabindex="-1"{refresh_attr}><h1>{esc(title)}</h1>{body}</main>'
        '<footer><span id="refreshed" aria-live="polite"></span></footer></body></html>'
    )
