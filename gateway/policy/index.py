"""A loaded policy, indexed for the hot path: every lookup a request needs is one dict access.

Built once per policy load (and per reload), never per request; immutable once built. The tables
derived from the policy (candidates, compliance verdicts, rule index, limit sections, header blocks)
are compiled here by gateway.policy.compile.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

import msgspec

from gateway.canonical import Operation
from gateway.policy.compile import (
    Candidates,
    PromptNeeds,
    TenantTables,
    TrialKey,
    compile_candidates,
    compile_prompt_needs,
    compile_tenants,
    compile_trials,
    deployment_header,
)
from gateway.policy.entities import UNKNOWN_ENTITY, Entity, effective_origin, entity
from gateway.policy.model import Backend, Deployment, Model, Origin, PolicySet, Route, Tenant
from gateway.policy.places import BUILTIN, Places
from gateway.policy.rates import ZERO_RATES, RateCard, rate_card

_NEEDS: Final[dict[Operation, str]] = {"chat": "chat", "completions": "completions", "embeddings": "embeddings"}


def key_digest(key: str) -> str:
    """The digest stored in policy files for an API key: `sha256:<hex>`."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_problem(key: str) -> str | None:
    """Why `key` could never authenticate, or None. A key travels in an HTTP header, which servers decode
    as latin-1 and clients send without spaces or control characters: only printable ASCII without
    spaces (0x21-0x7e) can arrive as it was hashed (a UTF-8 key's digest would never match)."""
    if not key:
        return "the key is empty"
    for i, ch in enumerate(key):
        if not "!" <= ch <= "~":
            what = "a space" if ch == " " else "a control character" if ch.isascii() else "a non-ASCII character"
            return (
                f"the key contains {what} ({ch!r} at position {i}); API keys must be printable ASCII without "
                "spaces, or clients can never send them in an Authorization header"
            )
    return None


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    key_id: str
    # None means every route.
    allowed_routes: frozenset[str] | None

    def may_use(self, route: str) -> bool:
        return self.allowed_routes is None or route in self.allowed_routes


ANONYMOUS: Final = Principal(tenant="anonymous", key_id="anonymous", allowed_routes=None)


@dataclass(frozen=True, slots=True)
class Target:
    """One place a request may run: a model's deployment on a backend."""

    model: Model
    deployment: Deployment
    backend: Backend
    # `model@backend`, as in headers and decision tables, the model's capabilities as a set, and the
    # `x-strait-deployment` header pre-encoded: derived once at construction, read on every request.
    label: str = ""
    capabilities: frozenset[str] = frozenset()
    header: tuple[bytes, bytes] = (b"", b"")
    # Its engine continues a final assistant message (the backend's or the deployment's `prefill`).
    prefill: bool = False
    # The deployment's price as exact rates (gateway.policy.rates), read by every admission and record.
    rates: RateCard = ZERO_RATES
    # What compliance reads, resolved once by the policy's index (`resolved=True`): the model's effective
    # origin (a fine-tune's base model's unless it declares its own), the operator as an entity with its
    # parents, and the policy's places (its blocs). A Target built alone resolves them from itself: the
    # model's own origin, the operator's name without parents, the built-in blocs.
    origin: Origin | None = None
    operator: Entity = UNKNOWN_ENTITY
    places: Places = BUILTIN
    resolved: bool = False

    def __post_init__(self) -> None:
        if not self.resolved:
            object.__setattr__(self, "origin", self.model.origin)
            object.__setattr__(self, "operator", entity(self.backend.hosting.operator, {}))
        object.__setattr__(self, "label", f"{self.model.name}@{self.backend.name}")
        object.__setattr__(self, "capabilities", frozenset(self.model.capabilities))
        serving = (*self.backend.capabilities, *self.deployment.capabilities)
        object.__setattr__(self, "prefill", "prefill" in serving)
        object.__setattr__(self, "header", deployment_header(self.label))
        object.__setattr__(self, "rates", rate_card(self.deployment.price))


def policy_json(policy: PolicySet) -> Iterator[bytes]:
    """`msgspec.json.encode(policy)` in pieces, each entry of a section (a backend, a tenant) its own: one
    encode of a whole enterprise-size policy is a C call that holds the GIL for 10-15 ms, a stall of the
    event loop when a reload's worker thread builds the index. Joined, the pieces are the same bytes."""
    for i, (field, name) in enumerate(zip(policy.__struct_fields__, policy.__struct_encode_fields__, strict=True)):
        value = getattr(policy, field)
        yield (b"{" if i == 0 else b",") + msgspec.json.encode(name) + b":"
        if type(value) is tuple and value:
            for j, entry in enumerate(value):
                yield (b"[" if j == 0 else b",") + msgspec.json.encode(entry)
            yield b"]"
        else:
            yield msgspec.json.encode(value)
    yield b"}"


