"""RequestContext: what one request carries through the pipeline. Each field names its writer and readers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.contracts import Operation
from gateway.policy.index import Principal, Target
from gateway.policy.model import Route


@dataclass(slots=True)
class RequestContext:
    # Written by the API edge; read by every stage.
    request_id: str
    operation: Operation
    started: float
    headers: dict[str, str]
    # The client's body as a mapping (unknown fields kept, forwarded upstream); written by the edge.
    payload: dict[str, Any]
    route_name: str
    stream: bool = False
    # Whether the client asked for the usage chunk (stream_options.include_usage); read by the relay.
    include_usage: bool = False
    # Written by `auth`; read by `route` and later by limits and accounting.
    principal: Principal | None = None
    # Written by `route`: the policy route and the ordered fallback plan.
    route: Route | None = None
    plan: tuple[Target, ...] = ()
    # Written by `upstream`: the target that answered and the attempts made.
    target: Target | None = None
    attempts: int = 0
    extra_headers: dict[str, str] = field(default_factory=dict)
