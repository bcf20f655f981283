"""The console's pages, each rendered from the same document its `/admin/api/...` endpoint returns
(gateway.api.console.data): the HTML adds no figure of its own."""

from __future__ import annotations

import time

from gateway.api.console.candidate import CheckResult
from gateway.api.console.data import Backends, DecisionDetail, DecisionSearch, Overview, PolicyStatus, Tenants
from gateway.api.console.html import bar_chart, column_chart, esc, link, num, page, pct, table, usd, when


def _figure(name: str, value: str, note: str = "") -> str:
    return f'<div class="stat"><dt>{esc(name)}</dt><dd>{value}</dd>{f"<dd class=note>{esc(note)}</dd>" if note else ""}</div>'


def overview(doc: Overview, csrf: str | None) -> str:
    stats = "".join(
        [
            _figure("Requests", num(doc.requests), "since this replica started"),
            _figure(
                "Errors",
                num(doc.errors),
                f"{doc.errors / doc.requests * 100:.1f} % of requests" if doc.requests else "",
            ),
            _figure(
                "Refused or failed", f'<span data-figure="refused">{num(doc.refused)}</span>', "any tenant, any reason"
            ),
            _figure("Spillover share", pct(doc.spillover_share), "answers sent past a full backend"),
            _figure("Cache hit rate", pct(doc.cache_hit_rate), "exact and semantic hits / lookups"),
            _figure("In flight", num(doc.in_flight)),
            _figure("Policy", f"<code>{esc(doc.policy_version)}</code>"),
        ]
    )
    alerts = (
        "<ul class='alerts'>"
        + "".join(f"<li><strong>{esc(a.name)}</strong> {esc(a.detail)}</li>" for a in doc.alerts)
        + "</ul>"
        if doc.alerts
        else "<p class='ok'>No alert condition holds on this replica.</p>"
    )
    routes = table(
        "Per route (since this replica started)",
        [
            "Route",
            "Requests",
            "Errors",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "TTFT p50 ms",
            "TTFT p95 ms",
            "Spilled",
            "Cache hits",
        ],
        (
            [
                link("/ui/decisions", r.route, route=r.route),
                f'<span data-figure="requests:{esc(r.route)}">{num(r.requests)}</span>',
                f'<span data-figure="errors:{esc(r.route)}">{num(r.errors)}</span>',
                num(r.latency.p50_ms),
                num(r.latency.p95_ms),
                num(r.latency.p99_ms),
                num(r.ttft.p50_ms),
                num(r.ttft.p95_ms),
                num(r.spilled),
                f"{num(r.cache_hits)} / {num(r.cache_lookups)}",
            ]
            for r in doc.routes
        ),
    )
    latency_chart = bar_chart(
        "Latency p95 by route (ms)",
        [(r.route, r.latency.p95_ms or 0.0, num(r.latency.p95_ms, unit=" ms")) for r in doc.routes if r.latency.count],
    )
    total_served = sum(doc.served_by_tier.values())
    tier_chart = bar_chart(
        "Answers by serving tier",
        [(tier, float(n), f"{n:,} ({n / total_served * 100:.1f} %)") for tier, n in doc.served_by_tier.items()],
    )
    tiers = sorted({t for p in doc.spill_history for t in p.by_tier} | set(doc.served_by_tier))
    spilled_total = sum(p.spilled for p in doc.spill_history)
    answered_total = sum(sum(p.by_tier.values()) for p in doc.spill_history)
    over_time = column_chart(
        f"Answers by serving tier per minute, last hour ({spilled_total} of {answered_total} spilled)",
        [(time.strftime("%H:%M", time.gmtime(p.ts)), p.by_tier) for p in doc.spill_history],
        tiers,
    )
    if doc.spend_today is None:
        spend = f"<p class='warn'>Spend unavailable: {esc(doc.ledger_error)}</p>"
    else:
        spend = table(
            f"Spend today ({doc.day}, UTC) per tenant",
            ["Tenant", "Requests", "Spend", "Day budget"],
            (
                [
                    link("/ui/tenants", s.tenant),
                    num(s.requests),
                    f'<span data-figure="spend:{esc(s.tenant)}">{usd(s.cost_usd)}</span>',
                    usd(s.budget_usd_per_day),
                ]
                for s in doc.spend_today
            ),
        ) + bar_chart(
            "Spend today per tenant (USD)", [(s.tenant, s.cost_usd, usd(s.cost_usd)) for s in doc.spend_today]
        )
    body = (
        f"<dl class='stats'>{stats}</dl><section aria-labelledby='alerts-h'><h2 id='alerts-h'>Alerts</h2>{alerts}</section>"
        f"<section aria-labelledby='routes-h'><h2 id='routes-h'>Routes</h2>{routes}<div class='charts'>{latency_chart}{tier_chart}</div>{over_time}</section>"
        f"<section aria-labelledby='spend-h'><h2 id='spend-h'>Spend</h2>{spend}</section>"
    )
    return page("Overview", "/ui", body, csrf=csrf)


