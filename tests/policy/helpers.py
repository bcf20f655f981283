"""Small builders for policy-engine tests: Structs built directly, no YAML and no loader."""

from __future__ import annotations

from typing import Any

import msgspec

from gateway.policy.engine import RequestFeatures, RoutePlan, decide
from gateway.policy.index import PolicyIndex, Principal, Target
from gateway.policy.live import EMPTY_LIVE, LiveState
from gateway.policy.model import (
    Backend,
    Capacity,
    Compliance,
    Deployment,
    Hosting,
    Model,
    Origin,
    PolicySet,
    Price,
    Route,
    Rule,
    Tenant,
)

ALL_CAPS = ("chat", "completions", "tools", "vision", "json")


def backend(
    name: str,
    *,
    tier: str = "provider",
    juris: str | None = None,
    retention: int | None = None,
    trains: bool | None = False,
    certs: tuple[str, ...] = (),
    operator: str | None = None,
    max_concurrency: int | None = None,
) -> Backend:
    return Backend(
        name=name,
        adapter="simulated",
        tier=tier,  # type: ignore[arg-type]
        hosting=Hosting(
            operator=operator,
            jurisdiction=juris,
            retention_days=retention,
            trains_on_data=trains,
            certifications=certs,
        ),
        capacity=Capacity(max_concurrency=max_concurrency),
    )


def dep(backend_name: str, inp: float = 0.0, out: float = 0.0) -> Deployment:
    return Deployment(
        backend=backend_name,
        upstream_model=f"up-{backend_name}",
        price=Price(input_per_mtok=inp, output_per_mtok=out),
    )


def model(
    name: str,
    *deployments: Deployment,
    caps: tuple[str, ...] = ("chat", "completions"),
    ctx: int | None = None,
    country: str | None = None,
    developer: str | None = None,
) -> Model:
    origin = Origin(country=country, developer=developer) if (country or developer) else None
    return Model(
        name=name,
        deployments=tuple(deployments),
        capabilities=caps,  # type: ignore[arg-type]
        context_window=ctx,
        origin=origin,
    )


def route(name: str, *models: str, **kw: Any) -> Route:
    return msgspec.convert({"name": name, "models": list(models), **kw}, Route)


def tenant(name: str = "t", **compliance: Any) -> Tenant:
    return Tenant(name=name, compliance=msgspec.convert(compliance, Compliance))


def rule(name: str, when: dict[str, Any] | None = None, **then: Any) -> Rule:
    return msgspec.convert({"name": name, "when": when or {}, "then": then}, Rule)


def index(
    backends: list[Backend],
    models: list[Model],
    routes: list[Route],
    tenants: list[Tenant] | None = None,
    rules: list[Rule] | None = None,
) -> PolicyIndex:
    return PolicyIndex(
        PolicySet(
            backends=tuple(backends),
            models=tuple(models),
            routes=tuple(routes),
            tenants=tuple(tenants if tenants is not None else [tenant()]),
            rules=tuple(rules or ()),
        )
    )


def who(tenant_name: str = "t", routes: frozenset[str] | None = None) -> Principal:
    return Principal(tenant=tenant_name, key_id="k1", allowed_routes=routes)


def run(
    idx: PolicyIndex,
    route_name: str = "r",
    *,
    tenant_name: str = "t",
    live: LiveState = EMPTY_LIVE,
    principal: Principal | None = None,
    **features: Any,
) -> RoutePlan:
    f = RequestFeatures(route=route_name, **features)
    return decide(idx, principal or who(tenant_name), f, live, decision_id="d-1")


def labels(plan: RoutePlan) -> list[str]:
    return [t.label for t in plan.targets]


def rows_by_label(plan: RoutePlan) -> dict[str, Any]:
    return {r.deployment: r for r in plan.decision.rows}


def target(b: Backend, m: Model) -> Target:
    return Target(model=m, deployment=m.deployments[0], backend=b)
