"""The native `anthropic` adapter against a real Messages server: llama.cpp's own `/v1/messages` (xllamacpp
serves it; nobody here wrote it), the recorded shape beside the documented one the fake speaks.

- A Messages client's request goes up as its bytes (model replaced) and llama.cpp's answer comes back as
  llama.cpp sent it: the same content, stop reason and usage as asking llama.cpp directly, at temperature 0.
- An OpenAI client's request is translated to Messages and the answer back to a chat completion: the same
  text llama.cpp gives that Messages request directly, whole and streamed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.harness.gateway import gateway_process
from tests.harness.procs import ServerProcess
from tests.harness.sse import parse_events

pytestmark = pytest.mark.llamacpp

POLICY = """
version: 1
backends:
  - {{name: llama, adapter: anthropic, base_url: "{url}/v1", tier: self-hosted, timeouts: {{read_s: 60}}}}
models:
  - {{name: smollm2, deployments: [{{backend: llama, upstream_model: smollm2}}]}}
routes:
  - {{name: native-chat, models: [smollm2]}}
"""
HEADERS = {"anthropic-version": "2023-06-01", "authorization": "Bearer unused"}
ASK = {"max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": "Name a colour."}]}


@pytest.fixture(scope="module")
def servers(
    llama_chat: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    folder = tmp_path_factory.mktemp("llama-native")
    policy = folder / "policy.yaml"
    policy.write_text(POLICY.format(url=llama_chat.base_url))
    with gateway_process(policy, log_path=folder / "gateway.log") as gw:
        yield llama_chat, gw


def _ask(server: ServerProcess, model: str, **extra: Any) -> httpx.Response:
    response = httpx.post(
        server.base_url + "/v1/messages", json={"model": model, **ASK, **extra}, headers=HEADERS, timeout=120
    )
    assert response.status_code == 200, response.text
    return response


def _prompt(usage: dict[str, int]) -> int:
    return usage["input_tokens"] + usage.get("cache_read_input_tokens", 0)


def test_a_messages_client_gets_llamacpps_own_answer(servers: tuple[ServerProcess, ServerProcess]) -> None:
    llama, gw = servers
    own = _ask(llama, "smollm2").json()
    ours = _ask(gw, "native-chat").json()
    assert ours["content"] == own["content"] and ours["content"][0]["text"]
    assert ours["stop_reason"] == own["stop_reason"] == "max_tokens"
    assert ours["usage"]["output_tokens"] == own["usage"]["output_tokens"] == 8
    assert _prompt(ours["usage"]) == _prompt(own["usage"])
    assert set(ours) == set(own)  # llama.cpp's own keys: nothing added, nothing lost
    assert ours["model"] == own["model"]  # the upstream's answer as it sent it (not re-encoded for the route)


def test_a_messages_stream_is_llamacpps_own_events(servers: tuple[ServerProcess, ServerProcess]) -> None:
    llama, gw = servers
    own = [(e.event, json.loads(e.data)) for e in parse_events(_ask(llama, "smollm2", stream=True).content)]
    ours = [(e.event, json.loads(e.data)) for e in parse_events(_ask(gw, "native-chat", stream=True).content)]
    assert [name for name, _ in ours] == [name for name, _ in own] and ours[-1][0] == "message_stop"
    text = "".join(d["delta"].get("text", "") for name, d in ours if name == "content_block_delta")
    assert text == "".join(d["delta"].get("text", "") for name, d in own if name == "content_block_delta") and text


def test_an_openai_client_is_translated_to_messages_and_back(servers: tuple[ServerProcess, ServerProcess]) -> None:
    llama, gw = servers
    own = _ask(llama, "smollm2").json()
    client = openai.OpenAI(base_url=gw.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model="native-chat", messages=ASK["messages"], max_tokens=8, temperature=0)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == own["content"][0]["text"]
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 8
    stream = client.chat.completions.create(
        model="native-chat",
        messages=ASK["messages"],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},  # type: ignore[arg-type]
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == own["content"][0]["text"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
