"""`POST /v1/messages` (Anthropic Messages) through `strait serve`, in front of the simulated backend and the
fake OpenAI upstream: create, stream, a tool loop, count_tokens, errors in Anthropic's envelope, limits and
usage records as on the OpenAI route.

These tests speak raw HTTP, to check the bytes: the shapes the SDK was verified to send and require
(../shared/real-backends.md §2.2): `Authorization: Bearer` (and `x-api-key`), any `anthropic-version`,
named SSE events in Anthropic's order, the error envelope and the `request-id` header. The official SDK
drives this module's gateway fixture in test_anthropic_sdk_live.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.policy.index import key_digest
from gateway.tokens import count_chat
from tests.e2e.conftest import Ledger
from tests.harness.gateway import gateway_process
from tests.harness.procs import ServerProcess
from tests.harness.sse import parse_events
from tests.harness.waiting import wait_until

SHAPES = json.loads((Path(__file__).parents[1] / "fixtures" / "anthropic" / "shapes.json").read_text())
KEY = "sk-anthropic-client-0001"
TIGHT_KEY = "sk-anthropic-tight-0002"
SDK_HEADERS = {"anthropic-version": "2026-10-21", "x-stainless-lang": "python", "content-type": "application/json"}
TOOL = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
HELLO = [{"role": "user", "content": "Say hello"}]
TIGHT_RPM = 2


def _policy(fake_url: str) -> str:
    return f"""
version: 1
backends:
  - {{name: fake, adapter: openai, base_url: "{fake_url}/v1"}}
  - {{name: sim, adapter: simulated, simulated: {{ttft_ms: 1, tokens_per_second: 5000, output_tokens: 12}}}}
models:
  - {{name: fake-m, capabilities: [chat, tools, vision, json], deployments: [{{backend: fake, upstream_model: fake-model}}]}}
  - {{name: broken-m, deployments: [{{backend: fake, upstream_model: "fault:error-event-after-2"}}]}}
  - {{name: sim-m, capabilities: [chat, tools, json], deployments: [{{backend: sim, upstream_model: sim-1}}]}}
routes:
  - {{name: gpt-fake, models: [fake-m]}}
  - {{name: broken, models: [broken-m]}}
  - {{name: sim-chat, models: [sim-m]}}
tenants:
  - name: alpha
    keys: [{{id: a-1, digest: "{key_digest(KEY)}"}}]
  - name: tight
    keys: [{{id: t-1, digest: "{key_digest(TIGHT_KEY)}"}}]
    allowed_routes: [sim-chat]
    limits: {{tenant: {{requests_per_minute: {TIGHT_RPM}}}}}
