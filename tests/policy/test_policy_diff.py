"""`strait policy diff` over the gateway's feature log: how many requests move, where, and the cost per day."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.__main__ import main
from gateway.context import RequestContext
from gateway.policy.engine import RequestFeatures, decide
from gateway.policy.index import PolicyIndex, Principal
from gateway.policy.live import LiveState
from gateway.policy.load import load_policy
from gateway.policy.replay import FeatureLine, diff, read_samples
from gateway.stages.observers import FeatureLog, FeatureLogFile

DEMO = Path(__file__).resolve().parents[2] / "policies" / "demo.yaml"
# The candidate: the chat route serves the cloud model only (the edge model leaves it).
CLOUD_FIRST = DEMO.read_text().replace(
    "    models: [llama-3.1-8b-edge, frontier-cloud]\n", "    models: [frontier-cloud]\n"
)


@pytest.fixture(scope="module")
def indexes(tmp_path_factory: pytest.TempPathFactory) -> tuple[PolicyIndex, PolicyIndex]:
    new = tmp_path_factory.mktemp("diff") / "new.yaml"
    new.write_text(CLOUD_FIRST)
    return PolicyIndex(load_policy(DEMO)), PolicyIndex(load_policy(new))


def _line(ts: float, route: str = "chat", **kw: object) -> FeatureLine:
    return FeatureLine(ts=ts, route=route, tenant="demo", prompt_tokens=1000, max_tokens=1000, **kw)  # type: ignore[arg-type]


def test_moves_and_cost_per_day_from_a_sampled_log(indexes: tuple[PolicyIndex, PolicyIndex]) -> None:
    old, new = indexes
    # Two hours of traffic, logged at 50 %: each line stands for two requests.
    lines = [_line(0, sample=0.5), _line(3600, sample=0.5), _line(7200, route="chat-edge", sample=0.5)]
    report = diff(old, new, lines)
    assert (report.lines, report.total, report.moved) == (3, 6, 4)
    assert report.moves == {("llama-3.1-8b-edge@edge-box", "frontier-cloud@cloud-api"): 4}
    text = report.render()
    assert text[1] == "4 of 6 requests move (66.7 %)"
    assert text[2] == "  4 x llama-3.1-8b-edge@edge-box -> frontier-cloud@cloud-api"
    # Edge: 1000 x 0.02 + 1000 x 0.04 per Mtok = 0.00006 USD; cloud: 1000 x 2.5 + 1000 x 10 = 0.0125 USD.
    per_day = 86400 / 7200
    assert report.cost_before == pytest.approx(6 * 0.00006)
    assert report.cost_after == pytest.approx(4 * 0.0125 + 2 * 0.00006)
    assert text[-1] == (
        f"estimated cost per day: {6 * 0.00006 * per_day:.2f} USD -> {(4 * 0.0125 + 2 * 0.00006) * per_day:.2f} USD "
        f"(+{(4 * 0.0125 - 4 * 0.00006) * per_day:.2f} USD, "
        f"{(4 * 0.0125 - 4 * 0.00006) / (6 * 0.00006) * 100:+.1f} %)"
    )


def test_completion_tokens_when_logged_price_the_answer(indexes: tuple[PolicyIndex, PolicyIndex]) -> None:
    old, new = indexes
    report = diff(old, new, [_line(0, completion_tokens=10)])
    assert report.cost_after == pytest.approx((1000 * 2.5 + 10 * 10.0) / 1e6)


def test_refusals_and_unknown_tenants_are_outcomes_too(indexes: tuple[PolicyIndex, PolicyIndex]) -> None:
    old, new = indexes
    report = diff(old, new, [_line(0, route="gone"), FeatureLine(ts=0, route="chat", tenant="nobody")])
    assert report.moved == 0 and report.total == 2  # refused the same way by both


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from(["chat", "chat-edge", "chat-cloud", "nope"]), max_size=12))
def test_a_policy_against_itself_moves_nothing(routes: list[str]) -> None:
    index = PolicyIndex.of(load_policy(DEMO))
    report = diff(index, index, [_line(i * 60.0, route=r) for i, r in enumerate(routes)])
    assert report.moved == 0
    assert report.cost_before == report.cost_after


def test_cli_reads_the_feature_log_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    new = tmp_path / "new.yaml"
    new.write_text(CLOUD_FIRST)
    log = tmp_path / "features.jsonl"
    log.write_text(
        "\n".join(
            json.dumps({"ts": ts, "route": "chat", "tenant": "demo", "prompt_tokens": 10, "deployment": "x"})
            for ts in (0, 1800)
        )
        + "\n"
    )
    assert [type(s).__name__ for s in read_samples(log)] == ["FeatureLine", "FeatureLine"]
    assert main(["policy", "diff", str(DEMO), str(new), "--requests", str(log)]) == 0
    out = capsys.readouterr().out
    assert "2 of 2 requests move (100.0 %)" in out
    assert "a day is extrapolated from 1.00 h" in out  # a 30-minute sample counts as at least an hour
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"route": "chat"}\n')
    assert main(["policy", "diff", str(DEMO), str(new), "--requests", str(bad)]) == 1
    assert "bad.jsonl:1:" in capsys.readouterr().err


def test_the_ingress_region_is_logged_and_replayed(tmp_path: Path) -> None:
    """A feature line carries the replica's STRAIT_REGION, and a replay decides with it: a tenant that
    requires an ingress region is served from a line that entered there, refused from one that did not."""
    strict = tmp_path / "strict.yaml"
    strict.write_text(
        DEMO.read_text().replace(
            '    allowed_routes: ["*"]\n',
            '    allowed_routes: ["*"]\n    compliance: {required_ingress_regions: [eu-west]}\n',
        )
    )
    old, new = PolicyIndex(load_policy(DEMO)), PolicyIndex(load_policy(strict))
    # What the gateway writes: the ingress region of the features the engine decided on.
    out = FeatureLogFile(str(tmp_path / "features.jsonl"), 1.0)
    ctx = RequestContext(request_id="r", operation="chat", started=0.0, headers={})
    ctx.principal = Principal(tenant="demo", key_id="demo", allowed_routes=None)
    log = FeatureLog(out, old)
    for region in ("eu-west", None):
        features = RequestFeatures(route="chat", prompt_tokens=10, ingress_region=region)
        log.observe(ctx, features, LiveState(), decide(old, ctx.principal, features))
    out.close()
    lines = read_samples(tmp_path / "features.jsonl")
    assert [getattr(line, "ingress_region", "?") for line in lines] == ["eu-west", None]
    report = diff(old, new, lines)
    assert report.moves == {("llama-3.1-8b-edge@edge-box", "refused 403 ingress_region_not_allowed"): 1}