def policy_version(policy: PolicySet) -> str:
    """The policy's version: the first 12 hex digits of the sha256 of its JSON encoding."""
    digest = hashlib.sha256()
    for piece in policy_json(policy):
        digest.update(piece)
    return digest.hexdigest()[:12]


class PolicyIndex:
    # The index built last, with the policy it indexes: `of` hands it out again for the same policy
    # object (a load checks a policy with its index, then the runtime, the embedders and the CLI use it).
    _last: tuple[PolicySet, PolicyIndex] | None = None

    @classmethod
    def of(cls, policy: PolicySet) -> PolicyIndex:
        """The index of `policy`, built once per policy object: at enterprise size (thousands of tenants)
        a build costs a second, and a load would otherwise pay it three times. The object is compared by
        identity, so a policy loaded again gets a new index; one tuple assignment, safe across threads."""
        last = cls._last
        if last is not None and last[0] is policy:
            return last[1]
        index = cls(policy)
        cls._last = (policy, index)
        return index

    def __init__(self, policy: PolicySet) -> None:
        self.policy = policy
        # Names the policy a decision was made under (in decisions and explain output).
        self.version = policy_version(policy)
        self.tenants: dict[str, Tenant] = {t.name: t for t in policy.tenants}
        # The tenant of unauthenticated requests when the policy has no keys at all.
        self.open_tenant = Tenant(name=ANONYMOUS.tenant)
        self.routes: dict[str, Route] = {r.name: r for r in policy.routes}
        self.models: dict[str, Model] = {m.name: m for m in policy.models}
        self.backends: dict[str, Backend] = {b.name: b for b in policy.backends}
        self.principals: dict[str, Principal] = {}
        for tenant in policy.tenants:
            allowed = None if "*" in tenant.allowed_routes else frozenset(tenant.allowed_routes)
            for key in tenant.keys:
                self.principals[key.digest] = Principal(tenant=tenant.name, key_id=key.id, allowed_routes=allowed)
        self.admin_digests = frozenset(policy.server.admin_keys)
        # Without any key in the policy the gateway is open (demo and single-user setups).
        self.auth_required = bool(self.principals)
        self.operators = {o.name: o for o in policy.operators}
        self.places = Places((b.name, b.members) for b in policy.blocs)
        origins = {name: effective_origin(name, self.models) for name in self.models}
        entities = {b.name: entity(b.hosting.operator, self.operators) for b in policy.backends}

        def targets_of(names: Iterable[str], op: Operation) -> tuple[Target, ...]:
            capability = _NEEDS[op]
            return tuple(
                Target(
                    model=m,
                    deployment=d,
                    backend=self.backends[d.backend],
                    origin=origins[m.name],
                    operator=entities[d.backend],
                    places=self.places,
                    resolved=True,
                )
                for m in (self.models[name] for name in names)
                if capability in m.capabilities
                for d in m.deployments
            )

        self.targets: dict[tuple[str, Operation], tuple[Target, ...]] = {}
        for route in policy.routes:
            for op in _NEEDS:
                self.targets[(route.name, op)] = targets_of(route.models, op)
        # Compiled once here: what every request would otherwise recompute from the policy.
        self.candidates: dict[tuple[str, Operation], Candidates] = compile_candidates(self.routes, self.targets)
        # The routes' shadow and canary deployments, judged per compliance envelope like the candidates.
        self.trials: dict[TrialKey, Candidates] = compile_trials(self.routes, lambda m, op: targets_of((m,), op))
        first_embedder = policy.cache.embedders[0].name if policy.cache.embedders else None
        self.tenant_tables: dict[str, TenantTables] = compile_tenants(
            policy.tenants, policy.rules, self.candidates, self.routes, first_embedder, self.trials
        )
        # The open tenant's apart: a policy tenant may be named like it.
        self.open_tables: TenantTables = compile_tenants(
            [self.open_tenant], policy.rules, self.candidates, trials=self.trials
        )[self.open_tenant.name]
        # Whether a decision may need the exact prompt size (else its cheap bound decides the same).
        self.prompt_needs: dict[tuple[str, Operation], PromptNeeds] = compile_prompt_needs(
            self.routes, policy.rules, self.targets
        )