"""


@pytest.fixture(scope="module")
def gw(fake_upstream: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("gw-anthropic")
    policy = folder / "policy.yaml"
    policy.write_text(_policy(fake_upstream.base_url))
    log = folder / "gateway.log"
    with gateway_process(policy, log_path=log) as proc:
        yield proc
    assert KEY not in log.read_text(errors="replace"), "a client key reached the gateway log"


def post(gw: ServerProcess, path: str, body: dict[str, Any], key: str = KEY, bearer: bool = True) -> httpx.Response:
    auth = {"authorization": f"Bearer {key}"} if bearer else {"x-api-key": key}
    return httpx.post(gw.base_url + path, content=json.dumps(body), headers={**SDK_HEADERS, **auth}, timeout=30)


def create(gw: ServerProcess, **fields: Any) -> httpx.Response:
    return post(gw, "/v1/messages", {"max_tokens": 32, "messages": HELLO, **fields})


def assemble(response: httpx.Response) -> tuple[list[str], dict[str, Any]]:
    """What the SDK's stream helper does: every event named, in order, folded into one message."""
    names: list[str] = []
    message: dict[str, Any] = {}
    partial: dict[int, str] = {}
    for ev in parse_events(response.content):
        assert ev.event != "message", f"an unnamed event: {ev.data}"  # the SDK skips those
        data = json.loads(ev.data)
        assert data["type"] == ev.event
        names.append(ev.event)
        if ev.event == "message_start":
            message = data["message"]
        elif ev.event == "content_block_start":
            assert data["index"] == len(message["content"])
            message["content"].append(data["content_block"])
        elif ev.event == "content_block_delta":
            block, delta = message["content"][data["index"]], data["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            else:
                assert delta["type"] == "input_json_delta"
                partial[data["index"]] = partial.get(data["index"], "") + delta["partial_json"]
        elif ev.event == "content_block_stop" and data["index"] in partial:
            message["content"][data["index"]]["input"] = json.loads(partial.pop(data["index"]))
        elif ev.event == "message_delta":
            message["stop_reason"] = data["delta"]["stop_reason"]
            message["usage"].update(data["usage"])
        elif ev.event == "error":
            message["error"] = data
    return names, message


def _unnumbered(text: str) -> str:
    return re.sub(r"^<<req:\d+>> ", "", text)


def in_order(names: list[str]) -> bool:
    """message_start (content_block_start content_block_delta* content_block_stop)* message_delta message_stop."""
    body = [n for n in names if n != "ping"]
    if body[:1] != ["message_start"] or body[-2:] != ["message_delta", "message_stop"]:
        return False
    state = "between"
    for n in body[1:-2]:
        if (state, n) in {("between", "content_block_start"), ("open", "content_block_delta")}:
            state = "open"
        elif (state, n) == ("open", "content_block_stop"):
            state = "between"
        else:
            return False
    return state == "between"


# ---- create ----


@pytest.mark.parametrize("route", ["sim-chat", "gpt-fake"])
def test_create_answers_a_message(gw: ServerProcess, route: str) -> None:
    response = create(gw, model=route)
    assert response.status_code == 200, response.text
    assert response.headers["request-id"] == response.headers["x-strait-request-id"]
    message = response.json()
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["id"].startswith("msg_") and message["model"] == route
    assert [b["type"] for b in message["content"]] == ["text"] and message["content"][0]["text"]
    assert message["stop_reason"] in ("end_turn", "max_tokens") and message["stop_sequence"] is None
    usage = message["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0


def test_the_upstream_gets_a_chat_body_translated_from_the_message(gw: ServerProcess, ledger: Ledger) -> None:
    response = create(
        gw,
        model="gpt-fake",
        system="You are terse.",
        max_tokens=7,
        stop_sequences=["STOP"],
        temperature=0.25,
        metadata={"user_id": "end-user-9"},
    )
    assert response.status_code == 200, response.text
    sent = ledger.records()[-1]["body"]
    assert sent["model"] == "fake-model"  # the deployment's upstream model, not the route name
    assert sent["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hello"},
    ]
    assert (sent["max_tokens"], sent["stop"], sent["temperature"], sent["user"]) == (7, ["STOP"], 0.25, "end-user-9")
    assert "metadata" not in sent and "system" not in sent and "stop_sequences" not in sent


def test_x_api_key_is_accepted_as_well_as_bearer(gw: ServerProcess) -> None:
    response = post(gw, "/v1/messages", {"model": "sim-chat", "max_tokens": 8, "messages": HELLO}, bearer=False)
    assert response.status_code == 200, response.text


# ---- stream ----


@pytest.mark.parametrize("route", ["sim-chat", "gpt-fake"])
def test_stream_sends_anthropics_events_in_order(gw: ServerProcess, route: str) -> None:
    whole = create(gw, model=route, max_tokens=12).json()
    response = create(gw, model=route, max_tokens=12, stream=True)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["request-id"]
    names, message = assemble(response)
    assert in_order(names), names
    assert message["id"].startswith("msg_") and message["model"] == route
    assert [b["type"] for b in message["content"]] == ["text"]
    assert message["stop_reason"] == whole["stop_reason"]
    # The same answer as the whole message (both backends are deterministic for the same request; the
    # fake numbers its answers).
    assert _unnumbered(message["content"][0]["text"]) == _unnumbered(whole["content"][0]["text"])
    assert message["usage"]["output_tokens"] == whole["usage"]["output_tokens"]


def test_a_stream_that_fails_upstream_ends_with_an_error_event(gw: ServerProcess) -> None:
    response = create(gw, model="broken", stream=True)
    assert response.status_code == 200
    names, message = assemble(response)
    assert names[0] == "message_start" and names[-1] == "error"
    assert "message_stop" not in names
    assert message["error"]["type"] == "error" and message["error"]["error"]["type"] == "api_error"


# ---- tools: a tool_use turn, then the tool_result turn ----


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_loop(gw: ServerProcess, stream: bool) -> None:
    first = create(gw, model="sim-chat", tools=[TOOL], stream=stream)
    assert first.status_code == 200, first.text
    message = assemble(first)[1] if stream else first.json()
    assert message["stop_reason"] == "tool_use"
    calls = [b for b in message["content"] if b["type"] == "tool_use"]
    assert len(calls) == 1 and calls[0]["name"] == "get_weather" and calls[0]["id"]
    assert isinstance(calls[0]["input"], dict)
    turns = [
        *HELLO,
        {"role": "assistant", "content": message["content"]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": calls[0]["id"], "content": "sunny"}]},
    ]
    second = create(gw, model="sim-chat", tools=[TOOL], messages=turns, stream=stream)
    assert second.status_code == 200, second.text
    answer = assemble(second)[1] if stream else second.json()
    # The simulated model reads the tool's result and answers in text: the loop ends.
    assert answer["stop_reason"] in ("end_turn", "max_tokens")
    assert [b["type"] for b in answer["content"]] == ["text"]


def test_tool_turns_reach_an_openai_upstream_as_tool_calls_and_tool_messages(gw: ServerProcess, ledger: Ledger) -> None:
    turns = [
        *HELLO,
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "rain"}]},
    ]
    response = create(gw, model="gpt-fake", tools=[TOOL], tool_choice={"type": "auto"}, messages=turns)
    assert response.status_code == 200, response.text
    sent = ledger.records()[-1]["body"]
    (call,) = sent["messages"][1]["tool_calls"]
    assert (call["id"], call["type"], call["function"]["name"]) == ("toolu_1", "function", "get_weather")
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo"}  # the client's own JSON text
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": "toolu_1", "content": "rain"}
    assert sent["tools"][0]["function"]["parameters"] == TOOL["input_schema"] and sent["tool_choice"] == "auto"