def decisions(doc: DecisionSearch, csrf: str | None) -> str:
    form = (
        '<form method="get" action="/ui/decisions" class="search" role="search">'
        f'<label>Request id <input name="q" value="{esc(doc.q)}" maxlength="200" autocomplete="off"></label>'
        f'<label>Tenant <input name="tenant" value="{esc(doc.tenant)}" maxlength="200"></label>'
        f'<label>Route <input name="route" value="{esc(doc.route)}" maxlength="200"></label>'
        '<button type="submit">Search</button></form>'
    )
    rows = table(
        f"Recent decisions ({len(doc.data)} shown of {doc.kept} kept on this replica, newest first)",
        ["Request id", "Time", "Tenant", "Route", "Choice"],
        (
            [
                link(f"/ui/decisions/{d.request_id}", d.request_id),
                when(d.ts),
                esc(d.tenant),
                esc(d.route),
                esc(d.choice),
            ]
            for d in doc.data
        ),
        empty="No decision matches.",
    )
    return page("Decisions", "/ui/decisions", form + rows, csrf=csrf, refresh=not (doc.q or doc.tenant or doc.route))


def decision(doc: DecisionDetail, csrf: str | None) -> str:
    s = doc.summary
    facts = "".join(
        _figure(k, v)
        for k, v in (
            ("Request id", f"<code>{esc(s.request_id)}</code>"),
            ("Decision id", f"<code>{esc(s.decision_id)}</code>"),
            ("Client x-request-id", esc(s.client_request_id or "—")),
            ("Time", when(s.ts)),
            ("Tenant", esc(s.tenant)),
            ("Route asked", esc(s.route)),
            ("Choice", esc(s.choice)),
        )
    )
    body = f"<dl class='stats'>{facts}</dl>"
    d = doc.decision
    if d is None:
        body += "<p>The request was refused before a plan was made: no table.</p>"
    else:
        meta = (
            f"<p>Route <strong>{esc(d.route)}</strong>, objective <strong>{esc(d.objective)}</strong>, policy "
            f"<code>{esc(d.policy_version)}</code>; rules: {esc(', '.join(d.rules) or 'none')}; plan: "
            f"{esc(' → '.join(d.plan) or 'empty')}{'; panic (every candidate ejected)' if d.panic else ''}"
            f"{'; affinity: ' + esc(d.affinity) if d.affinity else ''}.</p>"
        )
        body += meta + table(
            "Filter and rank: every candidate",
            [
                "Deployment",
                "Tier",
                "Excluded because",
                "Rank",
                "Score",
                "Est. cost",
                "Latency ms",
                "TTFT ms",
                "Tok/s",
                "Utilisation",
                "Queue",
                "Load",
                "Spilled",
                "Hardware",
                "Region",
            ],
            (
                [
                    esc(r.deployment),
                    esc(r.tier),
                    esc(r.excluded or ""),
                    num(r.rank),
                    num(r.score, 4),
                    usd(r.est_cost_usd),
                    num(r.latency_ms),
                    num(r.ttft_ms),
                    num(r.tokens_per_s),
                    pct(r.utilisation),
                    num(r.queue),
                    esc(r.load or ""),
                    esc(r.spilled or r.spilling or ""),
                    esc(r.hardware or ""),
                    esc(r.region or ""),
                ]
                for r in d.rows
            ),
            cls="decision",
        )
    body += f"<p>{link('/ui/decisions', 'Back to the search')}</p>"
    return page(f"Decision {s.request_id}", "/ui/decisions", body, csrf=csrf, refresh=False)


