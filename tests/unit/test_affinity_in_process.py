"""Session affinity through the real runtime in process (create_app, simulated replicas, memory state): every
turn of a conversation lands on one replica and different conversations spread; a session header keys it
when the route says so (bounded: an overlong one is a 400 envelope that does not echo it); a replica that
fails is ejected and only its conversations move, each to its next replica in hashing order, as explain says."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from gateway.api.openai.decode import decode
from gateway.app import create_app
from gateway.policy.affinity import conversation_key, replica_weight
from gateway.policy.index import key_digest
from gateway.policy.model import Affinity
from gateway.settings import Settings

KEY = "sk-affinity-test"
FAST = "simulated: {ttft_ms: 0, tokens_per_second: 100000, output_tokens: 4}"
POLICY = f"""
version: 1
backends:
  - {{name: gpu0, adapter: simulated, tier: self-hosted, {FAST}}}
  - {{name: gpu1, adapter: simulated, tier: self-hosted, {FAST}}}
  # Always fails: ejected at its first failure, for longer than the test, and never probed back.
  - name: gpu2
    adapter: simulated
    tier: self-hosted
    simulated: {{ttft_ms: 0, failure_rate: 1.0, failure_status: 503}}
    outlier: {{consecutive_failures: 1, base_ejection_s: 600, max_ejection_s: 600, max_ejected_share: 1.0, probe: none}}
models:
  - name: m
    deployments: [{{backend: gpu0, upstream_model: m}}, {{backend: gpu1, upstream_model: m}}, {{backend: gpu2, upstream_model: m}}]
  - name: m2
    deployments: [{{backend: gpu0, upstream_model: m}}, {{backend: gpu1, upstream_model: m}}]
routes:
  - {{name: chat, models: [m], affinity: {{}}, retry: {{same_deployment: 0}}}}
  - {{name: session, models: [m2], affinity: {{key: header, header: X-Session-Id}}, retry: {{same_deployment: 0}}}}
tenants:
  - name: t
    explain: true
    keys: [{{id: k, digest: "{key_digest(KEY)}"}}]
"""
REPLICAS = ("m@gpu0", "m@gpu1", "m@gpu2")


@pytest.fixture()
def client(tmp_path: Path) -> Iterator[TestClient[Any]]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    app = create_app(Settings(policy_path=str(policy), spool_dir=str(tmp_path / "spool")))
    with TestClient(app) as c:
        c.headers["authorization"] = f"Bearer {KEY}"
        c.headers["x-strait-explain"] = "1"
        yield c


def turns(topic: str, n: int) -> list[list[dict[str, str]]]:
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Tell me about {topic}."}]
    out = [list(convo)]
    for i in range(1, n):
        convo += [{"role": "assistant", "content": f"Answer {i}."}, {"role": "user", "content": f"More, {i}."}]
        out.append(list(convo))
    return out


def order(topic: str) -> list[str]:
    """The replicas in `topic`'s conversation's hashing order, computed as the gateway does."""
    body = json.dumps({"model": "chat", "messages": turns(topic, 1)[0]}).encode()
    key = conversation_key(Affinity(), "t", decode(body, "chat").messages, {})
    assert isinstance(key, bytes)
    return sorted(REPLICAS, key=lambda label: replica_weight(key, label), reverse=True)


def ask(client: TestClient[Any], messages: list[dict[str, str]], route: str = "chat", **headers: str) -> Any:
    return client.post("/v1/chat/completions", json={"model": route, "messages": messages}, headers=headers)


def explained(response: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(response.headers["x-strait-explain"])
    return doc


def test_a_conversation_stays_on_its_replica_and_only_an_ejected_ones_conversations_move(
    client: TestClient[Any],
) -> None:
    topics = [f"topic {i}" for i in range(40)]
    healthy = [t for t in topics if order(t)[0] != "m@gpu2"][:8]
    doomed = next(t for t in topics if order(t)[0] == "m@gpu2")
    # Healthy conversations: three turns each, every one on the conversation's replica.
    for topic in healthy:
        for messages in turns(topic, 3):
            r = ask(client, messages)
            assert r.status_code == 200, r.text
            assert r.headers["x-strait-deployment"] == order(topic)[0]
            assert explained(r)["affinity"] == f"{order(topic)[0]} is the conversation's replica"
    assert {order(t)[0] for t in healthy} == {"m@gpu0", "m@gpu1"}
    # The doomed conversation's replica fails: the request fails over (the client gets an answer) and gpu2
    # is ejected. Its next turns go to its second replica, and explain says why.
    first, second, third = turns(doomed, 3)
    assert ask(client, first).status_code == 200
    for messages in (second, third):
        r = ask(client, messages)
        assert r.status_code == 200, r.text
        assert r.headers["x-strait-deployment"] == order(doomed)[1]
        doc = explained(r)
        assert doc["affinity"] == f"{order(doomed)[1]}: the conversation's replica m@gpu2 is ejected"
        assert doc["excluded"] == {"m@gpu2": "backend is ejected (unhealthy)"}
    # Nobody else moved.
    for topic in healthy:
        assert ask(client, turns(topic, 3)[2]).headers["x-strait-deployment"] == order(topic)[0]


def test_a_session_header_keys_the_route_that_names_it(client: TestClient[Any]) -> None:
    def served(messages: list[dict[str, str]], session: str) -> str:
        r = ask(client, messages, "session", **{"x-session-id": session})
        assert r.status_code == 200, r.text
        return str(r.headers["x-strait-deployment"])

    # One session, whatever its messages: one replica.
    assert len({served(turns(f"topic {i}", 1 + i % 3)[-1], "s-7") for i in range(6)}) == 1
    assert {served(turns("x", 1)[0], f"s-{i}") for i in range(20)} == {"m2@gpu0", "m2@gpu1"}
    # No header: the objective's order, and explain says why.
    r = ask(client, turns("x", 1)[0], "session")
    assert r.status_code == 200
    assert explained(r)["affinity"] == "not applied: the request has no x-session-id header"
    # Overlong: a client mistake, answered as one; the value is not echoed back.
    long = "v" * 300
    r = ask(client, turns("x", 1)[0], "session", **{"x-session-id": long})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "x-session-id"
    assert long not in r.text
