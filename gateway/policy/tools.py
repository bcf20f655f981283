"""Offline policy tools for platform teams: explain, test and diff decisions without a server.

They run the same engine the server runs, on requests given as JSON, so what CI checks is what
production does.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import msgspec

from gateway.errors import GatewayError
from gateway.policy.engine import Decision, LiveState, RoutePlan, decide
from gateway.policy.features import count_prompt_tokens, extract, request_of
from gateway.policy.index import PolicyIndex, Principal


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
) -> RoutePlan:
    canonical = request_of(request)
    features = extract(canonical, {k.lower(): v for k, v in (headers or {}).items()}, count_prompt_tokens(canonical))
    return decide(index, principal_for(index, tenant), features, live_state(signals), decision_id="offline")


def render(decision: Decision) -> str:
    """The filter/rank table, as the server would use it."""
    lines = [
        f"route {decision.requested_route!r}"
        + (f" -> {decision.route!r}" if decision.route != decision.requested_route else "")
        + f"  objective {decision.objective}  policy {decision.policy_version}  tenant {decision.tenant}",
        f"rules applied: {', '.join(decision.rules) or 'none'}",
        "",
        f"{'rank':>4}  {'deployment':<40} {'tier':<12} {'est. USD':>10} {'latency ms':>10} {'util':>5}  excluded because",
    ]
    for row in sorted(decision.rows, key=lambda r: (r.rank is None, r.rank or 0)):
        rank = str(row.rank) if row.rank is not None else "-"
        cost = f"{row.est_cost_usd:.6f}" if row.est_cost_usd is not None else ""
        latency = f"{row.latency_ms:.0f}" if row.latency_ms is not None else ""
        util = f"{row.utilisation:.2f}" if row.utilisation is not None else ""
        lines.append(
            f"{rank:>4}  {row.deployment:<40} {row.tier:<12} {cost:>10} {latency:>10} {util:>5}  {row.excluded or ''}"
        )
    lines.append("")
    lines.append(f"plan: {' -> '.join(decision.plan)}")
    return "\n".join(lines)


# ---- policy diff ----


class Replay(msgspec.Struct, kw_only=True):
    request: dict[str, Any]
    tenant: str | None = None
    headers: dict[str, str] = {}
    signals: dict[str, Any] = {}


def _outcome(index: PolicyIndex, r: Replay) -> tuple[str, RoutePlan | None]:
    try:
        plan = run(index, r.tenant, r.request, headers=r.headers, signals=r.signals)
    except GatewayError as exc:
        return f"refused {exc.status}: {exc.message}", None
    return plan.decision.plan[0], plan


def diff(old: PolicyIndex, new: PolicyIndex, replays: Iterable[Replay]) -> tuple[list[str], int, int]:
    """Lines describing each changed decision, the number changed and the number replayed."""
    out: list[str] = []
    changed = total = 0
    for n, r in enumerate(replays, start=1):
        total += 1
        before, _ = _outcome(old, r)
        after, new_plan = _outcome(new, r)
        if before == after:
            continue
        changed += 1
        why = ""
        if new_plan is not None:
            row = next((x for x in new_plan.decision.rows if x.deployment == before), None)
            if row is not None and row.excluded:
                why = f" (new policy excludes {before}: {row.excluded})"
            elif row is not None:
                why = f" (now ranked {row.rank} under objective {new_plan.decision.objective})"
        out.append(
            f"request {n} (tenant {r.tenant or '-'}, model {r.request.get('model')!r}): {before} -> {after}{why}"
        )
    return out, changed, total


def read_replays(path: Path) -> list[Replay]:
    replays = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            replays.append(msgspec.convert(json.loads(line), Replay))
        except (ValueError, msgspec.ValidationError) as exc:
            raise ValueError(f"{path}:{line_no}: {exc}") from None
    return replays


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


def schema() -> dict[str, Any]:
    from gateway.policy.model import PolicySet

    doc: dict[str, Any] = _clean_descriptions(msgspec.json.schema(PolicySet))
    doc["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    doc["title"] = "Strait policy file"
    return doc
