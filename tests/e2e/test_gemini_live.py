"""The `gemini` adapter end to end: the official `openai` SDK (and the `anthropic` SDK on /v1/messages)
through a real `strait serve` to the fake Gemini upstream (tests/harness/fake_gemini.py, its own
process): create, stream, a two-turn tool loop whose thought signature Gemini gets back byte for byte,
usage with cached and thinking tokens (the client's and the usage records'), a 503 that falls back to
another deployment, and safety blocks as a clear content-filter error."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from gateway.policy.index import key_digest
from tests.harness.gateway import gateway_process
from tests.harness.procs import ServerProcess, free_port
from tests.harness.waiting import poll

KEY = "sk-gemini-e2e-canary-93ab"
GEMINI_SECRET = "AIza-fake-gemini-secret-61f0"
USER = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a place",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "f"]}},
            "required": ["location", "unit"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
PRICE = "{input_per_mtok: 1.0, output_per_mtok: 4.0, cached_input_per_mtok: 0.25}"


def policy(fake: str) -> str:
    return f"""
version: 1
backends:
  - {{name: gem, adapter: gemini, base_url: "{fake}", api_key: "env:GEMINI_KEY", tier: provider}}
  - {{name: gem-eu, adapter: gemini, base_url: "{fake}", api_key: "env:GEMINI_KEY", tier: provider}}
models:
  - name: flash
    capabilities: [chat, tools, json, vision]
    deployments: [{{backend: gem, upstream_model: "gemini-2.5-flash+cached", price: {PRICE}}}]
  - name: flash-down
    capabilities: [chat, tools, json]
    deployments: [{{backend: gem-eu, upstream_model: "gemini-2.5-flash+503"}}]
  - name: flash-safety
    deployments: [{{backend: gem, upstream_model: "gemini-2.5-flash+safety"}}]
  - name: flash-blocked
    deployments: [{{backend: gem, upstream_model: "gemini-2.5-flash+blocked"}}]
  - name: flash-safety-mid
    deployments: [{{backend: gem, upstream_model: "gemini-2.5-flash+safety-mid"}}]
  - name: flash-cut
    deployments: [{{backend: gem, upstream_model: "gemini-2.5-flash+cut"}}]
routes:
  - {{name: gem, models: [flash]}}
  - {{name: gem-fallback, models: [flash-down, flash]}}
  - {{name: gem-safety, models: [flash-safety]}}
  - {{name: gem-blocked, models: [flash-blocked]}}
  - {{name: gem-safety-mid, models: [flash-safety-mid]}}
  - {{name: gem-cut, models: [flash-cut]}}
tenants:
  - name: acme
    keys: [{{id: acme-1, digest: "{key_digest(KEY)}"}}]
