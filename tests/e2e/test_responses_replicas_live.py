"""Stored responses across pooled gateways: two `strait serve` replicas sharing one Redis (the state URL).
A response stored through one is continued (`previous_response_id`), read and deleted through the other,
and stays the tenant's own, the bug users most often report against other gateways ("previous_response_id
not found" behind a load balancer)."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import redis

from gateway.policy.index import key_digest
from tests.harness.gateway import replica_processes
from tests.harness.redis_proc import RedisProc

KEY = "sk-replicas-alpha-0001"
OTHER_KEY = "sk-replicas-beta-0002"
POLICY = f"""
version: 1
backends:
  - {{name: sim, adapter: simulated, simulated: {{ttft_ms: 1, tokens_per_second: 5000, output_tokens: 8}}}}
models:
  - {{name: sim-m, capabilities: [chat, tools], deployments: [{{backend: sim, upstream_model: sim-1}}]}}
routes:
  - {{name: sim-chat, models: [sim-m]}}
tenants:
  - name: alpha
    keys: [{{id: a-1, digest: "{key_digest(KEY)}"}}]
  - name: beta
    keys: [{{id: b-1, digest: "{key_digest(OTHER_KEY)}"}}]
"""


def _client(base_url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, timeout=30)


def test_a_conversation_moves_between_replicas(fresh_redis: RedisProc, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    with replica_processes(policy, fresh_redis.url, 2, tmp_path) as (one, two):
        first_replica, second_replica = _client(one.base_url), _client(two.base_url)
        first = first_replica.responses.create(model="sim-chat", input="My name is Ada.")
        second = second_replica.responses.create(model="sim-chat", input="Who am I?", previous_response_id=first.id)
        assert second.previous_response_id == first.id and second.status == "completed"
        items = first_replica.responses.input_items.list(second.id, order="asc")
        assert [item.type for item in items.data] == ["message", "message", "message"]
        assert second_replica.responses.retrieve(first.id).model_dump() == first.model_dump()
        with pytest.raises(openai.NotFoundError):
            _client(two.base_url, OTHER_KEY).responses.retrieve(first.id)
        second_replica.responses.delete(first.id)
        with pytest.raises(openai.NotFoundError):
            first_replica.responses.retrieve(first.id)
        # Its own key space in the state's Redis, one hash tag per tenant.
        with redis.Redis.from_url(fresh_redis.url) as direct:
            keys = b" ".join(direct.keys("strait:resp:*")).decode()
        assert second.id in keys and first.id not in keys
