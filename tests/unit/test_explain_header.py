"""The `x-strait-explain` summary: the plan with the ingress region the request entered through and what
each planned deployment runs on and where, bounded in size whatever the policy's names."""

from __future__ import annotations

import json

from gateway.policy.engine import Decision, Row
from gateway.stages.explain import EXPLAIN_HEADER_MAX, explain_header


def _decision(*, excluded: int = 1, reason: str = "hosting jurisdiction US is not in the allowed ['EU']") -> Decision:
    rows = [
        Row(deployment="m@gpu-eu", model="m", backend="gpu-eu", tier="self-hosted", rank=1,
            hardware="8x H100 80GB", region="eu-central"),
        Row(deployment="m@nohw", model="m", backend="nohw", tier="provider", rank=2),
        *(
            Row(deployment=f"m@us{i}", model="m", backend=f"us{i}", tier="provider", excluded=reason,
                hardware="1x L4 24GB", region="us-east")
            for i in range(excluded)
        ),
    ]  # fmt: skip
    return Decision(
        id="d-1",
        policy_version="v",
        tenant="t",
        requested_route="r",
        route="r",
        objective="cost",
        rules=(),
        rows=tuple(rows),
        plan=("m@gpu-eu", "m@nohw"),
        ingress_region="eu-west",
    )


def test_the_summary_names_the_ingress_region_and_the_planned_hardware_and_regions() -> None:
    doc = json.loads(explain_header(_decision()))
    assert doc["ingress_region"] == "eu-west"
    # Only planned deployments, and only what they declare (m@nohw declares neither).
    assert doc["hardware"] == {"m@gpu-eu": "8x H100 80GB"}
    assert doc["regions"] == {"m@gpu-eu": "eu-central"}
    assert doc["excluded"] == {"m@us0": "hosting jurisdiction US is not in the allowed ['EU']"}
    assert doc["table"] == "/admin/decisions/d-1"


def test_no_ingress_region_is_left_out() -> None:
    decision = _decision()
    doc = json.loads(explain_header(Decision(**{**{f: getattr(decision, f) for f in decision.__struct_fields__},
                                                "ingress_region": None})))  # fmt: skip
    assert "ingress_region" not in doc


def test_the_summary_stays_bounded_dropping_exclusions_first() -> None:
    many = explain_header(_decision(excluded=200))
    assert len(many) <= EXPLAIN_HEADER_MAX
    doc = json.loads(many)
    assert doc["excluded_count"] == 200 and "excluded" not in doc
    assert doc["hardware"] == {"m@gpu-eu": "8x H100 80GB"} and doc["ingress_region"] == "eu-west"


def test_huge_policy_names_still_give_a_bounded_json_header() -> None:
    decision = _decision(excluded=3)
    rows = tuple(
        Row(**{**{f: getattr(r, f) for f in r.__struct_fields__}, "hardware": "x" * 5000}) for r in decision.rows
    )
    fields = {f: getattr(decision, f) for f in decision.__struct_fields__}
    header = explain_header(Decision(**{**fields, "rows": rows}))
    assert len(header) <= EXPLAIN_HEADER_MAX
    doc = json.loads(header)
    assert "hardware" not in doc and doc["excluded_count"] == 3 and doc["plan"] == ["m@gpu-eu", "m@nohw"]
    header = explain_header(Decision(**{**fields, "route": "r" * 10_000}))
    assert len(header) <= EXPLAIN_HEADER_MAX and json.loads(header)["table"] == "/admin/decisions/d-1"
