"""Provider evidence: where the provider says inference ran (Anthropic's `usage.inference_geo`) is kept on
the usage record, and a report outside the backend's declared jurisdiction is counted as a compliance
alert (`strait_compliance_evidence_mismatch_total{deployment}`)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from gateway.accounting.ledger import MemoryLedger
from gateway.accounting.records import UsageRecord
from gateway.accounting.spool import Spool
from gateway.accounting.writer import UsageWriter
from gateway.context import RequestContext
from gateway.contracts import End
from gateway.policy.evidence import MAX_GEO_CHARS, contradicts, reported_geo
from gateway.policy.index import PolicyIndex, Principal
from gateway.policy.model import PolicySet
from gateway.stages.accounting import AccountingStage
from gateway.state import MemoryStore
from gateway.telemetry import Metrics
from gateway.upstream.wire import Usage


class Kept(UsageWriter):
    """The writer, keeping what it is given."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(MemoryLedger(), Spool(tmp_path))
        self.kept: list[UsageRecord] = []

    def submit(self, record: UsageRecord) -> None:
        self.kept.append(record)


def _index(jurisdiction: str | None) -> PolicyIndex:
    hosting = {"jurisdiction": jurisdiction} if jurisdiction else {}
    return PolicyIndex(
        msgspec.convert(
            {
                "blocs": [{"name": "NORTH_AMERICA", "members": ["US", "CA"]}],
                "backends": [{"name": "claude", "adapter": "simulated", "hosting": hosting}],
                "models": [{"name": "m", "deployments": [{"backend": "claude", "upstream_model": "u"}]}],
                "routes": [{"name": "r", "models": ["m"]}],
            },
            PolicySet,
        )
    )


@pytest.mark.parametrize(
    ("declared", "reported", "mismatch"),
    [
        ("US", "us", False),
        ("US", "global", True),  # may have run anywhere: outside a US declaration
        ("EU", "us", True),
        ("NORTH_AMERICA", "us", False),  # inside a user bloc
        ("US", "eu", True),
        (None, "global", False),  # nothing declared, nothing contradicted
    ],
)
async def test_reported_geography_is_recorded_and_a_contradiction_counted(
    tmp_path: Path, declared: str | None, reported: str, mismatch: bool
) -> None:
    index = _index(declared)
    target = index.targets[("r", "chat")][0]
    assert contradicts(target, reported) is mismatch
    writer = Kept(tmp_path)
    metrics = Metrics()
    stage = AccountingStage(writer, MemoryStore(), metrics)
    ctx = RequestContext(request_id="q1", operation="chat", started=0.0, headers={}, route_name="r")
    ctx.principal = Principal(tenant="t", key_id="k", allowed_routes=None)
    ctx.target = target
    usage = Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5, inference_geo=reported)
    stage.complete(ctx, End("completed", 200, usage=usage))
    [record] = writer.kept
    assert record.inference_geo == reported and record.deployment == "m@claude"
    metrics.render()
    counted = metrics.registry.get_sample_value("strait_compliance_evidence_mismatch_total", {"deployment": "m@claude"})
    assert (counted or 0) == (1 if mismatch else 0)
    await stage.drain()


def test_the_usage_block_decodes_the_field_and_bounds_what_is_recorded() -> None:
    usage = msgspec.json.decode(b'{"prompt_tokens":1,"total_tokens":1,"inference_geo":"us"}', type=Usage)
    assert usage.inference_geo == "us"
    absent = msgspec.json.decode(b'{"prompt_tokens":1,"total_tokens":1}', type=Usage)
    assert reported_geo(absent.inference_geo) is None
    assert reported_geo("x" * 1000) == "x" * MAX_GEO_CHARS
    # Re-encoded for a client, a usage block without the field does not grow one.
    assert b"inference_geo" not in msgspec.json.encode(absent)
