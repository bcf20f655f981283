"""The bill of a held whole answer (`resume: restart`) that broke after content: the upstream's usage
when one of its held events carries it, else tiktoken over the held text and the request's prompt."""

from __future__ import annotations

from gateway.accounting.counts import TokenCounts
from gateway.context import RequestContext
from gateway.policy.index import Target
from gateway.policy.model import Backend, Deployment, Model
from gateway.tokens import PromptTokens, count_text
from gateway.upstream.broken_bill import broken_attempt

ROLE = b'{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}'
HELLO = b'{"choices": [{"index": 0, "delta": {"content": "Hello there, general"}}]}'
WORLD = b'{"choices": [{"index": 0, "delta": {"content": " Kenobi and friends"}}]}'
USAGE = (
    b'{"choices": [], "usage": {"prompt_tokens": 31, "completion_tokens": 17, "total_tokens": 48,'
    b' "prompt_tokens_details": {"cached_tokens": 8, "cache_write_tokens": 5},'
    b' "completion_tokens_details": {"reasoning_tokens": 6}}}'
)


def _target() -> Target:
    backend = Backend(name="b", adapter="openai", base_url="http://upstream.invalid/v1")
    deployment = Deployment(backend="b", upstream_model="m")
    return Target(model=Model(name="model-b", deployments=(deployment,)), deployment=deployment, backend=backend)


def _ctx() -> RequestContext:
    ctx = RequestContext(request_id="r1", operation="chat", started=0.0, headers={}, route_name="chat")
    ctx.prompt_tokens = PromptTokens.of(12)
    return ctx


async def test_without_usage_the_held_text_is_counted_and_flagged_estimated() -> None:
    target = _target()
    bill = await broken_attempt(_ctx(), target, [ROLE, HELLO, WORLD], 502, 0.25)
    expected = count_text("Hello there, general", target.model.tokenizer)
    expected += count_text(" Kenobi and friends", target.model.tokenizer)
    assert bill.tokens == TokenCounts(prompt=12, completion=expected)
    assert bill.tokens.completion > 0
    assert bill.estimated and bill.restarted
    assert (bill.target, bill.status, bill.seconds) == (target, 502, 0.25)


async def test_the_upstreams_usage_wins_when_it_sent_one() -> None:
    bill = await broken_attempt(_ctx(), _target(), [ROLE, HELLO, USAGE], 504, 1.0)
    # Every kind the provider reported is billed: cache reads and writes, reasoning.
    assert bill.tokens == TokenCounts(prompt=31, completion=17, cached=8, cache_write=5, reasoning=6)
    assert not bill.estimated and bill.restarted
