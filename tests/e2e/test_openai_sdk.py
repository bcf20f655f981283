"""Strait as a drop-in base_url for the official openai SDK, in front of a fake OpenAI upstream."""

from __future__ import annotations

import base64
import json
import struct
import time
from typing import Any

import httpx
import msgspec
import openai
import pytest

from tests.e2e.conftest import ALPHA_KEY, BACKEND_SECRET, BETA_KEY, MAX_BODY, Ledger
from tests.harness.procs import ServerProcess
from tests.harness.sse import parse_sse

USER = [{"role": "user", "content": "Say hello"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]},
    },
}


def _last(ledger: Ledger) -> dict[str, Any]:
    return ledger.records()[-1]


def test_chat_non_streaming(client: openai.OpenAI, ledger: Ledger) -> None:
    raw = client.chat.completions.with_raw_response.create(model="gpt-fake", messages=USER, max_tokens=7)
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 7
    assert raw.headers["x-strait-deployment"] == "fake-model@fake"
    assert raw.headers["x-strait-route"] == "gpt-fake"
    assert raw.headers["x-request-id"]
    seen = _last(ledger)
    assert seen["body"]["model"] == "fake-model"
    # The upstream sees the backend's own key, never the client's.
    assert seen["headers"]["authorization"] == f"Bearer {BACKEND_SECRET}"
    assert ALPHA_KEY not in json.dumps(seen)


def test_stream_without_usage_strips_the_usage_chunk(client: openai.OpenAI, ledger: Ledger) -> None:
    chunks = list(client.chat.completions.create(model="gpt-fake", messages=USER, stream=True, max_tokens=9))
    assert chunks, "no chunks"
    assert all(c.choices for c in chunks), "a usage-only chunk reached a client that did not ask for it"
    assert chunks[-1].choices[0].finish_reason == "length"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert len(text.split()) == 9
    # Strait asked the upstream for usage anyway, for accounting.
    assert _last(ledger)["body"]["stream_options"] == {"include_usage": True}


def test_stream_with_include_usage_ends_with_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="gpt-fake", messages=USER, stream=True, max_tokens=5, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])


def test_tool_calls_streamed_and_not_agree(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="gpt-fake", messages=USER, tools=[WEATHER_TOOL])  # type: ignore[list-item]
    call = whole.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert whole.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    name, args, finish = "", "", None
    for chunk in client.chat.completions.create(model="gpt-fake", messages=USER, tools=[WEATHER_TOOL], stream=True):  # type: ignore[list-item]
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                assert delta.index == 0
                if delta.function and delta.function.name:
                    name += delta.function.name
                if delta.function and delta.function.arguments:
                    args += delta.function.arguments
            finish = choice.finish_reason or finish
    assert (name, json.loads(args), finish) == ("get_weather", json.loads(call.function.arguments), "tool_calls")  # type: ignore[union-attr]


def test_embeddings_float_and_base64(client: openai.OpenAI, direct: openai.OpenAI) -> None:
    via_default = client.embeddings.create(model="embed", input=["alpha", "beta"])  # SDK asks for base64
    via_float = client.embeddings.create(model="embed", input=["alpha", "beta"], encoding_format="float")
    straight = direct.embeddings.create(
        model="text-embedding-3-small", input=["alpha", "beta"], encoding_format="float"
    )
    assert [d.embedding for d in via_float.data] == [d.embedding for d in straight.data]
    for a, b in zip(via_default.data, via_float.data, strict=True):
        assert a.embedding == pytest.approx(b.embedding, rel=1e-6)
    tokens = client.embeddings.create(model="embed", input=[[1, 2, 3]], encoding_format="float")
    assert len(tokens.data) == 1


def test_models_list_and_retrieve_follow_the_tenant(gateway: ServerProcess, client: openai.OpenAI) -> None:
    assert sorted(m.id for m in client.models.list()) == [
        "embed",
        "embed-cl100k",
        "fallback-chat",
        "gpt-fake",
        "sim-chat",
    ]
    assert client.models.retrieve("gpt-fake").id == "gpt-fake"
    beta = openai.OpenAI(base_url=gateway.base_url + "/v1", api_key=BETA_KEY, max_retries=0)
    assert [m.id for m in beta.models.list()] == ["sim-chat"]
    with pytest.raises(openai.NotFoundError):
        beta.models.retrieve("gpt-fake")


def test_unknown_model_is_404_with_no_upstream_call(client: openai.OpenAI, ledger: Ledger) -> None:
    before = ledger.count()
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-route", messages=USER)
    assert info.value.code == "model_not_found"
    assert ledger.count() == before