def tenants(doc: Tenants, csrf: str | None) -> str:
    parts = []
    if doc.ledger_error:
        parts.append(f"<p class='warn'>Usage unavailable: {esc(doc.ledger_error)}</p>")
    for t in doc.data:
        facts = "".join(
            _figure(k, v)
            for k, v in (
                ("Key ids", esc(", ".join(t.key_ids) or "none")),
                ("Routes", esc(", ".join(t.allowed_routes))),
                ("Requests today", f'<span data-figure="tenant-requests:{esc(t.name)}">{num(t.requests_today)}</span>'),
                ("Tokens today", num(t.tokens_today)),
                (
                    "Spend today",
                    f'<span data-figure="tenant-spend:{esc(t.name)}">{usd(t.spend_today_usd)}</span> of {usd(t.budget_usd_per_day)}',
                ),
                ("Spend this month", f"{usd(t.spend_month_usd)} of {usd(t.budget_usd_per_month)}"),
                ("When spent", esc(t.on_exhausted)),
            )
        )
        budget_bars = []
        if t.budget_usd_per_day:
            budget_bars.append(
                (
                    "today",
                    t.spend_today_usd or 0.0,
                    f"{(t.spend_today_usd or 0) / t.budget_usd_per_day * 100:.1f} % of day",
                )
            )
        chart = (
            bar_chart(f"{t.name}: spend against the day budget (USD)", budget_bars, limit=t.budget_usd_per_day)
            if budget_bars
            else ""
        )
        limits = table(
            f"{t.name}: rate limits (policy)",
            ["Scope", "Limits"],
            (
                [esc(scope), esc(", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in values.items() if v is not None))]
                for scope, values in t.limits.items()
            ),
            empty="No rate limit.",
        )
        refusals = table(
            f"{t.name}: refusals by reason (since this replica started)",
            ["Code", "Requests"],
            (
                [esc(code), f'<span data-figure="refusal:{esc(t.name)}:{esc(code)}">{num(n)}</span>']
                for code, n in t.refusals.items()
            ),
            empty="No refusal.",
        )
        parts.append(
            f"<section><h2>{esc(t.name)}</h2><dl class='stats'>{facts}</dl>{chart}{limits}{refusals}</section>"
        )
    if doc.unauthenticated_refusals:
        parts.append(
            table(
                "Refused before authentication (no tenant known)",
                ["Code", "Requests"],
                ([esc(code), num(n)] for code, n in doc.unauthenticated_refusals.items()),
            )
        )
    return page("Tenants", "/ui/tenants", "".join(parts), csrf=csrf)


def backends(doc: Backends, csrf: str | None) -> str:
    summary = table(
        "Backends: health and load",
        ["Backend", "Tier", "Health", "In flight", "Utilisation", "Queue", "Spilling on", "Attempts"],
        (
            [
                esc(b.name),
                esc(b.tier),
                "healthy"
                if b.healthy
                else f"<strong class='bad'>ejected</strong> {num(b.ejected_for_s, unit=' s left')} {esc(b.ejection_reason or '')}",
                f"{num(b.in_flight)}{' / ' + num(b.max_concurrency) if b.max_concurrency else ''}",
                f"{pct(b.utilisation)} <small>({esc(b.utilisation_source)})</small>",
                num(b.queue),
                esc(", ".join(b.spilling_on) or "—"),
                esc(", ".join(f"{k}: {v}" for k, v in b.attempts.items()) or "—"),
            ]
            for b in doc.data
        ),
    )
    chart = bar_chart(
        "Utilisation by backend",
        [(b.name, b.utilisation or 0.0, pct(b.utilisation)) for b in doc.data if b.utilisation is not None],
    )
    hosting = table(
        "Hosting facts and hardware (as declared in the policy)",
        [
            "Backend",
            "Adapter",
            "Operator",
            "HQ",
            "Region",
            "Jurisdiction",
            "Retention days",
            "Trains on data",
            "Certifications",
            "Hardware",
            "Commitment",
        ],
        (
            [
                esc(b.name),
                esc(b.adapter),
                esc(b.operator or "unknown"),
                esc(b.operator_country or "—"),
                esc(b.region or "—"),
                esc(b.jurisdiction or "unknown"),
                num(b.retention_days),
                esc("unknown" if b.trains_on_data is None else ("yes" if b.trains_on_data else "no")),
                esc(", ".join(b.certifications) or "—"),
                esc(b.hardware or "—"),
                esc(b.commitment),
            ]
            for b in doc.data
        ),
    )
    deployments = table(
        "Deployments: live EWMAs and prices",
        ["Deployment", "Health", "Latency EWMA ms", "TTFT EWMA ms", "Tokens/s", "Input $/Mtok", "Output $/Mtok"],
        (
            [
                esc(d.label),
                "<strong class='bad'>ejected</strong>" if d.ejected else "ok",
                num(d.latency_ewma_ms),
                num(d.ttft_ewma_ms),
                num(d.tokens_per_s),
                num(d.price_input_per_mtok, 3),
                num(d.price_output_per_mtok, 3),
            ]
            for b in doc.data
            for d in b.deployments
        ),
    )
    ejections = table(
        "Ejection history (this replica, newest first)",
        ["Backend or deployment", "When", "Reason", "Out for"],
        ([esc(e.key), when(e.ts), esc(e.reason), num(e.seconds, unit=" s")] for e in doc.ejections),
        empty="No ejection since this replica started.",
    )
    return page(
        "Backends and deployments", "/ui/backends", summary + chart + ejections + hosting + deployments, csrf=csrf
    )


def policy(doc: PolicyStatus, csrf: str | None, *, candidate: str = "", result: CheckResult | None = None) -> str:
    facts = "".join(
        _figure(k, v)
        for k, v in (
            ("Running version", f"<code>{esc(doc.version)}</code>"),
            ("Loaded", when(doc.loaded_at)),
            ("From", f"<code>{esc(doc.path)}</code>"),
            ("Routes · backends · tenants", esc(f"{doc.routes} · {doc.backends} · {doc.tenants}")),
        )
    )
    if doc.last_rejected_at is None:
        rejected = "<p class='ok'>No reload was refused since this replica started.</p>"
    else:
        state = "" if not doc.last_reload_ok else " A later reload succeeded."
        rejected = (
            f"<p class='{'ok' if doc.last_reload_ok else 'warn'}'>Last refused reload: {when(doc.last_rejected_at)}.{esc(state)}</p>"
            "<ul class='problems'>"
            + "".join(f"<li><code>{esc(e)}</code></li>" for e in doc.last_rejected_errors)
            + "</ul>"
        )
    form = (
        '<form method="post" action="/ui/policy" class="candidate">'
        f'<input type="hidden" name="csrf" value="{esc(csrf or "")}">'
        '<label for="policy-text">Candidate policy (YAML, one file)</label>'
        f'<textarea id="policy-text" name="policy" rows="18" spellcheck="false" required>{esc(candidate)}</textarea>'
        '<button type="submit">Check and diff</button></form>'
    )
    out = ""
    if result is not None:
        verdict = (
            f"<p class='ok' id='check-verdict'>The candidate loads (version <code>{esc(result.version)}</code>).</p>"
            if result.ok
            else f"<p class='warn' id='check-verdict'>The candidate is refused: {result.errors} error(s).</p>"
        )
        problems = (
            "<ul class='problems' id='check-problems'>"
            + "".join(f"<li><code>{esc(p)}</code></li>" for p in result.problems)
            + "</ul>"
        )
        diff = (
            f"<h3>Diff against recent traffic ({result.diff_samples} decisions on this replica)</h3><pre id='check-diff'>"
            + esc("\n".join(result.diff))
            + "</pre>"
            if result.ok
            else ""
        )
        out = f"<section aria-labelledby='result-h'><h2 id='result-h'>Check result</h2>{verdict}{problems if result.problems else ''}{diff}</section>"
    body = (
        f"<dl class='stats'>{facts}</dl><section><h2>Reloads</h2>{rejected}</section>{out}"
        f"<section><h2>Try a candidate</h2><p>Runs <code>strait policy check</code> on it, then <code>strait policy diff</code> "
        f"against the running policy over this replica's recent decisions. Nothing is put in force.</p>{form}</section>"
    )
    return page("Policy", "/ui/policy", body, csrf=csrf, refresh=False)


def login(csrf: str, error: str | None = None, *, plain_http: bool = False) -> str:
    message = f"<p class='warn' role='alert'>{esc(error)}</p>" if error else ""
    if plain_http:
        message += (
            "<p class='warn'>This console is reached over plain HTTP from another machine: browsers keep its session "
            "cookie only over HTTPS. Serve it behind TLS, or use <code>Authorization: Bearer</code> from scripts.</p>"
        )
    body = (
        f"{message}<form method='post' action='/ui/login' class='login'>"
        f'<input type="hidden" name="csrf" value="{esc(csrf)}">'
        '<label for="key">Admin key</label><input id="key" name="key" type="password" autocomplete="current-password" required maxlength="512" autofocus>'
        "<button type='submit'>Log in</button></form>"
        "<p>An admin key from the policy's <code>server.admin_keys</code>. The key is checked once; the browser keeps only a session cookie.</p>"
    )
    return page("Log in", "", body, csrf=None, refresh=False)


def forbidden() -> str:
    return page(
        "Forbidden",
        "",
        "<p>This key is a tenant key: the console is for admin keys only.</p>",
        csrf=None,
        refresh=False,
    )
