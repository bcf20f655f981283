"""A route's shadow and canary in the policy: `strait policy check` refuses bad ones at their line, and the
pure engine filters both candidates like any (compliance, capabilities), puts a canary first for the
conversations in its share (sticky: a hash of tenant, route and the conversation's stable start), and
says what it did in the decision table."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.canonical import Message
from gateway.policy.engine import RequestFeatures, decide
from gateway.policy.index import PolicyIndex, Principal
from gateway.policy.load import check_policy, load_policy
from gateway.policy.tools import render
from gateway.policy.trials import conversation_material, in_canary, share_of

POLICY = """
version: 1
backends:
  - {name: live, adapter: simulated, hosting: {jurisdiction: DE}}
  - {name: us, adapter: simulated, hosting: {jurisdiction: US}}
  - {name: eu, adapter: simulated, hosting: {jurisdiction: FR}}
models:
  - {name: m, capabilities: [chat, completions, tools], deployments: [{backend: live, upstream_model: m}]}
  - {name: cand-us, deployments: [{backend: us, upstream_model: lora}]}
  - {name: cand-eu, capabilities: [chat], deployments: [{backend: eu, upstream_model: lora}]}
routes:
  - {name: chat, models: [m], canary: {model: cand-eu, weight: 0.5}, shadow: {model: cand-eu, sample_rate: 1}}
  - {name: us, models: [m], canary: {model: cand-us, weight: 1.0}, shadow: {model: cand-us}}
tenants:
  - {name: open}
  - {name: eu-only, compliance: {allowed_jurisdictions: [EU]}}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def problems(tmp_path: Path, route_extra: str) -> list[str]:
    path = write(
        tmp_path,
        f"""
        version: 1
        backends: [{{name: a, adapter: simulated}}]
        models:
          - {{name: m, deployments: [{{backend: a, upstream_model: m}}]}}
          - {{name: c, deployments: [{{backend: a, upstream_model: c}}]}}
        routes:
          - name: chat
            models: [m]
            {route_extra}
        """,
    )
    _, found = check_policy(path, fresh=True)
    return [f"{p.line}: {p.reason}" for p in found if p.severity == "error"]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("shadow: {model: nope}", "10: route 'chat': unknown shadow model 'nope'"),
        ("canary: {model: nope, weight: 0.1}", "10: route 'chat': unknown canary model 'nope'"),
        ("canary: {model: m, weight: 0.1}", "10: route 'chat': canary model 'm' is already one of the route's models"),
        ("shadow: {model: m}", "10: route 'chat': shadow model 'm' is already one of the route's models"),
        ("canary: {model: c, weight: 1.5}", "Expected `float` <= 1.0"),
        ("canary: {model: c, weight: -0.01}", "Expected `float` >= 0.0"),
        ("shadow: {model: c, sample_rate: 2}", "Expected `float` <= 1.0"),
        ("shadow: {model: c, sample_rate: 0.5, extra: 1}", "unknown field"),
        ("shadow: {model: c, usd_per_day: -1}", "Expected `float` >= 0"),
        ("shadow: {model: c, usd_per_day: lots}", "Expected `float | null`"),
    ],
)
def test_policy_check_refuses_bad_shadow_and_canary_at_their_line(tmp_path: Path, extra: str, expected: str) -> None:
    found = problems(tmp_path, extra)
    assert found, extra
    assert any(expected in p for p in found), found
    assert all(p.split(":")[0] == "10" for p in found), found  # the route's line in the file


def test_a_good_shadow_and_canary_load(tmp_path: Path) -> None:
    assert problems(tmp_path, "canary: {model: c, weight: 0.1}") == []
    assert problems(tmp_path, "shadow: {model: c, sample_rate: 0.25, timeout_s: 5}") == []
    assert problems(tmp_path, "shadow: {model: c, sample_rate: 0.25, usd_per_day: 2.5}") == []