def test_route_outside_the_tenant_is_404_with_no_upstream_call(gateway: ServerProcess, ledger: Ledger) -> None:
    beta = openai.OpenAI(base_url=gateway.base_url + "/v1", api_key=BETA_KEY, max_retries=0)
    before = ledger.count()
    with pytest.raises(openai.NotFoundError):
        beta.chat.completions.create(model="gpt-fake", messages=USER)
    assert ledger.count() == before
    ok = beta.chat.completions.create(model="sim-chat", messages=USER)
    assert ok.choices[0].message.content


def test_wrong_and_missing_keys_are_401(gateway: ServerProcess) -> None:
    wrong = openai.OpenAI(base_url=gateway.base_url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.chat.completions.create(model="gpt-fake", messages=USER)
    assert "sk-wrong" not in str(info.value)
    r = httpx.post(gateway.base_url + "/v1/chat/completions", json={"model": "gpt-fake", "messages": USER})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"


def test_upstream_429_reaches_the_sdk_with_retry_after(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(
            model="gpt-fake", messages=USER, extra_body={"fake": {"status": 429, "retry_after": "7"}}
        )
    assert info.value.response.headers["retry-after"] == "7"
    assert info.value.code == "rate_limit_exceeded"


def test_upstream_context_overflow_is_a_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="gpt-fake", messages=USER, extra_body={"fake": {"status": 400, "error_style": "llamacpp"}}
        )
    assert isinstance(info.value.body, dict)
    assert set(info.value.body) == {"message", "type", "param", "code"}


def test_upstream_500_is_an_internal_server_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="gpt-fake", messages=USER, extra_body={"fake": {"status": 500}})


def test_oversized_body_is_413_api_status_error(client: openai.OpenAI, ledger: Ledger) -> None:
    before = ledger.count()
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "x" * (MAX_BODY + 10)}])
    assert info.value.status_code == 413
    assert ledger.count() == before


def test_fallback_skips_an_unreachable_backend(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="fallback-chat", messages=USER, max_tokens=3)
    assert raw.headers["x-strait-deployment"] == "fake-model@fake"
    assert raw.parse().choices[0].message.content


def test_unknown_body_fields_pass_through(client: openai.OpenAI, ledger: Ledger) -> None:
    client.chat.completions.create(model="gpt-fake", messages=USER, extra_body={"top_k": 3, "repetition_penalty": 1.1})
    body = _last(ledger)["body"]
    assert body["top_k"] == 3 and body["repetition_penalty"] == 1.1


def test_request_id_is_echoed_when_well_formed(gateway: ServerProcess) -> None:
    url = gateway.base_url + "/v1/chat/completions"
    auth = {"authorization": f"Bearer {ALPHA_KEY}"}
    body = {"model": "sim-chat", "messages": USER}
    r = httpx.post(url, json=body, headers={**auth, "x-request-id": "trace-123.abc"})
    assert r.headers["x-request-id"] == "trace-123.abc"
    r = httpx.post(url, json=body, headers={**auth, "x-request-id": "bad id\twith spaces"})
    assert r.headers["x-request-id"].startswith("req_")
    assert httpx.get(gateway.base_url + "/nope").headers["x-request-id"].startswith("req_")


def _raw_post(gateway: ServerProcess, body: bytes) -> httpx.Response:
    return httpx.post(
        gateway.base_url + "/v1/chat/completions",
        content=body,
        headers={"authorization": f"Bearer {ALPHA_KEY}", "content-type": "application/json"},
    )


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "gpt-fake", "messages": [',
        b'{"model": "gpt-fake", "messages": "hello"}',
        b'{"model": "gpt-fake"}',
        b'{"model": 3, "messages": []}',
        b'{"model": "gpt-fake", "messages": [{"role": "user", "content": "\\udc00 lone"}]}',
        b"\xff\xfe not utf-8",
        b'{"model": "gpt-fake", "messages": [{"role": "user", "content": "x"}], "n": -1}',
    ],
)
def test_bad_input_is_a_clear_4xx_without_upstream_call(gateway: ServerProcess, ledger: Ledger, body: bytes) -> None:
    before = ledger.count()
    r = _raw_post(gateway, body)
    assert r.status_code == 400
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in r.text
    assert ledger.count() == before
    assert httpx.get(gateway.base_url + "/healthz").status_code == 200


