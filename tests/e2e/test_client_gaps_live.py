"""The client gaps of issue 11 through `strait serve` in front of the fake OpenAI upstream: requests that
other upstreams accept but OpenAI's product limits would refuse reach the upstream as the client wrote them."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import ALPHA_KEY, Ledger
from tests.harness.procs import ServerProcess

USER = [{"role": "user", "content": "Say hello"}]


def _sent(ledger: Ledger) -> dict[str, Any]:
    body: dict[str, Any] = ledger.records()[-1]["body"]
    return body


def test_more_than_four_stop_sequences_reach_the_upstream(client: openai.OpenAI, ledger: Ledger) -> None:
    stops = ["zulu", "yankee", "xray", "whiskey", "victor", "uniform"]
    reply = client.chat.completions.create(model="gpt-fake", messages=USER, stop=stops, max_tokens=5)
    assert reply.choices[0].message.content
    sent = _sent(ledger)
    assert sent["stop"] == stops and sent["model"] == "fake-model"


def test_engine_ranges_reach_the_upstream(client: openai.OpenAI, ledger: Ledger) -> None:
    client.chat.completions.create(
        model="gpt-fake",
        messages=USER,
        max_tokens=5,
        temperature=2.5,
        presence_penalty=3,
        logprobs=True,
        top_logprobs=40,
        logit_bias={"15043": 150},
    )
    sent = _sent(ledger)
    assert (sent["temperature"], sent["presence_penalty"], sent["top_logprobs"]) == (2.5, 3, 40)
    assert sent["logit_bias"] == {"15043": 150}


def test_the_upstreams_own_400_for_a_limit_is_passed_on(client: openai.OpenAI, ledger: Ledger) -> None:
    """OpenAI answers its own 400 for five stop sequences; Strait passes it on (here the fake plays OpenAI)."""
    before = ledger.count()
    refusal = {"status": 400, "error_message": "The engine limits 'stop' to 4 sequences."}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="gpt-fake", messages=USER, stop=["a", "b", "c", "d", "e"], extra_body={"fake": refusal}
        )
    assert info.value.status_code == 400
    assert "The engine limits 'stop' to 4 sequences" in info.value.message
    assert ledger.count() == before + 1  # the upstream decided, not Strait


# ---- custom (freeform) tools and tool types Strait does not know ----

CUSTOM_TOOL = {
    "type": "custom",
    "custom": {
        "name": "run_sql",
        "description": "Runs one SQL query",
        "format": {"type": "grammar", "grammar": {"syntax": "regex", "definition": "SELECT .+;"}},
    },
}
BUILT_IN_TOOL = {"type": "web_search_preview", "search_context_size": "low"}


def test_custom_and_unknown_tool_types_pass_through_byte_for_byte(gateway: ServerProcess, ledger: Ledger) -> None:
    body = json.dumps(
        {
            "model": "gpt-fake",
            "messages": USER,
            "tools": [CUSTOM_TOOL, BUILT_IN_TOOL],
            "tool_choice": {"type": "custom", "custom": {"name": "run_sql"}},
            "max_tokens": 5,
        }
    ).encode()
    r = httpx.post(
        gateway.base_url + "/v1/chat/completions",
        content=body,
        headers={"authorization": f"Bearer {ALPHA_KEY}", "content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    sent = base64.b64decode(ledger.records()[-1]["body_b64"])
    assert sent == body.replace(b'"gpt-fake"', b'"fake-model"')


def test_the_openai_sdk_sends_custom_tools_and_their_calls_back(client: openai.OpenAI, ledger: Ledger) -> None:
    history: list[Any] = [
        *USER,
        {
            "role": "assistant",
            "tool_calls": [{"id": "call_1", "type": "custom", "custom": {"name": "run_sql", "input": "SELECT 1;"}}],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "1"},
    ]
    client.chat.completions.create(model="gpt-fake", messages=history, tools=[CUSTOM_TOOL], max_tokens=5)
    sent = _sent(ledger)
    assert sent["tools"] == [CUSTOM_TOOL]
    assert sent["messages"][1]["tool_calls"][0]["custom"] == {"name": "run_sql", "input": "SELECT 1;"}


def test_the_simulated_backend_calls_a_custom_tool(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="sim-chat", messages=USER, tools=[CUSTOM_TOOL])
    call = (reply.choices[0].message.tool_calls or [])[0]
    assert call.type == "custom" and call.custom.name == "run_sql" and call.custom.input
    streamed = list(client.chat.completions.create(model="sim-chat", messages=USER, tools=[CUSTOM_TOOL], stream=True))
    deltas = [d for c in streamed for d in (c.choices[0].delta.tool_calls or []) if c.choices]
    assert deltas and deltas[0].model_dump()["custom"]["name"] == "run_sql"


def test_a_backend_that_cannot_carry_a_tool_type_refuses_it_clearly(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="sim-chat", messages=USER, tools=[BUILT_IN_TOOL])  # type: ignore[list-item]
    assert "cannot run tools of type 'web_search_preview'" in info.value.message
    assert isinstance(info.value.body, dict) and info.value.body.get("code") == "unsupported_tool_type"
