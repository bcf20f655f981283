"""Compliance applies to every candidate of every request, not only the first choice: fallbacks,
spillover, mid-stream continuation targets (gateway.upstream.dispatch.Dispatcher.resume) and cache hits
(gateway.stages.cache: an entry produced by a deployment the requesting tenant may not use now is never
served to it, whichever namespace it sits in). The first choice and fallbacks are covered by the engine
suites (tests/policy); here, the paths outside the engine, run through the real stages."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from gateway.cache.entry import CacheEntry
from gateway.cache.scope import scope_of
from gateway.cache.store import open_cache_store
from gateway.context import RequestContext
from gateway.policy.engine import RequestFeatures, decide
from gateway.policy.features import request_of
from gateway.policy.index import PolicyIndex, Principal
from gateway.policy.live import LiveState
from gateway.policy.model import PolicySet
from gateway.stages.cache import CacheStage
from gateway.telemetry import Metrics
from tests.unit.test_rescue_relay import Breaking, _relay

# Three deployments of one model: `de-1` and `de-2` in Germany, `us` in the US, listed between them.
BACKENDS = [
    {"name": "de-1", "adapter": "simulated", "tier": "edge", "capabilities": ["prefill"],
     "hosting": {"operator": "o", "jurisdiction": "DE"}, "capacity": {"max_concurrency": 4}},
    {"name": "us", "adapter": "simulated", "tier": "self-hosted", "capabilities": ["prefill"],
     "hosting": {"operator": "o", "jurisdiction": "US"}},
    {"name": "de-2", "adapter": "simulated", "tier": "provider", "capabilities": ["prefill"],
     "hosting": {"operator": "o", "jurisdiction": "DE"}},
]  # fmt: skip


def _index(compliance: dict[str, Any], **route: Any) -> PolicyIndex:
    return PolicyIndex(
        msgspec.convert(
            {
                "operators": [{"name": "o", "headquarters": "DE"}],
                "backends": BACKENDS,
                "models": [
                    {"name": "m", "deployments": [{"backend": b["name"], "upstream_model": "u"} for b in BACKENDS]}
                ],
                "routes": [{"name": "r", "models": ["m"], "max_attempts": 3, **route}],
                "tenants": [
                    {"name": "eu", "compliance": compliance, "cache": {"exact": True}},
                    {"name": "any", "cache": {"exact": True}},
                ],
            },
            PolicySet,
        )
    )


EU = {"allowed_jurisdictions": ["EU"]}


def _plan(index: PolicyIndex, tenant: str = "eu", live: LiveState | None = None) -> Any:
    return decide(
        index,
        Principal(tenant=tenant, key_id="k", allowed_routes=None),
        RequestFeatures(route="r"),
        live or LiveState(),
        decision_id="d",
    )


def test_spillover_never_spills_outside_the_envelope() -> None:
    # The German edge is full; the US rack has room and is the next tier, yet only the German provider takes it.
    index = _index(EU, spillover={"tiers": ["edge", "self-hosted", "provider"], "threshold": 0.8})
    plan = _plan(index, live=LiveState(in_flight={"de-1": 4}))
    assert [t.label for t in plan.targets] == ["m@de-2", "m@de-1"]
    assert plan.spilled == {"de-1": "utilisation 1.00 (4 of 4 in flight) >= threshold 0.80"}
    # The same load for an unconstrained tenant spills to the US rack first.
    assert _plan(index, "any", LiveState(in_flight={"de-1": 4})).targets[0].label == "m@us"


async def test_a_mid_stream_continuation_never_goes_to_a_deployment_the_tenant_may_not_use() -> None:
    plan = _plan(_index(EU, resume="continue"))
    assert [t.label for t in plan.targets] == ["m@de-1", "m@de-2"]
    # Every deployment would continue; the US one would even answer at once. The plan the relay rescues
    # from is the compliant one, so it is never asked.
    adapters = {
        "de-1": Breaking("one two "),
        "us": Breaking("three", complete=True),
        "de-2": Breaking("four", complete=True),
    }
    events, _ = await _relay(adapters, plan.targets)
    text = "".join(
        json.loads(e)["choices"][0]["delta"].get("content", "")
        for e in events
        if e.startswith(b"{") and json.loads(e).get("choices")
    )
    assert text == "one two four"
    assert adapters["us"].calls == [] and len(adapters["de-2"].calls) == 1


# ---- cache hits ----


def _ctx(index: PolicyIndex, tenant: str) -> RequestContext:
    request = request_of({"model": "r", "messages": [{"role": "user", "content": "hello"}], "temperature": 0})
    ctx = RequestContext(request_id="req", operation="chat", started=0.0, headers={}, route_name="r")
    ctx.principal = Principal(tenant=tenant, key_id="k", allowed_routes=None)
    ctx.request = request
    plan = _plan(index, tenant)
    ctx.route, ctx.plan, ctx.route_plan = plan.route, plan.targets, plan
    return ctx


async def _lookup(
    index: PolicyIndex, tenant: str, producers: tuple[str, ...], deployment: str = ""
) -> tuple[bool, str]:
    """Store an entry in the namespace this tenant's request looks in (keyed on its first choice), as
    produced by `producers`, and look it up: (served, the x-strait-cache header)."""
    store = open_cache_store("memory")
    metrics = Metrics()
    stage = CacheStage(index, store, {}, metrics, {None: 0.9})
    ctx = _ctx(index, tenant)
    assert ctx.request is not None
    scope = scope_of(ctx.request, tenant=tenant, route="r#0", deployment=ctx.plan[0].label)
    body = json.dumps(
        {
            "id": "chatcmpl-old",
            "object": "chat.completion",
            "created": 1,
            "model": "u",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        }
    ).encode()
    entry = CacheEntry(
        body=body, created_ms=0, expires_ms=2**62, deployment=deployment or producers[0], producers=producers
    )
    await store.put(scope.namespace, scope.exact_key, entry, max_entries=10, max_bytes=1 << 20)
    reply = await stage.on_request(ctx)
    metrics.render()  # folds the counters' pending increments
    counted = metrics.registry.get_sample_value("strait_cache_lookups_total", {"route": "r", "result": "noncompliant"})
    assert (counted or 0) == (0 if reply is not None else 1)
    return reply is not None, ctx.extra_headers.get("x-strait-cache", "hit") if reply is None else "hit"


@pytest.mark.parametrize(
    ("producers", "served"),
    [
        (("m@de-1",), True),
        # The first choice failed, the US deployment answered (a fallback, for a tenant that allowed it
        # then): the entry sits in m@de-1's namespace but is never served to a tenant that may not use m@us.
        (("m@us",), False),
        # A stream broken on de-1 and continued on us: both produced it.
        (("m@de-1", "m@us"), False),
        (("m@de-1", "m@de-2"), True),
        (("m@elsewhere",), False),
    ],
)
async def test_a_cache_hit_is_served_only_if_the_tenant_may_use_every_deployment_that_produced_it(
    producers: tuple[str, ...], served: bool
) -> None:
    got, header = await _lookup(_index(EU), "eu", producers)
    assert got is served
    if not served:
        assert header == "miss"


async def test_an_entry_from_before_producers_were_recorded_is_judged_by_its_deployment() -> None:
    assert (await _lookup(_index(EU), "eu", (), deployment="m@de-1"))[0] is True
    assert (await _lookup(_index(EU), "eu", (), deployment="m@us"))[0] is False


async def test_an_unconstrained_tenant_is_served_whatever_produced_it() -> None:
    assert (await _lookup(_index({}), "any", ("m@us",)))[0] is True
