"""Strait in front of an upstream that speaks OpenAI's Responses API (`adapter: openai` with the backend
capability `responses`): a real gateway process and the fake OpenAI upstream's `/v1/responses`
(tests/harness/fake_responses.py), driven by httpx (bytes) and the official `openai` SDK.

- A Responses client's bytes go up to `{base_url}/responses` with only `model` replaced, and the
  upstream's answer, JSON or its stream of named events, comes back byte for byte.
- The encrypted reasoning the upstream issued survives a second turn, by `previous_response_id`
  (resolved by Strait: the upstream gets the whole input) and by the client sending the items back.
- A stream the upstream breaks or fails (`response.failed`) ends with Strait's own `response.failed` and
  `error` events after what was relayed, never the upstream's (its internals stay out); an upstream 400
  reaches the client in OpenAI's envelope.
- Usage (input, output, reasoning tokens) reaches the usage records; the same route on a backend
  without the capability still gets a translated chat request.
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from gateway.policy.index import key_digest
from tests.harness.gateway import gateway_process
from tests.harness.procs import ServerProcess, free_port

CLIENT_KEY = "sk-responses-client-canary-5c1e"
BACKEND_KEY = "responses-backend-secret-8d0a"
INPUT_PRICE, OUTPUT_PRICE = 100.0, 200.0


def policy(fake: str) -> str:
    price = f"{{input_per_mtok: {INPUT_PRICE}, output_per_mtok: {OUTPUT_PRICE}}}"
    return f"""
version: 1
backends:
  - {{name: speaks-responses, adapter: openai, base_url: "{fake}/v1", api_key: "env:BACKEND_KEY",
     capabilities: [responses]}}
  - {{name: chat-only, adapter: openai, base_url: "{fake}/v1", api_key: "env:BACKEND_KEY"}}
models:
  - name: gpt-up
    capabilities: [chat, tools]
    deployments: [{{backend: speaks-responses, upstream_model: gpt-up, price: {price}}}]
  - name: chat-model
    deployments: [{{backend: chat-only, upstream_model: chat-model}}]
  - {{name: cut, deployments: [{{backend: speaks-responses, upstream_model: "fault:cut-after-12"}}]}}
  - {{name: fails, deployments: [{{backend: speaks-responses, upstream_model: "fault:error-event-after-12"}}]}}
  - {{name: refuses, deployments: [{{backend: speaks-responses, upstream_model: "fault:400"}}]}}
routes:
  - {{name: reasoner, models: [gpt-up]}}
  - {{name: counted, models: [gpt-up]}}  # only the usage test's requests: no earlier record can still be in flight
  - {{name: chatty, models: [chat-model]}}
  - {{name: cut, models: [cut]}}
  - {{name: fails, models: [fails]}}
  - {{name: refuses, models: [refuses]}}
tenants:
  - name: acme
    keys: [{{id: acme-1, digest: "{key_digest(CLIENT_KEY)}"}}]
"""


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    port = free_port()
    log = tmp_path_factory.mktemp("fake-responses") / "fake.log"
    argv = [sys.executable, "-m", "tests.harness.fake_upstream", "--port", str(port)]
    with ServerProcess(argv, port, ready_path="/healthz", log_path=log) as proc:
        yield proc


@pytest.fixture(scope="module")
def gw(fake: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("gw-responses")
    (folder / "policy.yaml").write_text(policy(fake.base_url))
    proc = gateway_process(folder / "policy.yaml", log_path=folder / "gateway.log", env={"BACKEND_KEY": BACKEND_KEY})
    with proc:
        yield proc
    log = (folder / "gateway.log").read_text(errors="replace")
    assert CLIENT_KEY not in log and BACKEND_KEY not in log, "a secret reached the gateway log"


def ledger(fake: ServerProcess) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = httpx.get(fake.base_url + "/_ledger", timeout=5).json()
    return records


def last_answered(fake: ServerProcess) -> dict[str, Any]:
    """The fake's last record once its answer is written whole (the client may finish reading first)."""
    for _ in range(200):
        record = ledger(fake)[-1]
        if record.get("response_b64") is not None:
            return record
        httpx.get(fake.base_url + "/healthz", timeout=5)  # a round trip: the fake's handler runs meanwhile
    raise AssertionError("the fake never finished its answer")


def client(gw: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=30)