# ---- count_tokens ----


def test_count_tokens(gw: ServerProcess) -> None:
    body = {"model": "sim-chat", "system": "Be brief.", "messages": [{"role": "user", "content": "How many tokens?"}]}
    response = post(gw, "/v1/messages/count_tokens", body)
    assert response.status_code == 200, response.text
    assert response.json() == {"input_tokens": count_chat(["Be brief.", "How many tokens?"])}
    assert response.headers["request-id"]
    longer = post(gw, "/v1/messages/count_tokens", {**body, "tools": [TOOL]}).json()["input_tokens"]
    assert longer > response.json()["input_tokens"]  # tool definitions count


# ---- errors: Anthropic's envelope, statuses and request-id ----


def _error(response: httpx.Response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == kind
    assert body["request_id"] == response.headers["request-id"]
    message: str = body["error"]["message"]
    return message


def test_a_bad_request_is_a_400_in_anthropics_envelope(gw: ServerProcess) -> None:
    message = _error(post(gw, "/v1/messages", {"model": "sim-chat", "messages": HELLO}), 400, "invalid_request_error")
    assert "max_tokens" in message
    _error(
        httpx.post(gw.base_url + "/v1/messages", content=b"{not json", headers={"authorization": f"Bearer {KEY}"}),
        400,
        "invalid_request_error",
    )


def test_a_bad_key_is_a_401_authentication_error(gw: ServerProcess) -> None:
    response = post(gw, "/v1/messages", {"model": "sim-chat", "max_tokens": 4, "messages": HELLO}, key="sk-wrong")
    message = _error(response, 401, "authentication_error")
    assert "sk-wrong" not in response.text and message
    _error(
        post(gw, "/v1/messages/count_tokens", {"model": "sim-chat", "messages": HELLO}, key="sk-wrong"),
        401,
        "authentication_error",
    )


def test_an_unknown_model_is_a_404_not_found_error(gw: ServerProcess) -> None:
    _error(create(gw, model="no-such-route"), 404, "not_found_error")
    _error(post(gw, "/v1/messages/count_tokens", {"model": "no-such-route", "messages": HELLO}), 404, "not_found_error")


def test_a_route_the_tenant_may_not_use_is_not_found(gw: ServerProcess) -> None:
    """As on the OpenAI route: a route outside the tenant's `allowed_routes` is not revealed to exist."""
    response = post(gw, "/v1/messages", {"model": "gpt-fake", "max_tokens": 4, "messages": HELLO}, key=TIGHT_KEY)
    _error(response, 404, "not_found_error")


def test_what_chat_completions_cannot_carry_is_a_400(gw: ServerProcess, ledger: Ledger) -> None:
    before = ledger.count()
    turns = [
        *HELLO,
        {
            "role": "assistant",
            "content": [{"type": "thinking", "thinking": "hmm", "signature": "c2ln"}, {"type": "text", "text": "hi"}],
        },
        {"role": "user", "content": "again"},
    ]
    message = _error(create(gw, model="gpt-fake", messages=turns), 400, "invalid_request_error")
    assert "thinking" in message
    assert ledger.count() == before  # never sent, rather than sent without its signature


# ---- limits and usage apply as on the OpenAI route ----


async def test_limits_and_usage_records_apply_to_messages(gw: ServerProcess) -> None:
    headers = {**SDK_HEADERS, "authorization": f"Bearer {TIGHT_KEY}"}
    body = json.dumps({"model": "sim-chat", "max_tokens": 5, "messages": HELLO})
    async with httpx.AsyncClient(base_url=gw.base_url, headers=headers, timeout=30) as client:
        answers = [await client.post("/v1/messages", content=body) for _ in range(TIGHT_RPM)]
        assert [a.status_code for a in answers] == [200] * TIGHT_RPM
        refused = await client.post("/v1/messages", content=body)
        _error(refused, 429, "rate_limit_error")
        assert 0 < float(refused.headers["retry-after"]) <= 120
        spent_in = sum(a.json()["usage"]["input_tokens"] for a in answers)
        spent_out = sum(a.json()["usage"]["output_tokens"] for a in answers)

        async def recorded() -> bool:
            rows = (await client.get("/v1/usage?by=route")).json()["data"]
            row = next((r for r in rows if r["value"] == "sim-chat"), None)
            return row is not None and row["requests"] >= TIGHT_RPM

        await wait_until(recorded, timeout=15)
        rows = (await client.get("/v1/usage?by=route")).json()["data"]
    row = next(r for r in rows if r["value"] == "sim-chat")
    # The records the OpenAI route writes: under the route name, with the tokens the client was shown.
    assert (row["requests"], row["prompt_tokens"], row["completion_tokens"]) == (TIGHT_RPM, spent_in, spent_out)


# ---- against the recorded shapes of real Anthropic answers (tests/fixtures/anthropic) ----


def _has(obj: dict[str, Any], keys: list[str], where: str) -> None:
    missing = set(keys) - set(obj)
    assert not missing, f"{where} lacks {sorted(missing)} (recorded: {keys})"


def test_answers_have_every_key_real_anthropic_answers_have(gw: ServerProcess) -> None:
    message = create(gw, model="sim-chat", tools=[TOOL]).json()
    _has(message, SHAPES["message"]["keys"], "a message")
    for block in message["content"]:
        _has(block, SHAPES["content_block"][block["type"]], f"a {block['type']} block")
    for tools in ([TOOL], []):
        response = create(gw, model="sim-chat", tools=tools, stream=True)
        events = [(ev.event, json.loads(ev.data)) for ev in parse_events(response.content)]
        recorded = [n for n in SHAPES["stream_order_tool_turn"] if n != "ping"]
        assert [n for n, _ in events if n not in ("ping", "content_block_delta")] == [
            n for n in recorded if n != "content_block_delta"
        ]
        for name, data in events:
            _has(data, SHAPES["events"][name]["keys"], name)
            if name == "message_start":
                _has(data["message"], SHAPES["message"]["keys"], "message_start.message")
                _has(data["message"]["usage"], SHAPES["message_start_usage"]["keys"], "message_start usage")
            elif name == "content_block_start":
                block = data["content_block"]
                _has(block, SHAPES["content_block"][block["type"]], f"a started {block['type']} block")
            elif name == "content_block_delta":
                _has(data["delta"], SHAPES["delta"][data["delta"]["type"]], data["delta"]["type"])
            elif name == "message_delta":
                _has(data["delta"], SHAPES["message_delta"]["delta_keys"], "message_delta.delta")
                _has(data["usage"], SHAPES["message_delta"]["usage_keys"], "message_delta.usage")
    error = create(gw, model="no-such-route").json()
    _has(error, SHAPES["error"]["keys"], "an error")
    _has(error["error"], SHAPES["error"]["error_keys"], "an error's error")
