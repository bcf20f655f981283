"""The fake Gemini upstream speaks the documented wire format: its answers have the structure of the
shapes in tests/fixtures/gemini (the same key paths and value types), its streams the same framing."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness.procs import ServerProcess, free_port

FIXTURES = Path(__file__).parent / "fixtures" / "gemini"
KEY = "gemini-test-key-5e1f"
WEATHER = {
    "name": "get_weather",
    "description": "Current weather",
    "parameters": {"type": "OBJECT", "properties": {"location": {"type": "STRING"}}, "required": ["location"]},
}
HELLO = {"contents": [{"role": "user", "parts": [{"text": "What is the capital of France?"}]}]}


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("fake_gemini") / "fake.log"
    argv = [sys.executable, "-m", "tests.harness.fake_gemini", "--port", str(port), "--key", KEY]
    with ServerProcess(argv, port, log_path=log) as proc:
        yield proc.base_url


def paths(value: Any, prefix: str = "") -> set[str]:
    """Every key path with its value's type; list elements merged under `[]`."""
    if isinstance(value, dict):
        out = {f"{prefix}:object"} if prefix else set()
        for k, v in value.items():
            out |= paths(v, f"{prefix}.{k}" if prefix else k)
        return out
    if isinstance(value, list):
        out = {f"{prefix}:array"}
        for item in value:
            out |= paths(item, f"{prefix}[]")
        return out
    kind = "bool" if isinstance(value, bool) else "number" if isinstance(value, int | float) else type(value).__name__
    return {f"{prefix}:{kind}"}


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def post(base: str, model: str, body: dict[str, Any], *, stream: bool = False, key: str = KEY) -> httpx.Response:
    method = "streamGenerateContent?alt=sse" if stream else "generateContent"
    return httpx.post(f"{base}/v1beta/models/{model}:{method}", json=body, headers={"x-goog-api-key": key}, timeout=10)


def test_text_answer_has_the_documented_shape(fake: str) -> None:
    r = post(fake, "gemini-2.5-flash", HELLO)
    assert r.status_code == 200
    assert paths(r.json()) == paths(fixture("generate_content_text.json"))


def test_function_call_with_signature_cached_and_thoughts_tokens(fake: str) -> None:
    body = {
        **HELLO,
        "tools": [{"functionDeclarations": [WEATHER]}],
        "generationConfig": {"thinkingConfig": {"thinkingBudget": 1024}},
    }
    r = post(fake, "gemini-3-flash-preview+cached", body)
    assert r.status_code == 200
    assert paths(r.json()) == paths(fixture("generate_content_function_call.json"))


def test_thought_parts(fake: str) -> None:
    body = {**HELLO, "generationConfig": {"thinkingConfig": {"includeThoughts": True}}}
    r = post(fake, "gemini-2.5-pro", body)
    assert paths(r.json()) == paths(fixture("generate_content_thinking.json"))


def test_stream_framing_and_events(fake: str) -> None:
    r = post(fake, "gemini-2.5-flash", HELLO, stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    recorded = (FIXTURES / "stream_text.sse").read_bytes()
    for raw in (r.content, recorded):
        assert raw.endswith(b"\r\n\r\n") and b"[DONE]" not in raw
    ours = [json.loads(e.removeprefix(b"data: ")) for e in r.content.split(b"\r\n\r\n") if e]
    theirs = [json.loads(e.removeprefix(b"data: ")) for e in recorded.split(b"\r\n\r\n") if e]
    assert len(ours) >= 2
    assert set().union(*map(paths, ours)) == set().union(*map(paths, theirs))
    assert [("finishReason" in e["candidates"][0]) for e in ours] == [False] * (len(ours) - 1) + [True]


@pytest.mark.parametrize(
    ("model", "name"),
    [("gemini-2.5-flash+safety", "candidate_blocked_safety.json"), ("gemini-2.5-flash+blocked", "prompt_blocked.json")],
)
def test_blocks(fake: str, model: str, name: str) -> None:
    r = post(fake, model, HELLO)
    assert r.status_code == 200
    assert paths(r.json()) == paths(fixture(name))


@pytest.mark.parametrize(
    ("model", "status", "name"),
    [
        ("gemini-2.5-flash+429", 429, "error_429.json"),
        ("gemini-2.5-flash+503", 503, "error_503.json"),
        ("gemini-2.5-flash+400", 400, "error_400.json"),
    ],
)
def test_errors(fake: str, model: str, status: int, name: str) -> None:
    r = post(fake, model, HELLO)
    assert r.status_code == status
    assert paths(r.json()) == paths(fixture(name))


def test_bad_key_and_key_in_query_are_refused_as_google_does(fake: str) -> None:
    r = post(fake, "gemini-2.5-flash", HELLO, key="wrong")
    assert r.status_code == 400 and paths(r.json()) == paths(fixture("error_api_key.json"))
    r = httpx.post(f"{fake}/v1beta/models/gemini-2.5-flash:generateContent?key={KEY}", json=HELLO, timeout=10)
    assert r.status_code == 400


def test_lost_signature_is_refused_and_kept_one_accepted(fake: str) -> None:
    body = {**HELLO, "tools": [{"functionDeclarations": [WEATHER]}]}
    part = post(fake, "gemini-3-flash-preview", body).json()["candidates"][0]["content"]["parts"][0]
    result = {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"t": 21}}}]}
    lost = {"role": "model", "parts": [{"functionCall": part["functionCall"]}]}
    r = post(fake, "gemini-3-flash-preview", {**body, "contents": [*HELLO["contents"], lost, result]})
    assert r.status_code == 400 and paths(r.json()) == paths(fixture("error_missing_signature.json"))
    assert "thought_signature" in r.json()["error"]["message"]
    kept = {"role": "model", "parts": [part]}
    r = post(fake, "gemini-3-flash-preview", {**body, "contents": [*HELLO["contents"], kept, result]})
    assert r.status_code == 200, r.text


def test_schema_keywords_gemini_lacks_are_refused(fake: str) -> None:
    decl = {**WEATHER, "parameters": {**WEATHER["parameters"], "additionalProperties": False}}
    r = post(fake, "gemini-2.5-flash", {**HELLO, "tools": [{"functionDeclarations": [decl]}]})
    assert r.status_code == 400 and "additionalProperties" in r.json()["error"]["message"]