def test_byte_equivalent_content_to_a_direct_call(gateway: ServerProcess, fake_upstream: ServerProcess) -> None:
    body = {"model": "fake-model", "messages": USER, "seed": 11, "max_tokens": 6}
    direct = httpx.post(fake_upstream.base_url + "/v1/chat/completions", json=body)
    via = httpx.post(
        gateway.base_url + "/v1/chat/completions",
        json={**body, "model": "gpt-fake"},
        headers={"authorization": f"Bearer {ALPHA_KEY}"},
    )
    assert via.status_code == direct.status_code == 200
    assert msgspec.json.decode(via.content) == msgspec.json.decode(direct.content)

    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    direct_s = httpx.post(fake_upstream.base_url + "/v1/chat/completions", json=stream)
    via_s = httpx.post(
        gateway.base_url + "/v1/chat/completions",
        json={**stream, "model": "gpt-fake"},
        headers={"authorization": f"Bearer {ALPHA_KEY}"},
    )
    assert via_s.headers["content-type"].startswith("text/event-stream")
    assert parse_sse(via_s.content) == parse_sse(direct_s.content)


def test_midstream_upstream_failure_raises_in_the_sdk_without_done(
    client: openai.OpenAI, gateway: ServerProcess
) -> None:
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(
            model="gpt-fake", messages=USER, stream=True, extra_body={"fake": {"tokens": 40, "fail_after_chunks": 2}}
        ):
            pass
    raw = httpx.post(
        gateway.base_url + "/v1/chat/completions",
        json={"model": "gpt-fake", "messages": USER, "stream": True, "fake": {"tokens": 40, "fail_after_chunks": 2}},
        headers={"authorization": f"Bearer {ALPHA_KEY}"},
    )
    events = parse_sse(raw.content)
    assert events[-1] != "[DONE]" and "error" in json.loads(events[-1])


def test_upstream_error_event_midstream_is_forwarded(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(
            model="gpt-fake", messages=USER, stream=True, extra_body={"fake": {"tokens": 30, "midstream_error": 2}}
        ):
            pass


def test_client_disconnect_closes_the_upstream_stream(gateway: ServerProcess, ledger: Ledger) -> None:
    body = {"model": "gpt-fake", "messages": USER, "stream": True, "fake": {"tokens": 400, "chunk_delay_ms": 20}}
    with httpx.stream(
        "POST", gateway.base_url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {ALPHA_KEY}"}
    ) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert any(line.startswith("data: ") for line in got)
        n = _last(ledger)["n"]
    deadline = time.monotonic() + 10
    record: dict[str, Any] = {}
    while time.monotonic() < deadline:
        record = next(rec for rec in ledger.records() if rec["n"] == n)
        if record["ended_at"] is not None:
            break
        time.sleep(0.05)  # polling the fake's ledger, not sleeping as synchronisation
    assert record["client_disconnected"] is True
    assert record["completion_tokens_generated"] < 400


def test_simulated_backend_streams_with_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="sim-chat", messages=USER, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 12


def test_simulated_embeddings_base64_decode(client: openai.OpenAI) -> None:
    r = httpx.post(
        client.base_url.join("embeddings").__str__(),
        json={"model": "sim-chat", "input": "x", "encoding_format": "base64"},
        headers={"authorization": f"Bearer {ALPHA_KEY}"},
    )
    vec = r.json()["data"][0]["embedding"]
    floats = struct.unpack(f"<{len(base64.b64decode(vec)) // 4}f", base64.b64decode(vec))
    assert sum(f * f for f in floats) == pytest.approx(1.0, rel=1e-4)


def test_legacy_completions(client: openai.OpenAI) -> None:
    out = client.completions.create(model="gpt-fake", prompt="Once upon", max_tokens=4)
    assert out.object == "text_completion" and out.choices[0].text


def test_metrics_count_requests(gateway: ServerProcess, client: openai.OpenAI) -> None:
    client.chat.completions.create(model="sim-chat", messages=USER)
    text = httpx.get(gateway.base_url + "/metrics").text
    assert 'strait_requests_total{route="sim-chat",status="200"}' in text
    assert "strait_upstream_attempts_total" in text


def test_usage_chunk_is_added_when_the_upstream_sends_none(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="gpt-fake",
            messages=USER,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"fake": {"usage": "none", "tokens": 9, "vocab": "cl100k"}},
        )
    )
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    # One cl100k token per word from this fake vocabulary: the estimate is exact.
    assert last.usage.completion_tokens == 9
    assert last.usage.prompt_tokens > 0 and last.id == chunks[0].id
