"""Session affinity proven on real engines: two llama.cpp servers (one slot each, so a server's prompt cache
holds the conversation it served last) behind two Strait processes that share nothing. With affinity, turn 2
of a conversation goes to the replica that served turn 1, even through the other gateway, and llama.cpp
evaluates only the new tokens (`timings.prompt_n`, which Strait passes through); sent to the other replica
instead (affinity off, the other deployment forced), it evaluates nearly the whole prompt again."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.api.openai.decode import decode
from gateway.policy.affinity import conversation_key, replica_weight
from gateway.policy.index import ANONYMOUS
from gateway.policy.model import Affinity
from tests.harness.gateway import gateway_process
from tests.harness.llamacpp import llamacpp_server
from tests.harness.procs import ServerProcess

pytestmark = pytest.mark.llamacpp

POLICY = """
version: 1
backends:
  - {{name: llama-a, adapter: openai, base_url: "{a}/v1", tier: self-hosted, timeouts: {{read_s: 60}}}}
  - {{name: llama-b, adapter: openai, base_url: "{b}/v1", tier: self-hosted, timeouts: {{read_s: 60}}}}
models:
  - name: small
    deployments: [{{backend: llama-a, upstream_model: smollm2}}, {{backend: llama-b, upstream_model: smollm2}}]
  - {{name: small-a, deployments: [{{backend: llama-a, upstream_model: smollm2}}]}}
  - {{name: small-b, deployments: [{{backend: llama-b, upstream_model: smollm2}}]}}
routes:
  - {{name: sticky, models: [small], affinity: {{key: prefix}}}}
  # No affinity: the client's `strait.order` picks the replica of each turn.
  - {{name: pinned, models: [small-a, small-b]}}
"""
REPLICAS = ("small@llama-a", "small@llama-b")
SYSTEM = "You are a librarian. Answer in one short sentence."


def opening(topic: str) -> list[dict[str, str]]:
    """Turn 1: a system prompt and a long first question (a few hundred tokens), unique to `topic`."""
    notes = " ".join(f"Note {i}: the {topic} box {i} sits on shelf {i * 7 % 13}." for i in range(24))
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"My notes on {topic}. {notes} Which shelf holds box 3?"},
    ]


def body(route: str, messages: list[dict[str, str]], **extra: Any) -> dict[str, Any]:
    # cache_prompt: llama.cpp's own switch (on by default in recent servers), passed through by Strait.
    return {"model": route, "messages": messages, "max_tokens": 12, "temperature": 0, "cache_prompt": True, **extra}


def preferred(topic: str) -> str:
    """The replica affinity keeps `topic`'s conversation on, computed as the gateway does (no state)."""
    request = decode(json.dumps(body("sticky", opening(topic))).encode(), "chat")
    key = conversation_key(Affinity(), ANONYMOUS.tenant, request.messages, {})
    assert isinstance(key, bytes)
    return max(REPLICAS, key=lambda label: replica_weight(key, label))


def topics_on_each_replica() -> tuple[str, str]:
    """Two conversations whose replicas differ: affinity is not everything on one server."""
    found: dict[str, str] = {}
    for i in range(64):
        found.setdefault(preferred(f"topic-{i}"), f"topic-{i}")
        if len(found) == 2:
            return found[REPLICAS[0]], found[REPLICAS[1]]
    raise AssertionError("64 topics all prefer one replica")


@pytest.fixture(scope="module")
def gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    folder = tmp_path_factory.mktemp("llama-affinity")
    # One slot each: the slot's cache is the conversation the server served last.
    a = llamacpp_server("smollm2", n_parallel=1, log_path=folder / "a.log")
    b = llamacpp_server("smollm2", n_parallel=1, log_path=folder / "b.log")
    with a, b:
        policy = folder / "policy.yaml"
        policy.write_text(POLICY.format(a=a.base_url, b=b.base_url))
        with (
            gateway_process(policy, log_path=folder / "gw1.log") as gw1,
            gateway_process(policy, log_path=folder / "gw2.log") as gw2,
        ):
            yield gw1, gw2


class Turn:
    def __init__(self, response: httpx.Response) -> None:
        assert response.status_code == 200, response.text
        doc = response.json()
        self.deployment = response.headers["x-strait-deployment"]
        self.reply = doc["choices"][0]["message"]["content"]
        # llama.cpp's own count of prompt tokens it evaluated (the rest came from its cache), and the
        # prompt's size in tokens.
        self.evaluated = int(doc["timings"]["prompt_n"])
        self.prompt = int(doc["usage"]["prompt_tokens"])


def chat(gw: ServerProcess, payload: dict[str, Any]) -> Turn:
    return Turn(httpx.post(gw.base_url + "/v1/chat/completions", json=payload, timeout=120))


def follow_up(messages: list[dict[str, str]], first: Turn) -> list[dict[str, str]]:
    return [*messages, {"role": "assistant", "content": first.reply}, {"role": "user", "content": "And box 5?"}]


def test_turn_two_reuses_the_replicas_prompt_cache_with_affinity_and_not_without(
    gateways: tuple[ServerProcess, ServerProcess],
) -> None:
    gw1, gw2 = gateways
    on_a, on_b = topics_on_each_replica()
    convo_a, convo_b = opening(on_a), opening(on_b)
    # Affinity: interleaved conversations, turn 1 through one gateway and turn 2 through the other.
    a1 = chat(gw1, body("sticky", convo_a))
    b1 = chat(gw2, body("sticky", convo_b))
    a2 = chat(gw2, body("sticky", follow_up(convo_a, a1)))
    b2 = chat(gw1, body("sticky", follow_up(convo_b, b1)))
    assert (a1.deployment, a2.deployment) == (REPLICAS[0], REPLICAS[0])
    assert (b1.deployment, b2.deployment) == (REPLICAS[1], REPLICAS[1])
    for first, second in ((a1, a2), (b1, b2)):
        assert first.evaluated > 0.9 * first.prompt  # a fresh conversation: evaluated whole
        assert second.prompt > first.prompt > 200
        # Only the new turn (the reply, the follow-up and the chat template around them) is evaluated.
        assert second.evaluated < 0.25 * second.prompt, (second.evaluated, second.prompt)

    # Without affinity: turn 2 forced onto the other replica evaluates the whole conversation again.
    convo = opening("topic-without-affinity")
    first = chat(gw1, body("pinned", convo, strait={"order": ["small-a"]}))
    second = chat(gw1, body("pinned", follow_up(convo, first), strait={"order": ["small-b"]}))
    assert (first.deployment, second.deployment) == ("small-a@llama-a", "small-b@llama-b")
    assert second.prompt > 200
    assert second.evaluated > 0.75 * second.prompt, (second.evaluated, second.prompt)