def test_a_shadow_budget_of_zero_is_warned_about(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        version: 1
        backends: [{name: a, adapter: simulated}]
        models:
          - {name: m, deployments: [{backend: a, upstream_model: m}]}
          - {name: c, deployments: [{backend: a, upstream_model: c}]}
        routes:
          - {name: chat, models: [m], shadow: {model: c, usd_per_day: 0}}
        """,
    )
    _, found = check_policy(path, fresh=True)
    assert [(p.severity, p.reason) for p in found] == [
        ("warning", "route 'chat': a shadow with usd_per_day 0 copies nothing (every copy is over budget)")
    ]


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> PolicyIndex:
    return PolicyIndex(load_policy(write(tmp_path_factory.mktemp("p"), POLICY)))


def chat(topic: str, turns: int = 1, route: str = "chat") -> RequestFeatures:
    messages = [Message(role="system", content="Be brief."), Message(role="user", content=f"About {topic}?")]
    for i in range(1, turns):
        messages += [Message(role="assistant", content=f"A{i}"), Message(role="user", content=f"More {i}")]
    return RequestFeatures(route=route, messages=tuple(messages))


def who(tenant: str) -> Principal:
    return Principal(tenant=tenant, key_id="k", allowed_routes=None)


def test_the_canary_serves_the_conversations_in_its_share_and_the_route_backs_it(index: PolicyIndex) -> None:
    served = 0
    for i in range(200):
        plan = decide(index, who("open"), chat(f"topic {i}"))
        material = conversation_material(chat(f"topic {i}").messages, ())
        assert material is not None
        inside, _ = in_canary("open", "chat", material, 0.5)
        labels = [t.label for t in plan.targets]
        assert plan.canary is inside
        assert labels == (["cand-eu@eu", "m@live"] if inside else ["m@live"])
        assert plan.decision.canary is not None
        assert plan.decision.canary.startswith("cand-eu@eu serves" if inside else "not in the canary's share")
        served += inside
    assert 0 < served < 200


def test_every_turn_of_a_conversation_is_on_the_same_side(index: PolicyIndex) -> None:
    for i in range(50):
        sides = {decide(index, who("open"), chat(f"t{i}", turns)).targets[0].label for turns in range(1, 6)}
        assert len(sides) == 1


def test_compliance_filters_the_canary_and_the_shadow_like_any_candidate(index: PolicyIndex) -> None:
    # eu-only may not use the US candidate: no canary (even at weight 1), no shadow, each with the reason.
    plan = decide(index, who("eu-only"), chat("x", route="us"))
    assert [t.label for t in plan.targets] == ["m@live"]
    assert not plan.canary
    assert plan.decision.canary is not None and plan.decision.canary.startswith("not applied: cand-us@us:")
    assert plan.shadow is None and plan.shadow_excluded == "compliance"
    assert plan.decision.shadow is not None and "cand-us@us" in plan.decision.shadow
    # The open tenant may: weight 1 serves every conversation; the shadow may copy to it.
    plan = decide(index, who("open"), chat("x", route="us"))
    assert [t.label for t in plan.targets] == ["cand-us@us", "m@live"]
    assert plan.shadow is not None and plan.shadow.label == "cand-us@us"
    assert plan.shadow_excluded is None


def test_a_candidate_lacking_a_capability_is_not_tried(index: PolicyIndex) -> None:
    # cand-eu declares chat only: a request with tools is neither canaried nor shadowed there.
    features = RequestFeatures(route="chat", messages=chat("tools").messages, needs=frozenset({"tools"}))
    for i in range(30):
        features = RequestFeatures(route="chat", messages=chat(f"tools {i}").messages, needs=frozenset({"tools"}))
        plan = decide(index, who("open"), features)
        assert [t.label for t in plan.targets] == ["m@live"]
        assert plan.shadow_excluded == "capability"


def test_the_canarys_share_of_many_conversations_is_its_weight() -> None:
    # A fixed key set: n = 40,000 conversations; the share's standard deviation at w = 0.5 is
    # sqrt(0.25 / 40,000) = 0.0025, so +-2 % is 8 sigma (at w = 0.1, 0.0015: 13 sigma).
    n = 40_000
    shares = [share_of("tenant", "chat", f"conversation {i}".encode()) for i in range(n)]
    for weight in (0.01, 0.1, 0.25, 0.5, 0.9):
        got = sum(u < weight for u in shares) / n
        assert abs(got - weight) <= 0.02, (weight, got)


@settings(max_examples=200, deadline=None)
@given(
    tenant=st.text(max_size=20),
    route=st.text(max_size=20),
    material=st.binary(max_size=64),
    low=st.floats(0, 1),
    high=st.floats(0, 1),
)
def test_the_share_is_sticky_and_raising_the_weight_only_adds(
    tenant: str, route: str, material: bytes, low: float, high: float
) -> None:
    low, high = min(low, high), max(low, high)
    u = share_of(tenant, route, material)
    assert 0 <= u < 1
    assert share_of(tenant, route, material) == u
    if in_canary(tenant, route, material, low)[0]:
        assert in_canary(tenant, route, material, high)[0]
    assert not in_canary(tenant, route, material, 0.0)[0]
    assert in_canary(tenant, route, material, 1.0)[0]


def test_tenants_are_hashed_apart() -> None:
    # The same opening message in two tenants lands independently: over many conversations the two
    # tenants' sides differ about half the time (w = 0.5), never always.
    n = 2000
    differ = sum(
        in_canary("a", "chat", f"c{i}".encode(), 0.5)[0] != in_canary("b", "chat", f"c{i}".encode(), 0.5)[0]
        for i in range(n)
    )
    assert 0.4 * n < differ < 0.6 * n


def test_policy_explain_prints_what_the_canary_and_the_shadow_did(index: PolicyIndex) -> None:
    text = render(decide(index, who("open"), chat("x", route="us")).decision)
    assert "canary: cand-us@us serves this conversation" in text
    assert "shadow: cand-us@us" in text
    text = render(decide(index, who("eu-only"), chat("x", route="us")).decision)
    assert "canary: not applied: cand-us@us:" in text
    assert "shadow: not applied: cand-us@us:" in text
