"""What the accounting stage bills (in process): each usage record carries every token kind and its cost
on the deployment's rate card; a cut stream is charged what the meter counted (reasoning included),
flagged partial; a failed attempt costs nothing, request fee included; continued attempts keep their kinds."""

from __future__ import annotations

from pathlib import Path

import msgspec

from gateway.accounting.counts import TokenCounts
from gateway.accounting.ledger import MemoryLedger
from gateway.accounting.records import UsageRecord
from gateway.accounting.spool import Spool
from gateway.accounting.writer import UsageWriter
from gateway.context import ContinuedAttempt, RequestContext
from gateway.contracts import End
from gateway.policy.index import Principal, Target
from gateway.policy.model import Backend, Deployment, Model, Price
from gateway.stages.accounting import AccountingStage
from gateway.state import MemoryStore
from gateway.telemetry import Metrics
from gateway.tokens import PromptTokens
from gateway.upstream.wire import Usage

PRICE = Price(
    input_per_mtok=2,
    cached_input_per_mtok=0.5,
    cache_write_per_mtok=2.5,
    output_per_mtok=8,
    reasoning_per_mtok=12,
    per_request=0.001,
)


class Captured(UsageWriter):
    def __init__(self, tmp_path: Path) -> None:
        super().__init__(MemoryLedger(), Spool(tmp_path))
        self.records: list[UsageRecord] = []

    def submit(self, record: UsageRecord) -> None:
        self.records.append(record)


def _target(name: str = "m", price: Price = PRICE) -> Target:
    backend = Backend(name="b", adapter="openai", base_url="http://upstream.invalid/v1")
    deployment = Deployment(backend="b", upstream_model="x", price=price)
    return Target(model=Model(name=name, deployments=(deployment,)), deployment=deployment, backend=backend)


def _setup(tmp_path: Path) -> tuple[AccountingStage, Captured, Metrics, RequestContext]:
    writer = Captured(tmp_path)
    metrics = Metrics()
    stage = AccountingStage(writer, MemoryStore(), metrics)
    ctx = RequestContext(request_id="r1", operation="chat", started=0.0, headers={}, route_name="chat")
    ctx.principal = Principal(tenant="t", key_id="k", allowed_routes=None)
    ctx.target = _target()
    ctx.prompt_tokens = PromptTokens.of(40)
    return stage, writer, metrics, ctx


def _kinds(r: UsageRecord) -> tuple[int, int, int, int, int]:
    return (r.prompt_tokens, r.cached_tokens, r.cache_write_tokens, r.completion_tokens, r.reasoning_tokens)


async def test_provider_usage_is_billed_by_kind(tmp_path: Path) -> None:
    stage, writer, metrics, ctx = _setup(tmp_path)
    usage = msgspec.json.decode(
        b'{"prompt_tokens": 100, "completion_tokens": 30, "total_tokens": 130,'
        b' "prompt_tokens_details": {"cached_tokens": 60, "cache_write_tokens": 10},'
        b' "completion_tokens_details": {"reasoning_tokens": 20}}',
        type=Usage,
    )
    stage.complete(ctx, End("completed", 200, usage=usage))
    [record] = writer.records
    assert _kinds(record) == (100, 60, 10, 30, 20)
    # 30 x 2 + 60 x 0.5 + 10 x 2.5 + 10 x 8 + 20 x 12 + 1000 (the request fee)
    assert record.cost_micro_usd == 60 + 30 + 25 + 80 + 240 + 1000
    assert record.usage_source == "provider" and not record.partial
    page = metrics.render().decode()
    for kind, n in (("prompt", 100), ("cached", 60), ("cache_write", 10), ("completion", 30), ("reasoning", 20)):
        assert f'kind="{kind}",route="chat",tenant="t"}} {float(n)}' in page, kind


async def test_a_cut_stream_without_usage_is_charged_what_was_counted(tmp_path: Path) -> None:
    stage, writer, _, ctx = _setup(tmp_path)
    stage.complete(
        ctx, End("upstream_failed", 502, completion_tokens=15, reasoning_tokens=6, partial=True, stream=True)
    )
    [record] = writer.records
    assert _kinds(record) == (40, 0, 0, 15, 6)
    assert record.partial and record.usage_source == "estimated" and record.status == 502
    assert record.cost_micro_usd == 40 * 2 + 9 * 8 + 6 * 12 + 1000


async def test_failed_attempts_cost_nothing_and_continued_ones_keep_their_kinds(tmp_path: Path) -> None:
    stage, writer, _, ctx = _setup(tmp_path)
    failed = _target("failed")
    ctx.failed_attempts.append((failed, "503", 0.1))
    ctx.continued.append(
        ContinuedAttempt(
            target=_target("broken", Price(input_per_mtok=1, output_per_mtok=1, reasoning_per_mtok=3)),
            status=502,
            seconds=0.5,
            tokens=TokenCounts(prompt=40, completion=10, cached=30, cache_write=0, reasoning=4),
            estimated=False,
        )
    )
    usage = Usage(prompt_tokens=50, completion_tokens=5, total_tokens=55)
    assert stage.complete(ctx, End("completed", 200, usage=usage)) == (50, 5)
    first, second, final = writer.records
    assert (first.model, first.cost_micro_usd, _kinds(first)) == ("failed", 0, (0, 0, 0, 0, 0))
    assert (second.model, _kinds(second), second.partial) == ("broken", (40, 30, 0, 10, 4), True)
    assert second.cost_micro_usd == 40 * 1 + 6 * 1 + 4 * 3
    assert (final.model, _kinds(final), final.final) == ("m", (50, 0, 0, 5, 0), True)
    assert final.cost_micro_usd == 50 * 2 + 5 * 8 + 1000
