"""Stage `route`: the client's `model` names a route; the route gives the ordered plan of targets.

The full policy engine (compliance filters, objectives, live signals) replaces the ordering here; the
stage's contract stays: it writes `ctx.route` and `ctx.plan`, or refuses with a reason.
"""

from __future__ import annotations

from gateway.context import RequestContext
from gateway.errors import InvalidRequest, ModelNotFound
from gateway.policy.index import PolicyIndex


class RouteStage:
    name = "route"

    def __init__(self, index: PolicyIndex) -> None:
        self.index = index

    async def on_request(self, ctx: RequestContext) -> None:
        route = self.index.routes.get(ctx.route_name)
        principal = ctx.principal
        # A route the key may not use is reported like an unknown one: no other tenant's config leaks.
        if route is None or principal is None or not principal.may_use(route.name):
            raise ModelNotFound(
                f"The model '{ctx.route_name}' does not exist or you do not have access to it.", param="model"
            )
        plan = self.index.targets[(route.name, ctx.operation)]
        if not plan:
            raise InvalidRequest(
                f"The model '{route.name}' does not support {ctx.operation}.",
                param="model",
                code="unsupported_operation",
            )
        ctx.route = route
        ctx.plan = plan[: route.max_attempts]
