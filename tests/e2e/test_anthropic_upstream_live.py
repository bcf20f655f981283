"""Strait in front of an Anthropic upstream (`adapter: anthropic`): a real gateway process and the fake
Anthropic upstream (tests/harness/fake_anthropic.py), driven by the official `openai` and `anthropic` SDKs.

- An OpenAI client gets its answers translated (create, stream, tools) and its next turn translated back:
  the thinking signature the upstream issued goes up again byte for byte (the fake refuses any other).
- An Anthropic client's bytes go up with only `model` replaced, and the upstream's answer (JSON or events,
  pings and order included) comes back byte for byte; its SDK runs a two-turn tool loop with thinking.
- Prompt-cache usage (reads and writes) reaches the client and the usage records.
- An overloaded (529) or rate-limited (429, retry-after) deployment fails over to the next; a mid-stream
  `error` event or a stream without `message_stop` ends the client's stream with an error; an upstream
  400 reaches the client in its own protocol's envelope.
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from gateway.policy.index import key_digest
from tests.harness.gateway import gateway_process
from tests.harness.procs import ServerProcess, free_port

CLIENT_KEY = "sk-claude-client-canary-93a1"
BACKEND_KEY = "anthropic-backend-secret-77f2"
TOOL_SCHEMA = {"type": "object", "properties": {"location": {"type": "string"}}}
ANTHROPIC_TOOL = {"name": "get_weather", "description": "Weather now", "input_schema": TOOL_SCHEMA}
OPENAI_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": TOOL_SCHEMA}}
# Prices in USD per million tokens: a cache read at a tenth of the input price shows in the cost.
INPUT_PRICE, CACHED_PRICE, OUTPUT_PRICE = 100.0, 10.0, 200.0


def policy(fake: str) -> str:
    price = f"{{input_per_mtok: {INPUT_PRICE}, cached_input_per_mtok: {CACHED_PRICE}, output_per_mtok: {OUTPUT_PRICE}}}"
    return f"""
version: 1
backends:
  - {{name: claude, adapter: anthropic, base_url: "{fake}/v1", api_key: "env:ANTHROPIC_BACKEND_KEY", tier: provider,
     anthropic: {{default_max_tokens: 256}}, outlier: {{consecutive_failures: 0, error_ratio: 0}}}}
  - {{name: claude-b, adapter: anthropic, base_url: "{fake}/v1", api_key: "env:ANTHROPIC_BACKEND_KEY", tier: provider}}
models:
  - name: claude-fake
    capabilities: [chat, tools, vision, json]
    deployments: [{{backend: claude, upstream_model: claude-fake, price: {price}}}]
  - name: claude-cached
    capabilities: [chat, tools]
    deployments: [{{backend: claude-b, upstream_model: claude-fake, price: {price}}}]
  - name: claude-redacted
    capabilities: [chat, tools]
    deployments: [{{backend: claude, upstream_model: claude-fake-redacted}}]
  - name: claude-backup
    capabilities: [chat, tools]
    deployments: [{{backend: claude-b, upstream_model: claude-fake}}]
  - {{name: overloaded, capabilities: [chat, tools], deployments: [{{backend: claude, upstream_model: "fault:529"}}]}}
  - {{name: limited, capabilities: [chat, tools], deployments: [{{backend: claude, upstream_model: "fault:429"}}]}}
  - {{name: errors-mid-stream, deployments: [{{backend: claude, upstream_model: "fault:error-event"}}]}}
  - {{name: no-stop, deployments: [{{backend: claude, upstream_model: "fault:no-stop"}}]}}
  - {{name: refuses, deployments: [{{backend: claude, upstream_model: "fault:400"}}]}}
routes:
  - {{name: claude, models: [claude-fake]}}
  - {{name: claude-cached, models: [claude-cached]}}
  - {{name: claude-redacted, models: [claude-redacted]}}
  - {{name: overloaded-then-backup, models: [overloaded, claude-backup]}}
  - {{name: limited-then-backup, models: [limited, claude-backup], retry: {{max_retry_after_s: 0.5}}}}
  - {{name: errors-mid-stream, models: [errors-mid-stream]}}
  - {{name: no-stop, models: [no-stop]}}
  - {{name: refuses, models: [refuses]}}
