"""`strait policy test`: YAML test cases (request + tenant + headers + signals -> expected outcome) run
against the engine the server runs.

Every case gets its own verdict: a malformed case, an unknown tenant or route, or a case the engine
cannot run fails that case with a message naming its line, and the others still run; a suite whose
policy does not load fails as one outcome of that file. Names that YAML reads as numbers or booleans
(`name: 404`) are taken as the text written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import yaml

from gateway.errors import GatewayError
from gateway.policy.index import PolicyIndex
from gateway.policy.load import PolicyError, load_policy
from gateway.policy.tools import render, run
from gateway.registry import discover_adapters

_SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# How many names an "unknown tenant/route" message lists before "...".
_NAMES_SHOWN = 12


class Expect(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What a case expects; every field given must hold."""

    # The first choice.
    deployment: str | None = None
    # The first choice is one of these (e.g. equal-cost deployments whose order is not the point).
    any_of: tuple[str, ...] | None = None
    # The whole plan, in order.
    plan: tuple[str, ...] | None = None
    # The whole plan, in any order.
    plan_any_order: tuple[str, ...] | None = None
    # The route the request ends on (after rules).
    route: str | None = None
    # A refusal: its HTTP status, its error code (e.g. model_not_found), a piece of its message.
    status: int | None = None
    code: str | None = None
    message_contains: str | None = None