def test_the_request_goes_up_as_its_bytes_and_the_answer_comes_back_as_the_upstreams(
    gw: ServerProcess, fake: ServerProcess
) -> None:
    body = (
        b'{"model": "reasoner",  "input": "Hi \\u00e9", "include": ["reasoning.encrypted_content"],'
        b' "reasoning": {"effort": "low", "summary": "auto"}, "temperature": 1.0e0, "x_future": [1, {}]}'
    )
    headers = {"authorization": f"Bearer {CLIENT_KEY}", "content-type": "application/json"}
    for stream in (False, True):
        sent_body = body if not stream else body.replace(b'"input"', b'"stream": true, "input"')
        r = httpx.post(gw.base_url + "/v1/responses", content=sent_body, headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        record = last_answered(fake)
        assert record["path"] == "/v1/responses"
        assert base64.b64decode(record["body_b64"]) == sent_body.replace(b'"reasoner"', b'"gpt-up"', 1)
        assert record["headers"]["authorization"] == f"Bearer {BACKEND_KEY}"
        # Everything as the upstream sent it: its id, its model name, its event order and sequence numbers.
        assert r.content == base64.b64decode(record["response_b64"])
        assert r.headers["content-type"].startswith("text/event-stream" if stream else "application/json")
        assert r.headers["x-strait-deployment"] == "gpt-up@speaks-responses"


def test_sdk_second_turn_by_previous_response_id_carries_the_encrypted_reasoning(
    gw: ServerProcess, fake: ServerProcess
) -> None:
    sdk = client(gw)
    first = sdk.responses.create(model="reasoner", input="Paris?", include=["reasoning.encrypted_content"])
    assert first.output_text == "Echo: Paris?"
    reasoning = first.output[0]
    assert reasoning.type == "reasoning" and reasoning.encrypted_content
    issued = json.loads(base64.b64decode(last_answered(fake)["response_b64"]))
    assert first.id == issued["id"]  # the client's id is the upstream's: Strait stored it under that id
    assert sdk.responses.retrieve(first.id).output[0].encrypted_content == reasoning.encrypted_content  # type: ignore[union-attr]

    second = sdk.responses.create(model="reasoner", input="And Rome?", previous_response_id=first.id)
    assert second.output_text == "Echo: And Rome?"  # the fake verified the reasoning blob it had minted
    sent = json.loads(base64.b64decode(ledger(fake)[-1]["body_b64"]))
    assert "previous_response_id" not in sent  # resolved by Strait: the upstream got the whole input
    assert [i.get("type") for i in sent["input"]] == ["message", "reasoning", "message", "message"]
    assert sent["input"][1]["encrypted_content"] == reasoning.encrypted_content


def test_sdk_stream_then_items_sent_back_and_a_function_call(gw: ServerProcess, fake: ServerProcess) -> None:
    sdk = client(gw)
    with sdk.responses.stream(model="reasoner", input="Stream me", store=False) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.reasoning_summary_text.delta" in kinds and "response.output_text.delta" in kinds
    assert final.output_text == "Echo: Stream me"
    blob = final.output[0].encrypted_content  # type: ignore[union-attr]
    items: list[Any] = [
        {"role": "user", "content": "Stream me"},
        *[i.model_dump(exclude_none=True) for i in final.output],
    ]
    items.append({"role": "user", "content": "Once more"})
    again = sdk.responses.create(model="reasoner", input=items, store=False)
    assert again.output_text == "Echo: Once more"
    assert json.loads(base64.b64decode(ledger(fake)[-1]["body_b64"]))["input"][1]["encrypted_content"] == blob

    tool = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}
    with sdk.responses.stream(model="reasoner", input="Weather?", tools=[tool]) as stream:  # type: ignore[list-item]
        called = stream.get_final_response()
    call = called.output[1]
    assert call.type == "function_call" and call.name == "get_weather" and call.arguments == '{"city":"Paris"}'
    answered = sdk.responses.create(
        model="reasoner",
        previous_response_id=called.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny"}],
        tools=[tool],  # type: ignore[list-item]
    )
    assert answered.output[-1].type == "message"


def test_usage_is_recorded_and_a_chat_only_backend_still_gets_a_translation(
    gw: ServerProcess, fake: ServerProcess
) -> None:
    sdk = client(gw)
    # A route no other test uses: the usage writer may still hold earlier tests' records of other routes.
    before = _usage_row(gw, "counted")
    assert before == {"requests": 0}
    reply = sdk.responses.create(model="counted", input="Count me")
    assert reply.usage is not None and reply.usage.output_tokens_details.reasoning_tokens == 3
    row = before
    for _ in range(100):
        row = _usage_row(gw, "counted")
        if row["requests"] > before["requests"]:
            break
        httpx.get(gw.base_url + "/healthz", timeout=5)
    assert row["requests"] == before["requests"] + 1
    assert row["prompt_tokens"] - before.get("prompt_tokens", 0) == reply.usage.input_tokens
    assert row["completion_tokens"] - before.get("completion_tokens", 0) == reply.usage.output_tokens
    cost = (reply.usage.input_tokens * INPUT_PRICE + reply.usage.output_tokens * OUTPUT_PRICE) / 1e6
    assert row["cost_usd"] - before.get("cost_usd", 0) == pytest.approx(cost, abs=1e-5)

    chat = sdk.responses.create(model="chatty", input="Translated?")
    assert chat.id.startswith("resp_") and chat.output_text
    assert ledger(fake)[-1]["path"] == "/v1/chat/completions"


def test_a_broken_or_failed_stream_ends_with_the_gateways_own_failure(gw: ServerProcess, fake: ServerProcess) -> None:
    headers = {"authorization": f"Bearer {CLIENT_KEY}"}
    for route in ("cut", "fails"):
        body = {"model": route, "input": "Break me please now", "stream": True}
        r = httpx.post(gw.base_url + "/v1/responses", json=body, headers=headers, timeout=30)
        assert r.status_code == 200
        upstream = base64.b64decode(last_answered(fake)["response_b64"])
        relayed = upstream.split(b"event: response.failed")[0]  # the upstream's own failure is never relayed
        assert r.content.startswith(relayed) and len(relayed) > 0
        tail = [
            json.loads(line[6:]) for line in r.content[len(relayed) :].decode().split("\n") if line.startswith("data: ")
        ]
        assert [e["type"] for e in tail] == ["response.failed", "error"], route
        last = json.loads(relayed.decode().strip().split("\n")[-1][6:])["sequence_number"]
        assert [e["sequence_number"] for e in tail] == [last + 1, last + 2]
        assert b"internal-host-7" not in r.content
    with pytest.raises(openai.BadRequestError) as refused:
        client(gw).responses.create(model="refuses", input="No")
    assert refused.value.status_code == 400 and refused.value.body is not None


def _usage_row(gw: ServerProcess, route: str) -> dict[str, Any]:
    rows = httpx.get(gw.base_url + "/v1/usage?by=route", headers={"authorization": f"Bearer {CLIENT_KEY}"}, timeout=10)
    return next((r for r in rows.json()["data"] if r["value"] == route), {"requests": 0})