"""


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    port = free_port()
    log = tmp_path_factory.mktemp("fake_gemini") / "fake.log"
    argv = [sys.executable, "-m", "tests.harness.fake_gemini", "--port", str(port), "--key", GEMINI_SECRET]
    with ServerProcess(argv, port, log_path=log) as proc:
        yield proc


@pytest.fixture(scope="module")
def gw(fake: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("gw_gemini")
    path = folder / "policy.yaml"
    path.write_text(policy(fake.base_url))
    with gateway_process(path, log_path=folder / "gateway.log", env={"GEMINI_KEY": GEMINI_SECRET}) as proc:
        yield proc
    log = Path(folder / "gateway.log").read_text(errors="replace")
    assert GEMINI_SECRET not in log and KEY not in log, "a secret reached the gateway log"


@pytest.fixture
def client(gw: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def ledger(fake: ServerProcess) -> list[dict[str, Any]]:
    return httpx.get(fake.base_url + "/_ledger", timeout=5).json()  # type: ignore[no-any-return]


def test_create(client: openai.OpenAI, fake: ServerProcess) -> None:
    completion = client.chat.completions.create(model="gem", messages=USER, temperature=0.3, max_tokens=40)  # type: ignore[arg-type]
    assert completion.choices[0].message.content == "Paris is the capital of France"
    assert completion.choices[0].finish_reason == "stop"
    last = ledger(fake)[-1]
    assert last["path"] == "/v1beta/models/gemini-2.5-flash+cached:generateContent" and last["query"] == ""
    assert last["headers"]["x-goog-api-key"] == GEMINI_SECRET and "authorization" not in last["headers"]
    assert last["body"]["generationConfig"] == {"temperature": 0.3, "maxOutputTokens": 40}
    assert last["body"]["contents"] == [{"role": "user", "parts": [{"text": "What is the capital of France?"}]}]


def test_stream_with_usage_cached_and_reasoning_tokens(client: openai.OpenAI, fake: ServerProcess) -> None:
    chunks = list(
        client.chat.completions.create(
            model="gem",
            messages=USER,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
            reasoning_effort="low",
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Paris is the capital of France"
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    assert reasoning.startswith("The user asks")
    usage = chunks[-1].usage
    assert usage is not None and not chunks[-1].choices
    # The fake: 6 prompt words (half cached), 6 answer words, 11 thought tokens.
    assert usage.prompt_tokens == 6 and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 3
    assert usage.completion_tokens == 6 + 11
    assert usage.completion_tokens_details is not None and usage.completion_tokens_details.reasoning_tokens == 11
    last = ledger(fake)[-1]
    assert last["path"].endswith(":streamGenerateContent") and last["query"] == "alt=sse"
    assert last["body"]["generationConfig"]["thinkingConfig"] == {"includeThoughts": True, "thinkingBudget": 1024}


def test_two_turn_tool_loop_keeps_the_thought_signature(client: openai.OpenAI, fake: ServerProcess) -> None:
    first = client.chat.completions.create(model="gem", messages=USER, tools=[WEATHER])  # type: ignore[arg-type,list-item]
    assert first.choices[0].finish_reason == "tool_calls"
    (call,) = first.choices[0].message.tool_calls or []
    signature = call.model_extra["extra_content"]["google"]["thought_signature"]  # type: ignore[index]
    issued = ledger(fake)[-1]
    assert json.loads(call.function.arguments) == {"location": "Paris", "unit": "celsius"}  # type: ignore[union-attr]
    # The message as the SDK gave it (extra fields kept), then the tool's answer.
    history = [*USER, first.choices[0].message.model_dump(exclude_none=True)]
    history.append({"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21}'})
    second = client.chat.completions.create(model="gem", messages=history, tools=[WEATHER])  # type: ignore[arg-type,list-item]
    assert second.choices[0].message.content == 'The tool get_weather said {"celsius": 21}'
    sent = ledger(fake)[-1]["body"]["contents"][1]["parts"][0]
    assert sent["thoughtSignature"] == signature and sent["functionCall"]["name"] == "get_weather"
    assert issued["body"]["tools"][0]["functionDeclarations"][0]["parameters"]["type"] == "OBJECT"
    # Streamed, the same loop: the signature comes in the tool call's delta and goes back exactly.
    chunks = list(client.chat.completions.create(model="gem", messages=USER, tools=[WEATHER], stream=True))  # type: ignore[arg-type,list-item]
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    (streamed,) = deltas
    streamed_sig = streamed.model_extra["extra_content"]["google"]["thought_signature"]  # type: ignore[index]
    assistant = {
        "role": "assistant",
        "tool_calls": [
            {
                "id": streamed.id,
                "type": "function",
                "function": {"name": "get_weather", "arguments": streamed.function.arguments},  # type: ignore[union-attr]
                "extra_content": {"google": {"thought_signature": streamed_sig}},
            }
        ],
    }
    final = client.chat.completions.create(
        model="gem",
        messages=[*USER, assistant, {"role": "tool", "tool_call_id": streamed.id, "content": "sunny"}],  # type: ignore[list-item]
        tools=[WEATHER],  # type: ignore[list-item]
    )
    assert final.choices[0].message.content == 'The tool get_weather said {"result": "sunny"}'
    assert ledger(fake)[-1]["body"]["contents"][1]["parts"][0]["thoughtSignature"] == streamed_sig


def test_a_lost_signature_gets_googles_stand_in_and_a_forged_one_geminis_400(
    client: openai.OpenAI, fake: ServerProcess
) -> None:
    first = client.chat.completions.create(model="gem", messages=USER, tools=[WEATHER])  # type: ignore[arg-type,list-item]
    (call,) = first.choices[0].message.tool_calls or []
    result = {"role": "tool", "tool_call_id": call.id, "content": "x"}
    # A client that rebuilds the call from id and function only (as some frameworks do): Gemini gets the
    # documented stand-in and answers rather than refusing the conversation.
    stripped = {
        "role": "assistant",
        "tool_calls": [{"id": call.id, "type": "function", "function": call.function.model_dump()}],
    }
    answer = client.chat.completions.create(model="gem", messages=[*USER, stripped, result], tools=[WEATHER])  # type: ignore[list-item]
    assert answer.choices[0].message.content == 'The tool get_weather said {"result": "x"}'
    assert ledger(fake)[-1]["body"]["contents"][1]["parts"][0]["thoughtSignature"] == "skip_thought_signature_validator"
    # A signature Gemini never issued is its 400, passed on clearly.
    forged = {
        **stripped,
        "tool_calls": [{**stripped["tool_calls"][0], "extra_content": {"google": {"thought_signature": "Zm9yZ2Vk"}}}],
    }  # type: ignore[dict-item]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="gem", messages=[*USER, forged, result], tools=[WEATHER])  # type: ignore[list-item]
    assert "thought_signature" in caught.value.message


def test_usage_records_carry_the_providers_cached_tokens(gw: ServerProcess) -> None:
    headers = {"authorization": f"Bearer {KEY}"}
    before = _row(gw, headers)
    body = {"model": "gem", "messages": USER, "reasoning_effort": "low"}
    answer = httpx.post(gw.base_url + "/v1/chat/completions", json=body, headers=headers, timeout=30).json()
    usage = answer["usage"]
    assert (
        usage["prompt_tokens_details"]["cached_tokens"] == 3
        and usage["completion_tokens_details"]["reasoning_tokens"] == 11
    )

    def recorded() -> dict[str, Any] | None:
        # Waits for this request's own record: the previous test's refused request (no tokens) may be
        # recorded after `before` was read (the usage writer works in the background), so a grown request
        # count alone does not mean this record arrived.
        row = _row(gw, headers)
        return row if row["prompt_tokens"] > before["prompt_tokens"] else None

    row = poll(recorded)
    assert row is not None
    assert row["prompt_tokens"] - before["prompt_tokens"] == usage["prompt_tokens"]
    assert row["completion_tokens"] - before["completion_tokens"] == usage["completion_tokens"]  # thoughts included
    # Priced with the cached rate for the cached part: (3 x 1.0 + 3 x 0.25 + 17 x 4.0) / 1e6 USD, in whole micro-dollars (74 without the cached rate).
    assert row["cost_usd"] - before["cost_usd"] == pytest.approx((3 * 1.0 + 3 * 0.25 + 17 * 4.0) / 1e6, abs=0.5e-6)


def _row(gw: ServerProcess, headers: dict[str, str]) -> dict[str, Any]:
    rows = httpx.get(gw.base_url + "/v1/usage?by=route", headers=headers, timeout=10).json()["data"]
    found = next((r for r in rows if r["value"] == "gem"), None)
    return found or {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}


@pytest.mark.parametrize("stream", [False, True])
def test_503_falls_back_to_another_deployment(client: openai.OpenAI, fake: ServerProcess, stream: bool) -> None:
    start = len(ledger(fake))
    raw = client.chat.completions.with_raw_response.create(model="gem-fallback", messages=USER, stream=stream)  # type: ignore[call-overload]
    assert raw.headers["x-strait-deployment"] == "flash@gem"
    parsed = raw.parse()
    text = (
        "".join(c.choices[0].delta.content or "" for c in parsed if c.choices)
        if stream
        else parsed.choices[0].message.content
    )
    assert text == "Paris is the capital of France"
    models = [r["model"] for r in ledger(fake)[start:]]
    assert models == ["gemini-2.5-flash+503", "gemini-2.5-flash+cached"]


@pytest.mark.parametrize("route", ["gem-safety", "gem-blocked"])
@pytest.mark.parametrize("stream", [False, True])
def test_safety_blocks_are_a_clear_content_filter_error(client: openai.OpenAI, route: str, stream: bool) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        result = client.chat.completions.create(model=route, messages=USER, stream=stream)  # type: ignore[call-overload]
        if stream:
            list(result)
    assert caught.value.code == "content_filter"
    assert "content filter" in caught.value.message and "SAFETY" in caught.value.message


def test_a_block_mid_stream_is_finish_reason_content_filter(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="gem-safety-mid", messages=USER, stream=True))  # type: ignore[arg-type]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "content_filter"


def test_a_cut_stream_raises_in_the_sdk(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(model="gem-cut", messages=USER, stream=True))  # type: ignore[arg-type]


# ---- the anthropic SDK on /v1/messages, the same routes ----


@pytest.fixture
def claude(gw: ServerProcess) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=gw.base_url, api_key=KEY, max_retries=0, timeout=30) as sdk:
        yield sdk


def test_anthropic_create_and_stream(claude: anthropic.Anthropic, fake: ServerProcess) -> None:
    message = claude.messages.create(model="gem", max_tokens=64, system="Be brief.", messages=USER)  # type: ignore[arg-type]
    assert message.content[0].type == "text" and message.content[0].text == "Paris is the capital of France"
    assert message.stop_reason == "end_turn"
    # Cached tokens apart, as Anthropic counts them: 6 prompt words + 2 of the system prompt, half cached.
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens) == (8 - 4, 4)
    body = ledger(fake)[-1]["body"]
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    with claude.messages.stream(model="gem", max_tokens=64, messages=USER) as stream:  # type: ignore[arg-type]
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == "Paris is the capital of France" and final.stop_reason == "end_turn"


def test_anthropic_safety_block_is_a_bad_request(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(model="gem-blocked", max_tokens=64, messages=USER)  # type: ignore[arg-type]
    assert "content filter" in caught.value.message


def test_anthropic_tool_loop_keeps_the_signature_streamed_and_not(
    claude: anthropic.Anthropic, fake: ServerProcess
) -> None:
    tool = {
        "name": "get_weather",
        "description": "Current weather for a place",
        "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]},
    }
    for stream in (False, True):
        if stream:
            with claude.messages.stream(model="gem", max_tokens=64, messages=USER, tools=[tool]) as s:  # type: ignore[arg-type,list-item]
                first = s.get_final_message()
        else:
            first = claude.messages.create(model="gem", max_tokens=64, messages=USER, tools=[tool])  # type: ignore[arg-type,list-item]
        assert first.stop_reason == "tool_use"
        # The call's signature rides in a signed, empty thinking block just before the tool_use block.
        thinking, use = first.content
        assert thinking.type == "thinking" and thinking.thinking == "" and thinking.signature
        assert use.type == "tool_use" and use.input == {"location": "Paris"}
        history = [
            *USER,
            {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]},
        ]
        second = claude.messages.create(model="gem", max_tokens=64, messages=history, tools=[tool])  # type: ignore[arg-type,list-item]
        assert second.content[0].type == "text"
        assert second.content[0].text == 'The tool get_weather said {"result": "sunny"}'
        # The fake answers only a history whose call carries the exact signature it issued.
        sent = ledger(fake)[-1]["body"]["contents"][1]["parts"]
        call = {"name": "get_weather", "args": {"location": "Paris"}}
        assert sent == [{"functionCall": call, "thoughtSignature": thinking.signature}]


# ---- the openai SDK's Responses API (/v1/responses), the same routes ----


def test_responses_create_stream_and_a_tool_loop_keeping_the_signature(
    client: openai.OpenAI, fake: ServerProcess
) -> None:
    response = client.responses.create(model="gem", input="What is the capital of France?")
    assert response.output_text == "Paris is the capital of France"
    assert response.usage is not None and response.usage.input_tokens_details.cached_tokens == 3
    with client.responses.stream(model="gem", input="What is the capital of France?") as stream:
        final = stream.get_final_response()
    assert final.output_text == "Paris is the capital of France"
    tool = {
        "type": "function",
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]},
    }
    for streamed in (False, True):
        if streamed:
            with client.responses.stream(model="gem", input="Weather in Paris?", tools=[tool]) as s:  # type: ignore[list-item]
                first = s.get_final_response()
        else:
            first = client.responses.create(model="gem", input="Weather in Paris?", tools=[tool])  # type: ignore[list-item]
        (call,) = [item for item in first.output if item.type == "function_call"]
        # The item carries the call's signature as chat tool calls do; the SDK keeps it on the item.
        signature = call.model_extra["extra_content"]["google"]["thought_signature"]  # type: ignore[index]
        second = client.responses.create(
            model="gem",
            input=[
                {"role": "user", "content": "Weather in Paris?"},
                call.model_dump(exclude_none=True),  # type: ignore[list-item]
                {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
            ],
            tools=[tool],  # type: ignore[list-item]
        )
        assert second.output_text == 'The tool get_weather said {"result": "sunny"}'
        sent = ledger(fake)[-1]["body"]["contents"][1]["parts"][0]
        assert sent == {
            "functionCall": {"name": "get_weather", "args": {"location": "Paris"}},
            "thoughtSignature": signature,
        }
        # Continued from the stored response instead (previous_response_id): the stored item keeps it too.
        third = client.responses.create(
            model="gem",
            previous_response_id=first.id,
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "rainy"}],
            tools=[tool],  # type: ignore[list-item]
        )
        assert third.output_text == 'The tool get_weather said {"result": "rainy"}'
        assert ledger(fake)[-1]["body"]["contents"][1]["parts"][0]["thoughtSignature"] == signature
