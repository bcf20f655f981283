"""The dispatcher's record of attempts: each deployment tried appears once, the one whose answer the
client gets as the final attempt; and an upstream's usage numbers are clamped where they are decoded."""

from __future__ import annotations

import msgspec

from gateway.canonical import Request
from gateway.context import RequestContext
from gateway.contracts import UpstreamCall, UpstreamConnectError, UpstreamResponse
from gateway.policy.index import Principal, Target
from gateway.policy.model import Backend, Deployment, Model
from gateway.telemetry import Metrics
from gateway.upstream.dispatch import Dispatcher
from gateway.upstream.signals import LiveSignals
from gateway.upstream.wire import MAX_USAGE_TOKENS, Usage


class Busy:
    async def send(self, call: UpstreamCall) -> UpstreamResponse:
        return UpstreamResponse(status=503, body=b'{"error": {"message": "busy"}}')

    async def aclose(self) -> None:
        return None


class Down:
    async def send(self, call: UpstreamCall) -> UpstreamResponse:
        raise UpstreamConnectError("refused")

    async def aclose(self) -> None:
        return None


def target(name: str) -> Target:
    backend = Backend(name=name, adapter="openai", base_url="http://upstream.invalid/v1")
    deployment = Deployment(backend=name, upstream_model="m")
    return Target(model=Model(name=f"model-{name}", deployments=(deployment,)), deployment=deployment, backend=backend)


async def test_an_answer_followed_only_by_unreachable_targets_is_recorded_once_as_the_final_attempt() -> None:
    a, b = target("a"), target("b")
    ctx = RequestContext(request_id="r1", operation="chat", started=0.0, headers={}, route_name="chat")
    ctx.principal = Principal(tenant="t", key_id="k", allowed_routes=None)
    ctx.request = Request(operation="chat", model="chat")
    ctx.plan = (a, b)
    dispatcher = Dispatcher({"a": Busy(), "b": Down()}, Metrics(), LiveSignals())  # type: ignore[dict-item]
    response = await dispatcher.call(ctx)
    assert response.status == 503  # the only answer there was goes to the client
    assert ctx.target is a
    # b failed to connect; a is the final attempt, not also a failed one (it was listed twice).
    assert [(t.backend.name, status) for t, status, _ in ctx.failed_attempts] == [("b", 502)]


def test_upstream_usage_numbers_are_clamped_where_they_are_decoded() -> None:
    usage = msgspec.json.decode(
        b'{"prompt_tokens": -7, "completion_tokens": 1000, "total_tokens": 99999999999999999,'
        b' "prompt_tokens_details": {"cached_tokens": 50}}',
        type=Usage,
    )
    assert usage.prompt_tokens == 0  # a negative count would credit the budget
    assert usage.completion_tokens == 1000
    assert usage.total_tokens == MAX_USAGE_TOKENS
    details = usage.prompt_tokens_details
    assert not isinstance(details, msgspec.UnsetType) and details.cached_tokens == 0  # never above prompt