tenants:
  - name: acme
    keys: [{{id: acme-1, digest: "{key_digest(CLIENT_KEY)}"}}]
"""


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    port = free_port()
    log = tmp_path_factory.mktemp("fake-anthropic") / "fake.log"
    argv = [sys.executable, "-m", "tests.harness.fake_anthropic", "--port", str(port), "--key", BACKEND_KEY]
    with ServerProcess(argv, port, ready_path="/healthz", log_path=log) as proc:
        yield proc


@pytest.fixture(scope="module")
def gw(fake: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("gw-anthropic")
    (folder / "policy.yaml").write_text(policy(fake.base_url))
    proc = gateway_process(
        folder / "policy.yaml", log_path=folder / "gateway.log", env={"ANTHROPIC_BACKEND_KEY": BACKEND_KEY}
    )
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
        if record["response_b64"] is not None:
            return record
        httpx.get(fake.base_url + "/healthz", timeout=5)  # a round trip: the fake's handler runs meanwhile
    raise AssertionError("the fake never finished its answer")


def oai(gw: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=30)


def claude(gw: ServerProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.base_url, api_key=CLIENT_KEY, max_retries=0, timeout=30)


# ---- an OpenAI client, translated ----


def test_openai_sdk_create_and_stream(gw: ServerProcess, fake: ServerProcess) -> None:
    client = oai(gw)
    reply = client.chat.completions.create(
        model="claude",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
    )
    assert reply.choices[0].message.content == "Hello from the fake Anthropic upstream, answering in plain words"
    assert reply.choices[0].finish_reason == "stop" and reply.usage is not None and reply.usage.completion_tokens > 0
    sent = json.loads(base64.b64decode(ledger(fake)[-1]["body_b64"]))
    assert sent["system"] == "Be brief." and sent["max_tokens"] == 256  # the backend's default_max_tokens
    assert ledger(fake)[-1]["headers"]["x-api-key"] == BACKEND_KEY
    assert CLIENT_KEY not in json.dumps(ledger(fake))
    stream = client.chat.completions.create(
        model="claude",
        messages=[{"role": "user", "content": "Hello"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_openai_sdk_tool_loop_with_thinking_sends_the_signature_back_byte_for_byte(
    gw: ServerProcess, fake: ServerProcess
) -> None:
    client = oai(gw)
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.chat.completions.create(
        model="claude", messages=messages, tools=[OPENAI_TOOL], reasoning_effort="low", max_tokens=2000
    )
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls" and message.tool_calls
    extra = message.model_extra or {}
    (block,) = extra["thinking_blocks"]
    issued = json.loads(base64.b64decode(last_answered(fake)["response_b64"]))["content"][0]["signature"]
    assert block["signature"] == issued and extra["reasoning_content"] == block["thinking"]
    call = message.tool_calls[0]
    assert json.loads(call.function.arguments) == {"location": "Paris"}  # type: ignore[union-attr]
    messages += [
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"},
    ]
    second = client.chat.completions.create(
        model="claude", messages=messages, tools=[OPENAI_TOOL], reasoning_effort="low", max_tokens=2000
    )
    assert second.choices[0].message.content == "The tool said: Sunny, 21 C"
    sent = json.loads(base64.b64decode(ledger(fake)[-1]["body_b64"]))
    assert sent["messages"][1]["content"][0] == {"type": "thinking", "thinking": block["thinking"], "signature": issued}
    assert sent["messages"][1]["content"][1]["id"] == call.id


def test_openai_sdk_streamed_tool_call(gw: ServerProcess) -> None:
    stream = oai(gw).chat.completions.create(
        model="claude", messages=[{"role": "user", "content": "Weather?"}], tools=[OPENAI_TOOL], stream=True
    )
    calls = [tc for c in stream if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].id and calls[0].function is not None and calls[0].function.name == "get_weather"
    assert json.loads("".join((tc.function.arguments or "") for tc in calls if tc.function)) == {"location": "Paris"}


# ---- an Anthropic client: its bytes up, the upstream's bytes back ----


def test_a_messages_request_goes_up_as_its_bytes_and_the_answer_comes_back_as_the_upstreams(
    gw: ServerProcess, fake: ServerProcess
) -> None:
    body = (
        b'{"model": "claude", "max_tokens":64,  "thinking": {"type":"enabled","budget_tokens":1024},'
        b' "messages":[{"role":"user","content":"Hi \\u00e9"}], "service_tier": "auto"}'
    )
    headers = {"x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01", "content-type": "application/json"}
    for stream in (False, True):
        sent_body = body if not stream else body.replace(b'"max_tokens":64', b'"max_tokens":64, "stream": true')
        r = httpx.post(gw.base_url + "/v1/messages", content=sent_body, headers=headers, timeout=30)
        assert r.status_code == 200
        record = last_answered(fake)
        assert base64.b64decode(record["body_b64"]) == sent_body.replace(b'"claude"', b'"claude-fake"', 1)
        assert r.content == base64.b64decode(record["response_b64"])  # pings, order, signature: all as sent
        assert r.headers["request-id"] and r.headers["x-strait-deployment"] == "claude-fake@claude"


def test_anthropic_sdk_two_turn_tool_loop_with_thinking_streamed(gw: ServerProcess, fake: ServerProcess) -> None:
    client = claude(gw)
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    thinking: Any = {"type": "enabled", "budget_tokens": 1024}
    with client.messages.stream(
        model="claude-redacted", max_tokens=2000, thinking=thinking, tools=[ANTHROPIC_TOOL], messages=messages
    ) as stream:
        first = stream.get_final_message()
    assert [b.type for b in first.content] == ["thinking", "redacted_thinking", "tool_use"]
    issued = [
        json.loads(line[6:])
        for line in base64.b64decode(last_answered(fake)["response_b64"]).decode().split("\n")
        if '"signature_delta"' in line
    ]
    assert first.content[0].signature == issued[0]["delta"]["signature"]  # type: ignore[union-attr]
    call = first.content[2]
    assert call.type == "tool_use"
    messages += [
        {"role": "assistant", "content": first.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny"}]},
    ]
    second = client.messages.create(
        model="claude-redacted", max_tokens=2000, thinking=thinking, tools=[ANTHROPIC_TOOL], messages=messages
    )
    assert second.content[-1].type == "text" and second.content[-1].text == "The tool said: Sunny"
    assert second.usage.output_tokens > 0
    sent = json.loads(base64.b64decode(ledger(fake)[-1]["body_b64"]))
    returned = sent["messages"][1]["content"]
    assert returned[0]["signature"] == first.content[0].signature  # type: ignore[union-attr]
    assert returned[1] == {"type": "redacted_thinking", "data": first.content[1].data}  # type: ignore[union-attr]


# ---- prompt caching ----


def _usage_row(gw: ServerProcess, route: str) -> dict[str, Any]:
    rows = httpx.get(gw.base_url + "/v1/usage?by=route", headers={"authorization": f"Bearer {CLIENT_KEY}"}, timeout=10)
    return next((r for r in rows.json()["data"] if r["value"] == route), {"requests": 0})


def test_cache_reads_and_writes_reach_the_client_and_the_usage_records(gw: ServerProcess) -> None:
    client = claude(gw)
    system: Any = [{"type": "text", "text": "A long shared rulebook " * 20, "cache_control": {"type": "ephemeral"}}]
    ask: Any = [{"role": "user", "content": "Hello"}]
    first = client.messages.create(model="claude-cached", max_tokens=64, system=system, messages=ask)
    second = client.messages.create(model="claude-cached", max_tokens=64, system=system, messages=ask)
    written = first.usage.cache_creation_input_tokens or 0
    assert written > 0 and not first.usage.cache_read_input_tokens
    assert second.usage.cache_read_input_tokens == written and not second.usage.cache_creation_input_tokens
    # An OpenAI client marks its cached prefix on a content part (as LiteLLM takes it): the same prefix.
    rulebook: Any = [{"type": "text", "text": "A long shared rulebook " * 20, "cache_control": {"type": "ephemeral"}}]
    reply = oai(gw).chat.completions.create(
        model="claude-cached", messages=[{"role": "system", "content": rulebook}, {"role": "user", "content": "Hello"}]
    )
    assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
    assert reply.usage.prompt_tokens_details.cached_tokens == written
    for _ in range(100):
        row = _usage_row(gw, "claude-cached")
        if row["requests"] >= 3:
            break
        httpx.get(gw.base_url + "/healthz", timeout=5)
    answers = [
        (first.usage.input_tokens + written, first.usage.output_tokens, 0),
        (second.usage.input_tokens + written, second.usage.output_tokens, written),
        (reply.usage.prompt_tokens, reply.usage.completion_tokens, written),
    ]
    assert row["requests"] == 3
    assert row["prompt_tokens"] == sum(p for p, _, _ in answers)
    cost = sum(((p - c) * INPUT_PRICE + c * CACHED_PRICE + o * OUTPUT_PRICE) / 1e6 for p, o, c in answers)
    assert row["cost_usd"] == pytest.approx(cost, abs=1e-5)


# ---- failures ----


def test_an_overloaded_deployment_fails_over_to_the_next(gw: ServerProcess, fake: ServerProcess) -> None:
    before = len(ledger(fake))
    raw = oai(gw).chat.completions.with_raw_response.create(
        model="overloaded-then-backup", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-strait-deployment"] == "claude-backup@claude-b"
    assert raw.parse().choices[0].message.content
    tried = [json.loads(base64.b64decode(r["body_b64"]))["model"] for r in ledger(fake)[before:]]
    assert tried[0] == "fault:529" and tried[-1] == "claude-fake"
    message = claude(gw).messages.create(
        model="overloaded-then-backup", max_tokens=32, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.content[0].type == "text"


def test_a_rate_limited_deployment_waits_its_retry_after_bound_then_fails_over(
    gw: ServerProcess, fake: ServerProcess
) -> None:
    before = len(ledger(fake))
    message = claude(gw).messages.create(
        model="limited-then-backup", max_tokens=32, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.content[0].type == "text"
    tried = [json.loads(base64.b64decode(r["body_b64"]))["model"] for r in ledger(fake)[before:]]
    # retry-after: 1 is past the route's 0.5 s bound: the next deployment at once, no second 429.
    assert tried == ["fault:429", "claude-fake"]


def test_a_mid_stream_error_event_ends_the_clients_stream_with_an_error(gw: ServerProcess) -> None:
    with (
        pytest.raises(anthropic.APIStatusError) as info,
        claude(gw).messages.stream(
            model="errors-mid-stream", max_tokens=32, messages=[{"role": "user", "content": "hi"}]
        ) as stream,
    ):
        stream.get_final_message()
    assert "Overloaded" in str(info.value)
    with pytest.raises(openai.APIError):
        list(
            oai(gw).chat.completions.create(
                model="errors-mid-stream", messages=[{"role": "user", "content": "hi"}], stream=True
            )
        )


def test_a_stream_without_message_stop_is_not_a_complete_answer(gw: ServerProcess) -> None:
    headers = {"x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01"}
    body = {"model": "no-stop", "max_tokens": 32, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(gw.base_url + "/v1/messages", json=body, headers=headers, timeout=30)
    assert b"event: message_stop" not in r.content and r.content.rstrip().split(b"\n")[-2] == b"event: error"
    with pytest.raises(openai.APIError):
        list(
            oai(gw).chat.completions.create(model="no-stop", messages=[{"role": "user", "content": "hi"}], stream=True)
        )


def test_an_upstream_400_reaches_each_client_in_its_own_envelope(gw: ServerProcess, fake: ServerProcess) -> None:
    with pytest.raises(anthropic.BadRequestError) as a:
        claude(gw).messages.create(model="refuses", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert a.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "prompt is invalid" in a.value.body["error"]["message"]  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as o:
        oai(gw).chat.completions.create(model="refuses", messages=[{"role": "user", "content": "hi"}])
    assert o.value.code is None or isinstance(o.value.code, str)
    assert "prompt is invalid" in str(o.value) and "127.0.0.1" not in str(o.value)


def test_an_openai_request_messages_cannot_carry_is_a_400_never_sent(gw: ServerProcess, fake: ServerProcess) -> None:
    before = len(ledger(fake))
    with pytest.raises(openai.BadRequestError) as info:
        oai(gw).chat.completions.create(model="claude", messages=[{"role": "user", "content": "hi"}], n=2)
    assert "n=1" in str(info.value)
    assert len(ledger(fake)) == before
