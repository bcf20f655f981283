"""`POST /v1/messages` through Strait to a real llama.cpp server, translated to its chat endpoint, compared
with llama.cpp's own `/v1/messages` (xllamacpp serves it; nobody here wrote it) for the same request at
temperature 0: the same text, the same stop reason, the same tokens, the same keys and event sequence.

Raw HTTP, to compare keys and events; the official SDK on the same servers: test_llamacpp_messages_sdk.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.tokens import count_chat
from tests.harness.gateway import gateway_process
from tests.harness.procs import ServerProcess
from tests.harness.sse import parse_events

pytestmark = pytest.mark.llamacpp

POLICY = """
version: 1
backends:
  - {{name: llama, adapter: openai, base_url: "{url}/v1", tier: self-hosted, timeouts: {{read_s: 60}}}}
models:
  - {{name: smollm2, deployments: [{{backend: llama, upstream_model: smollm2}}]}}
routes:
  - {{name: small-chat, models: [smollm2]}}
"""
HEADERS = {"anthropic-version": "2026-10-21", "authorization": "Bearer unused"}
ASK = {"max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": "Name a colour."}]}


@pytest.fixture(scope="module")
def servers(
    llama_chat: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    folder = tmp_path_factory.mktemp("llama-messages")
    policy = folder / "policy.yaml"
    policy.write_text(POLICY.format(url=llama_chat.base_url))
    with gateway_process(policy, log_path=folder / "gateway.log") as gw:
        yield llama_chat, gw


def _ask(server: ServerProcess, model: str, **extra: Any) -> httpx.Response:
    body = {"model": model, **ASK, **extra}
    response = httpx.post(server.base_url + "/v1/messages", json=body, headers=HEADERS, timeout=120)
    assert response.status_code == 200, response.text
    return response


def _prompt(usage: dict[str, int]) -> int:
    """The prompt's tokens, however many of them the server's prompt cache served."""
    return usage["input_tokens"] + usage.get("cache_read_input_tokens", 0)


def test_a_message_through_strait_matches_llamacpps_own(servers: tuple[ServerProcess, ServerProcess]) -> None:
    llama, gw = servers
    own = _ask(llama, "smollm2").json()
    ours = _ask(gw, "small-chat").json()
    assert ours["content"] == own["content"] and ours["content"][0]["text"]
    assert ours["stop_reason"] == own["stop_reason"] == "max_tokens"
    assert ours["usage"]["output_tokens"] == own["usage"]["output_tokens"] == 8
    assert _prompt(ours["usage"]) == _prompt(own["usage"])
    assert set(own) <= set(ours)
    assert ours["model"] == "small-chat" and ours["id"].startswith("msg_")


def _events(response: httpx.Response) -> tuple[list[str], str, dict[str, Any]]:
    """The event names (consecutive deltas as one), the streamed text and the final delta's stop reason."""
    names: list[str] = []
    text = ""
    stop: dict[str, Any] = {}
    for ev in parse_events(response.content):
        data = json.loads(ev.data)
        if ev.event == "ping":
            continue
        if not names or names[-1] != ev.event or ev.event != "content_block_delta":
            names.append(ev.event)
        if ev.event == "content_block_delta":
            text += data["delta"]["text"]
        if ev.event == "message_delta":
            stop = data
    return names, text, stop


def test_a_stream_through_strait_matches_llamacpps_own(servers: tuple[ServerProcess, ServerProcess]) -> None:
    llama, gw = servers
    own_names, own_text, own_stop = _events(_ask(llama, "smollm2", stream=True))
    names, text, stop = _events(_ask(gw, "small-chat", stream=True))
    assert names == own_names
    assert text == own_text and text
    assert stop["delta"] == own_stop["delta"]
    assert stop["usage"]["output_tokens"] == own_stop["usage"]["output_tokens"]


def test_count_tokens_grows_with_the_prompt_as_llamacpps_does(servers: tuple[ServerProcess, ServerProcess]) -> None:
    """Strait counts with cl100k_base plus chat framing (gateway.tokens), llama.cpp with the model's own
    vocabulary and chat template (its default system prompt included): different numbers, the same
    direction; Strait's is the count its limits and accounting use."""
    llama, gw = servers

    def counts(text: str) -> tuple[int, int]:
        body = {"messages": [{"role": "user", "content": text}]}
        own = httpx.post(
            llama.base_url + "/v1/messages/count_tokens", json={**body, "model": "smollm2"}, headers=HEADERS, timeout=60
        )
        ours = httpx.post(
            gw.base_url + "/v1/messages/count_tokens", json={**body, "model": "small-chat"}, headers=HEADERS, timeout=60
        )
        assert own.status_code == ours.status_code == 200
        return own.json()["input_tokens"], ours.json()["input_tokens"]

    short_own, short_ours = counts("Name a colour.")
    long_own, long_ours = counts("Name a colour. " * 20)
    assert short_ours == count_chat(["Name a colour."])
    assert long_own > short_own and long_ours > short_ours