class Case(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    request: dict[str, Any]
    expect: Expect
    tenant: str | None = None
    # Request headers as a client sends them (x-strait-policy, a rule's header, x-strait-priority ...).
    headers: dict[str, str] = {}
    signals: dict[str, Any] = {}
    # The STRAIT_REGION of the replica the request is taken to enter through (None: no region set).
    ingress_region: str | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    file: str
    case: str
    ok: bool
    detail: str
    # The line the case starts on (0: the file as a whole).
    line: int = 0

    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file


def _suite_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*.y*ml") if p.suffix in (".yaml", ".yml"))
    return [path]


def _as_text(value: Any) -> Any:
    """A scalar YAML read as a number or boolean, as the text it was most likely written as."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return value


def _normalise(raw: Any) -> Any:
    if not isinstance(raw, dict):
        return raw
    out = dict(raw)
    if "name" in out:
        out["name"] = _as_text(out["name"])
    if isinstance(out.get("headers"), dict):
        out["headers"] = {str(k): _as_text(v) for k, v in out["headers"].items()}
    return out


def _names(names: Any) -> str:
    listed = sorted(names)
    shown = ", ".join(listed[:_NAMES_SHOWN])
    return (shown + ", ...") if len(listed) > _NAMES_SHOWN else (shown or "none")


def _read(file: Path) -> tuple[Any, list[int]]:
    """The file's data and the line each case starts on (1-based; 0 when unknown)."""
    loader = _SafeLoader(file.read_text(encoding="utf-8"))
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    finally:
        loader.dispose()
    lines: list[int] = []
    if isinstance(root, yaml.MappingNode):
        for key, value in root.value:
            if isinstance(key, yaml.ScalarNode) and key.value == "cases" and isinstance(value, yaml.SequenceNode):
                lines = [item.start_mark.line + 1 for item in value.value]
    return data, lines


def run_file(file: Path, adapters: Any = None) -> list[Outcome]:
    name = str(file)
    try:
        data, lines = _read(file)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        return [Outcome(name, "(file)", False, f"cannot read test file: {exc}")]
    if not isinstance(data, dict) or not isinstance(data.get("policy"), str) or not isinstance(data.get("cases"), list):
        return [Outcome(name, "(file)", False, "a test file is a mapping with `policy` (a path) and `cases` (a list)")]
    unknown = sorted(set(data) - {"policy", "cases"})
    if unknown:
        return [Outcome(name, "(file)", False, f"unknown keys {unknown} (a test file has `policy` and `cases`)")]
    try:
        index = PolicyIndex.of(load_policy(file.parent / data["policy"], adapters=adapters))
    except PolicyError as exc:
        return [Outcome(name, "(policy)", False, f"policy {data['policy']} does not load:\n{exc}")]
    outcomes = []
    for i, raw in enumerate(data["cases"]):
        line = lines[i] if i < len(lines) else 0
        raw = _normalise(raw)
        named = raw.get("name") if isinstance(raw, dict) else None
        label = named if isinstance(named, str) else f"case {i + 1}"
        try:
            case = msgspec.convert(raw, Case)
        except msgspec.ValidationError as exc:
            outcomes.append(Outcome(name, label, False, f"invalid case: {exc}", line))
            continue
        outcomes.append(run_case(name, index, case, line))
    return outcomes


def run_suites(path: Path) -> list[Outcome]:
    adapters = discover_adapters().keys()
    if not path.exists():
        return [Outcome(str(path), "(file)", False, "no such file or directory")]
    files = _suite_files(path)
    if not files:
        return [Outcome(str(path), "(file)", False, "no .yaml test files here")]
    return [outcome for file in files for outcome in run_file(file, adapters)]


def _unknown_names(index: PolicyIndex, case: Case) -> str | None:
    """Why a case names something the policy does not have, unless the case expects that refusal."""
    if case.tenant is not None and case.tenant not in index.tenants:
        return f"unknown tenant {case.tenant!r} (the policy's tenants: {_names(index.tenants)})"
    route = case.request.get("model")
    e = case.expect
    expects_not_found = e.status == 404 or e.code == "model_not_found"
    if isinstance(route, str) and route not in index.routes and not expects_not_found:
        return f"unknown route {route!r} (the policy's routes: {_names(index.routes)})"
    return None


def _refusal_problems(e: Expect, exc: GatewayError) -> list[str]:
    if e.status is None and e.code is None:
        return [f"refused with {exc.status} {exc.code or ''}: {exc.message}".replace("  ", " ")]
    problems = []
    if e.status is not None and exc.status != e.status:
        problems.append(f"expected status {e.status}, got {exc.status}: {exc.message}")
    if e.code is not None and exc.code != e.code:
        problems.append(f"expected code {e.code}, got {exc.code}: {exc.message}")
    if e.message_contains and e.message_contains not in exc.message:
        problems.append(f"message lacks {e.message_contains!r}: {exc.message}")
    return problems


def _plan_problems(e: Expect, got: tuple[str, ...], route: str) -> list[str]:
    first = got[0] if got else None
    problems = []
    if e.status is not None or e.code is not None:
        problems.append(
            f"expected a refusal ({e.status or ''} {e.code or ''}), got plan {list(got)}".replace("( ", "(")
        )
    if e.deployment is not None and first != e.deployment:
        problems.append(f"expected {e.deployment}, got {first}")
    if e.any_of is not None and first not in e.any_of:
        problems.append(f"expected one of {list(e.any_of)}, got {first}")
    if e.plan is not None and got != e.plan:
        problems.append(f"expected plan {list(e.plan)}, got {list(got)}")
    if e.plan_any_order is not None and sorted(got) != sorted(e.plan_any_order):
        problems.append(f"expected plan (any order) {sorted(e.plan_any_order)}, got {list(got)}")
    if e.route is not None and route != e.route:
        problems.append(f"expected route {e.route}, got {route}")
    return problems


def run_case(file: str, index: PolicyIndex, case: Case, line: int = 0) -> Outcome:
    unknown = _unknown_names(index, case)
    if unknown is not None:
        return Outcome(file, case.name, False, unknown, line)
    e = case.expect
    try:
        plan = run(
            index,
            case.tenant,
            case.request,
            headers=case.headers,
            signals=case.signals,
            ingress_region=case.ingress_region,
        )
    except GatewayError as exc:
        problems = _refusal_problems(e, exc)
        if problems:
            return Outcome(file, case.name, False, "; ".join(problems), line)
        return Outcome(file, case.name, True, f"refused with {exc.status} as expected", line)
    except (ValueError, TypeError, msgspec.ValidationError) as exc:
        # e.g. signals of the wrong shape: this case cannot run, the others still do.
        return Outcome(file, case.name, False, f"cannot run this case: {exc}", line)
    got = plan.decision.plan
    problems = _plan_problems(e, got, plan.decision.route)
    if problems:
        return Outcome(file, case.name, False, "; ".join(problems) + "\n" + render(plan.decision), line)
    return Outcome(file, case.name, True, f"-> {got[0] if got else None}", line)


def summary(outcomes: list[Outcome]) -> tuple[list[str], int]:
    """The lines `strait policy test` prints and the number of failures."""
    lines = [f"{'PASS' if o.ok else 'FAIL'} {o.where()}: {o.case}: {o.detail}" for o in outcomes]
    failed = sum(1 for o in outcomes if not o.ok)
    lines.append(f"{len(outcomes) - failed} passed, {failed} failed")
    return lines, failed
