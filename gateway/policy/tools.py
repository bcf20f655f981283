"""Offline policy tools for platform teams: explain, test and diff decisions without a server.

They run the same engine the server runs, on requests given as JSON, so what CI checks is what
production does.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import msgspec

from gateway.policy.engine import Decision, RoutePlan, Row, decide
from gateway.policy.features import count_prompt_tokens, extract, request_of
from gateway.policy.index import PolicyIndex, Principal
from gateway.policy.live import LiveState


def principal_for(index: PolicyIndex, tenant: str | None) -> Principal:
    if tenant is None:
        return Principal(tenant=index.open_tenant.name, key_id="-", allowed_routes=None)
    t = index.tenants.get(tenant)
    if t is None:
        raise ValueError(f"unknown tenant {tenant!r} (policy has: {', '.join(sorted(index.tenants)) or 'none'})")
    allowed = None if "*" in t.allowed_routes else frozenset(t.allowed_routes)
    return Principal(tenant=t.name, key_id="-", allowed_routes=allowed)


def live_state(signals: Mapping[str, Any] | None) -> LiveState:
    return msgspec.convert(signals or {}, LiveState)


def run(
    index: PolicyIndex,
    tenant: str | None,
    request: Mapping[str, Any],
    *,
    headers: Mapping[str, str] | None = None,
    signals: Mapping[str, Any] | None = None,
    ingress_region: str | None = None,
) -> RoutePlan:
    canonical = request_of(request)
    features = extract(
        canonical,
        {k.lower(): v for k, v in (headers or {}).items()},
        count_prompt_tokens(canonical),
        ingress_region=ingress_region,
    )
    return decide(index, principal_for(index, tenant), features, live_state(signals), decision_id="offline")


def usd(value: float) -> str:
    """A cost in three significant digits, never in exponent notation: cheap deployments differ in their
    fourth decimal place and beyond (0.0000123 vs 0.0000456), which a fixed `%.6f` prints as 0.000012."""
    if value == 0:
        return "0"
    decimals = max(0, 2 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def _live_columns(row: Row) -> tuple[str, str, str, str]:
    latency = f"{row.latency_ms:.0f}" if row.latency_ms is not None else ""
    ttft = f"{row.ttft_ms:.0f}" if row.ttft_ms is not None else ""
    util = f"{row.utilisation:.2f}" if row.utilisation is not None else ""
    if util and row.load:
        util += f" {row.load}"
    queue = str(row.queue) if row.queue is not None else ""
    return latency, ttft, util, queue


def _signals_line(live: LiveState | None) -> str:
    """Which live signals the decision read (what `--signals` gave, or none: every backend idle and
    unmeasured, as on a gateway that has just started)."""
    if live is None:
        return "live signals: none given (every backend idle, nothing measured yet)"
    used = [
        name
        for name in ("unhealthy", "latency_ms", "ttft_ms", "tokens_per_s", "in_flight", "utilisation", "queue")
        if getattr(live, name)
    ]
    used += [name for name in ("scrape_basis", "stale", "spilling") if getattr(live, name)]
    return f"live signals: {', '.join(used) if used else 'given, all empty'}"


def render(decision: Decision, live: LiveState | None = None) -> str:
    """The filter/rank table, as the server would use it, then what spillover did and the live signals read."""
    lines = [
        f"route {decision.requested_route!r}"
        + (f" -> {decision.route!r}" if decision.route != decision.requested_route else "")
        + f"  objective {decision.objective}  policy {decision.policy_version}  tenant {decision.tenant}",
        f"rules applied: {', '.join(decision.rules) or 'none'}",
        "",
        f"{'rank':>4}  {'deployment':<40} {'tier':<12} {'est. USD':>10} {'latency ms':>10} {'ttft ms':>7} "
        f"{'util':<14} {'queue':>5}  excluded because / spill",
    ]
    for row in sorted(decision.rows, key=lambda r: (r.rank is None, r.rank or 0)):
        rank = str(row.rank) if row.rank is not None else "-"
        cost = usd(row.est_cost_usd) if row.est_cost_usd is not None else ""
        latency, ttft, util, queue = _live_columns(row)
        notes = [n for n in (row.excluded, row.spilled and f"spilled: {row.spilled}") if n]
        if row.spilling:
            notes.append(f"spilling, took this request: {row.spilling}")
        if row.ejected:
            notes.append("ejected (panic: every candidate is)")
        lines.append(
            f"{rank:>4}  {row.deployment:<40} {row.tier:<12} {cost:>10} {latency:>10} {ttft:>7} {util:<14} "
            f"{queue:>5}  {'; '.join(notes)}"
        )
    hardware = [f"  {row.deployment}: {row.hardware}" for row in decision.rows if row.hardware is not None]
    if hardware:
        lines.append("hardware:")
        lines.extend(hardware)
    if decision.ingress_region is not None:
        lines.append(f"ingress region: {decision.ingress_region}")
    lines.append("")
    spilled = [r for r in decision.rows if r.spilled]
    spilling = [r for r in decision.rows if r.spilling]
    if spilled or spilling:
        lines += [f"spill: {r.backend} moved behind the others: {r.spilled}" for r in spilled]
        lines += [f"spill: {r.backend} is spilling yet takes this request: {r.spilling}" for r in spilling]
    else:
        lines.append("spill: none (no candidate over its route's spillover threshold)")
    if decision.panic:
        lines.append("panic: every compliant candidate is ejected; they are tried anyway")
    if decision.affinity is not None:
        lines.append(f"affinity: {decision.affinity}")
    if decision.canary is not None:
        lines.append(f"canary: {decision.canary}")
    if decision.shadow is not None:
        lines.append(f"shadow: {decision.shadow}")
    lines.append(_signals_line(live))
    lines.append(f"plan: {' -> '.join(decision.plan)}")
    return "\n".join(lines)


# Keywords whose value is a map of name -> subschema, and keywords whose value is data, not a schema.
_SCHEMA_MAPS = frozenset({"$defs", "definitions", "properties", "patternProperties", "dependentSchemas"})
_DATA_KEYWORDS = frozenset({"default", "const", "enum", "examples"})


def _clean_descriptions(node: Any) -> Any:
    """Every `description` as `inspect.cleandoc` gives it.

    How a Struct's docstring reaches the schema differs by version: msgspec 0.22 kept the indentation
    of its continuation lines, 0.23 strips it the PEP 257 way, and Python 3.13 strips docstrings
    itself at compile time. cleandoc gives one text for all of them, so the schema is the same
    wherever it is generated.
    """
    if isinstance(node, list):
        return [_clean_descriptions(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "description" and isinstance(value, str):
            out[key] = inspect.cleandoc(value)
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _clean_descriptions(sub) for name, sub in value.items()}
        elif key in _DATA_KEYWORDS:
            out[key] = value
        else:
            out[key] = _clean_descriptions(value)
    return out


_BOUNDS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"})


def _whole_bounds(node: Any) -> Any:
    """Bounds that are whole numbers written as integers. `typing` caches `Annotated[...]` by equality
    and `Meta(le=1) == Meta(le=1.0)`, so which spelling a field's bound gets depended on which module's
    annotation was evaluated first in the process: the printed schema must not."""
    if isinstance(node, dict):
        return {
            k: int(v) if k in _BOUNDS and isinstance(v, float) and v.is_integer() else _whole_bounds(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_whole_bounds(v) for v in node]
    return node


def schema() -> dict[str, Any]:
    from gateway.policy.model import PolicySet

    doc: dict[str, Any] = _whole_bounds(_clean_descriptions(msgspec.json.schema(PolicySet)))
    doc["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    doc["title"] = "Strait policy file"
    return doc
