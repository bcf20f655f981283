"""Session affinity: the conversation key (stable across turns, per tenant), rendezvous placement (stable,
order-free, minimal movement, balanced) and the engine's use of it (falls back when the conversation's
replica is ejected or saturated, comes back when it recovers, says why in the decision)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.api.openai.decode import decode
from gateway.canonical import Message, Text
from gateway.errors import InvalidRequest
from gateway.policy.affinity import choose, conversation_key, rendezvous_order, replica_weight, stable_prefix
from gateway.policy.features import extract, request_of
from gateway.policy.index import PolicyIndex, Target
from gateway.policy.live import LiveState
from gateway.policy.model import AFFINITY_HEADER_MAX, Affinity
from gateway.stages.explain import explain_header
from tests.policy.helpers import backend, dep, index, labels, model, route, run, target

PREFIX = Affinity()
SESSION = Affinity(key="header", header="X-Session-Id")


def msg(role: str, text: str) -> Message:
    return Message(role=role, content=(Text(text=text),))  # type: ignore[arg-type]


def turns(opening: str, n: int) -> list[tuple[Message, ...]]:
    """The message lists a client sends in turns 1..n of one conversation."""
    convo = [msg("system", "You are terse."), msg("user", opening)]
    out = [tuple(convo)]
    for i in range(1, n):
        convo += [msg("assistant", f"answer {i}"), msg("user", f"follow-up {i}")]
        out.append(tuple(convo))
    return out


def key(messages: tuple[Message, ...], tenant: str = "t", aff: Affinity = PREFIX) -> bytes:
    k = conversation_key(aff, tenant, messages, {})
    assert isinstance(k, bytes)
    return k


REPLICAS = [target(backend(f"gpu{i}", tier="self-hosted"), model("m", dep(f"gpu{i}"))) for i in range(6)]
keys_st = st.binary(min_size=16, max_size=16)


# ---- the key ----


def test_every_turn_of_a_conversation_has_the_first_turns_key() -> None:
    convo = turns("Tell me about tides.", 5)
    assert len({key(m) for m in convo}) == 1
    assert key(turns("Tell me about stars.", 1)[0]) != key(convo[0])
    # Per tenant: the same conversation of another tenant is another key.
    assert key(convo[0], tenant="other") != key(convo[0])


def test_the_stable_prefix_runs_through_the_first_user_message_or_the_first_n() -> None:
    convo = turns("q", 3)[-1]
    assert [m.role for m in stable_prefix(convo, None)] == ["system", "user"]
    assert [m.role for m in stable_prefix(convo, 1)] == ["system"]
    # A shared system prompt alone: conversations that share it share a key.
    shared = Affinity(prefix_messages=1)
    assert key(turns("a", 1)[0], aff=shared) == key(turns("b", 1)[0], aff=shared)


def test_a_header_key_is_the_header_hashed_and_bounded() -> None:
    k1 = conversation_key(SESSION, "t", (), {"x-session-id": "abc"})
    k2 = conversation_key(SESSION, "t", turns("other", 1)[0], {"x-session-id": "abc"})
    assert isinstance(k1, bytes) and k1 == k2 and b"abc" not in k1
    assert conversation_key(SESSION, "t", (), {}) == "the request has no x-session-id header"
    assert isinstance(conversation_key(SESSION, "t", (), {"x-session-id": "s" * AFFINITY_HEADER_MAX}), bytes)
    with pytest.raises(InvalidRequest) as err:
        conversation_key(SESSION, "t", (), {"x-session-id": "s" * (AFFINITY_HEADER_MAX + 1)})
    assert err.value.status == 400 and "x-session-id" in str(err.value)


def test_the_weights_are_the_same_in_every_process() -> None:
    # Not Python's hash(): every gateway replica (any PYTHONHASHSEED) computes these very numbers.
    k = bytes(range(16))
    assert replica_weight(k, "m@gpu0") == replica_weight(bytes(range(16)), "m@gpu0") == 0x0C2598429163512A


# ---- placement ----


@given(keys_st, st.permutations(REPLICAS))
def test_the_order_does_not_depend_on_how_replicas_are_listed(k: bytes, shuffled: list[Target]) -> None:
    assert rendezvous_order(k, shuffled) == rendezvous_order(k, REPLICAS)


@settings(max_examples=50)
@given(st.lists(keys_st, min_size=20, max_size=60, unique=True), st.integers(0, len(REPLICAS) - 1))
def test_a_leaving_replica_moves_only_its_own_conversations_and_they_come_back(keys: list[bytes], gone: int) -> None:
    before = {k: rendezvous_order(k, REPLICAS)[0] for k in keys}
    rest = [t for i, t in enumerate(REPLICAS) if i != gone]
    during = {k: rendezvous_order(k, rest)[0] for k in keys}
    for k in keys:
        if before[k] is not REPLICAS[gone]:
            assert during[k] is before[k]
        else:
            # Its next choice: the second in its own order over every replica.
            assert during[k] is rendezvous_order(k, REPLICAS)[1]
    assert {k: rendezvous_order(k, REPLICAS)[0] for k in keys} == before


def test_conversations_spread_evenly() -> None:
    counts: dict[str, int] = {}
    for i in range(3000):
        chosen = rendezvous_order(key(turns(f"conversation {i}", 1)[0]), REPLICAS)[0]
        counts[chosen.label] = counts.get(chosen.label, 0) + 1
    assert len(counts) == len(REPLICAS)
    assert all(400 <= n <= 600 for n in counts.values()), counts  # 500 each expected


@given(keys_st, st.sets(st.integers(0, len(REPLICAS) - 1), max_size=len(REPLICAS)))
def test_saturated_replicas_are_passed_over_in_the_keys_order(k: bytes, full: set[int]) -> None:
    busy = {REPLICAS[i].label for i in full}
    chosen, note = choose(k, REPLICAS, lambda t: "saturated (full)" if t.label in busy else None)
    order = rendezvous_order(k, REPLICAS)
    free = [t for t in order if t.label not in busy]
    if not free:
        assert chosen is None and note.startswith("not applied: no replica can take it (")
        return
    assert chosen is free[0]
    if order[0].label in busy:
        assert f"the conversation's replica {order[0].label} is saturated (full)" in note
    else:
        assert note == f"{chosen.label} is the conversation's replica"


# ---- the engine ----


def _pool(**affinity: Any) -> PolicyIndex:
    gpus = [backend(f"gpu{i}", tier="self-hosted", max_concurrency=10) for i in range(3)]
    return index(
        [*gpus, backend("api")],
        [model("m", *(dep(f"gpu{i}") for i in range(3))), model("big", dep("api"))],
        [
            route("r", "m", "big", affinity=affinity, max_attempts=4),
            route("plain", "m", "big"),
            route("hosted", "big", "m", affinity=affinity),
        ],
    )


def _first(idx: PolicyIndex, messages: tuple[Message, ...], live: LiveState | None = None, **kw: Any) -> str:
    return labels(run(idx, messages=messages, live=live or LiveState(), **kw))[0]


def test_every_turn_goes_to_the_conversations_replica_and_the_plan_keeps_the_rest() -> None:
    idx = _pool()
    convo = turns("What is a tide?", 4)
    firsts = {_first(idx, m) for m in convo}
    assert len(firsts) == 1
    plan = run(idx, messages=convo[2])
    chosen = firsts.pop()
    assert labels(plan)[0] == chosen and set(labels(plan)[:3]) == {"m@gpu0", "m@gpu1", "m@gpu2"}
    assert plan.decision.affinity == f"{chosen} is the conversation's replica"
    assert f'"affinity":"{chosen} is the conversation\'s replica"' in explain_header(plan.decision)
    # Different conversations land on different replicas (all three used by some).
    assert {_first(idx, turns(f"question {i}", 1)[0]) for i in range(30)} == {"m@gpu0", "m@gpu1", "m@gpu2"}
    # Without affinity, the objective's order alone; nothing said.
    plain = run(idx, "plain", messages=convo[2])
    assert labels(plain)[0] == "m@gpu0" and plain.decision.affinity is None


def _conversation_on(idx: PolicyIndex, label: str) -> tuple[Message, ...]:
    return next(m for i in range(100) if _first(idx, m := turns(f"q{i}", 2)[1]) == label)


def test_an_ejected_replica_loses_only_its_conversations_until_it_comes_back() -> None:
    idx = _pool()
    convos = [turns(f"conversation {i}", 2)[1] for i in range(40)]
    before = {c: _first(idx, c) for c in convos}
    ejected = LiveState(unhealthy=frozenset({"gpu1"}))
    during = {c: _first(idx, c, ejected) for c in convos}
    assert "m@gpu1" in before.values() and "m@gpu1" not in during.values()
    assert all(during[c] == before[c] for c in convos if before[c] != "m@gpu1")
    moved = next(c for c in convos if before[c] == "m@gpu1")
    note = run(idx, messages=moved, live=ejected).decision.affinity
    assert note == f"{during[moved]}: the conversation's replica m@gpu1 is ejected"
    # Back: every conversation returns to its replica.
    assert {c: _first(idx, c) for c in convos} == before


def test_a_saturated_replica_is_passed_over_and_taken_back_below_the_ceiling() -> None:
    idx = _pool(max_utilisation=0.8)
    convo = _conversation_on(idx, "m@gpu2")
    full = LiveState(utilisation={"gpu2": 0.85})
    plan = run(idx, messages=convo, live=full)
    moved = labels(plan)[0]
    assert moved != "m@gpu2"
    assert plan.decision.affinity == (
        f"{moved}: the conversation's replica m@gpu2 is saturated (utilisation 0.85 >= 0.80)"
    )
    # In-flight counting saturates too (no engine metrics): 8 of max_concurrency 10.
    assert _first(idx, convo, LiveState(in_flight={"gpu2": 8})) == moved
    assert _first(idx, convo, LiveState(utilisation={"gpu2": 0.79})) == "m@gpu2"
    every = LiveState(utilisation={"gpu0": 0.9, "gpu1": 0.9, "gpu2": 0.9})
    plan = run(idx, messages=convo, live=every)
    assert labels(plan)[0] == "m@gpu0"  # the objective's order
    assert (plan.decision.affinity or "").startswith("not applied: no replica can take it (")


def test_affinity_never_overrides_the_objective_across_models_or_tiers() -> None:
    idx = _pool()
    # Only the first-ranked model's replicas are a pool: the provider model stays last.
    assert labels(run(idx, messages=turns("x", 1)[0]))[-1] == "big@api"
    # A route whose first choice is a provider: affinity does not apply (tiers: edge, self-hosted).
    plan = run(idx, "hosted", messages=turns("x", 1)[0])
    assert labels(plan)[0] == "big@api"
    assert plan.decision.affinity == "not applied: the first-ranked big@api is in tier provider, not in affinity.tiers"


def test_a_header_key_without_the_header_ranks_normally_and_says_why() -> None:
    idx = _pool(key="header", header="x-session-id")
    plan = run(idx, messages=turns("x", 1)[0])
    assert labels(plan)[0] == "m@gpu0"
    assert plan.decision.affinity == "not applied: the request has no x-session-id header"
    chosen = {_first(idx, (), headers={"x-session-id": "s-42"}) for _ in range(3)}
    assert len(chosen) == 1
    decision = run(idx, headers={"x-session-id": "s-42"}).decision
    assert "s-42" not in explain_header(decision) and "s-42" not in str(decision)


def test_panic_ranks_without_affinity() -> None:
    idx = _pool()
    live = LiveState(unhealthy=frozenset({"gpu0", "gpu1", "gpu2", "api"}))
    plan = run(idx, messages=turns("x", 1)[0], live=live)
    assert plan.panic and plan.decision.affinity == "not applied: every candidate is ejected (panic)"


def test_offline_tools_key_a_conversation_as_the_gateway_does() -> None:
    payload = {
        "model": "r",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi."},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye."},
        ],
    }
    served = decode(json.dumps(payload).encode(), "chat").messages
    offline = extract(request_of(payload), {}, 0).messages
    assert [m.role for m in offline] == ["system", "user", "assistant", "user"]
    assert key(offline) == key(served) == key(served[:2])
