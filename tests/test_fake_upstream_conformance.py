"""The fake upstream speaks the OpenAI wire format: structural checks against tests/fixtures/openai and the openai SDK."""

from __future__ import annotations

import base64
import json
import struct
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.harness import fake_upstream as fu
from tests.harness.procs import ServerProcess, free_port
from tests.harness.sse import SSEParser, json_payloads, parse_chunks, parse_events, parse_sse

FIXTURES = Path(__file__).parent / "fixtures" / "openai"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER_TOOL = {
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
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string"}, "utc_offset": {"type": "integer"}},
        },
    },
}


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures and helpers.


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("fake") / "fake_upstream.log"
    argv = [sys.executable, "-m", "tests.harness.fake_upstream", "--port", str(port)]
    with ServerProcess(argv, port, ready_path="/healthz", log_path=log) as proc:
        yield proc.base_url


@pytest.fixture(scope="module")
def http(fake: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake, timeout=10.0) as client:
        yield client


@pytest.fixture(scope="module")
def sdk(fake: str) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=fake + "/v1", api_key="sk-test-key-0123456789", max_retries=0, timeout=10.0)
    yield client
    client.close()


def load_json(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def load_sse(name: str) -> tuple[bytes, list[Any]]:
    raw = (FIXTURES / name).read_bytes()
    return raw, json_payloads(parse_sse(raw))


def assert_same_shape(actual: Any, expected: Any, path: str = "$") -> None:
    """Same keys at every level and same value types; values themselves are free.  Lists: every element of `actual`
    has the shape of the first element of `expected` (an empty expected list requires an empty actual one)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{path}: expected object, got {type(actual).__name__}"
        assert set(actual) == set(expected), f"{path}: keys {sorted(actual)} != {sorted(expected)}"
        for k in expected:
            assert_same_shape(actual[k], expected[k], f"{path}.{k}")
    elif isinstance(expected, list):
        assert isinstance(actual, list), f"{path}: expected array, got {type(actual).__name__}"
        if not expected:
            assert actual == [], f"{path}: expected empty array"
        for i, item in enumerate(actual):
            assert_same_shape(item, expected[0], f"{path}[{i}]")
    elif expected is None:
        assert actual is None, f"{path}: expected null, got {actual!r}"
    else:
        assert type(actual) is type(expected), f"{path}: {type(actual).__name__} != {type(expected).__name__}"


def chunk_kind(chunk: Any) -> str:
    if chunk == "[DONE]":
        return "done"
    if "error" in chunk:
        return "error"
    if chunk["choices"] == []:
        return "usage"
    choice = chunk["choices"][0]
    if choice["finish_reason"] is not None:
        return "finish"
    if "role" in choice["delta"]:
        return "role"
    return "delta"


def kind_sequence(chunks: list[Any]) -> list[str]:
    """Kinds with consecutive repeats collapsed, e.g. ['role', 'delta', 'finish', 'usage', 'done']."""
    out: list[str] = []
    for c in chunks:
        k = chunk_kind(c)
        if not out or out[-1] != k:
            out.append(k)
    return out


def first_of(chunks: list[Any], kind: str) -> Any:
    return next(c for c in chunks if chunk_kind(c) == kind)


def body(**kw: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": MESSAGES, **kw}


def post_stream(http: httpx.Client, path: str, payload: dict[str, Any], **kw: Any) -> tuple[httpx.Response, bytes]:
    with http.stream("POST", path, json=payload, **kw) as r:
        raw = r.read()
    return r, raw


def ledger(http: httpx.Client) -> list[dict[str, Any]]:
    r = http.get("/_ledger")
    assert r.status_code == 200
    return r.json()


def record_for(http: httpx.Client, test_id: str) -> dict[str, Any]:
    recs = [r for r in ledger(http) if r["headers"].get("x-test-id") == test_id]
    assert len(recs) == 1, f"expected one ledger record for {test_id}, got {len(recs)}"
    return recs[0]


def wait_record(http: httpx.Client, test_id: str, pred: Any, timeout: float = 5.0) -> dict[str, Any]:
    """Poll the ledger until the record for `test_id` satisfies `pred` (polling with a deadline, not sleeping)."""
    deadline = time.monotonic() + timeout
    rec: dict[str, Any] = {}
    while time.monotonic() < deadline:
        recs = [r for r in ledger(http) if r["headers"].get("x-test-id") == test_id]
        if recs and pred(recs[0]):
            return recs[0]
        rec = recs[0] if recs else {}
    raise AssertionError(f"ledger record for {test_id} never satisfied the condition: {rec}")


def tid() -> dict[str, str]:
    return {"X-Test-Id": uuid.uuid4().hex}


def raw_framing_ok(raw: bytes) -> bool:
    payloads = parse_sse(raw)
    return raw == b"".join(b"data: " + p.encode() + b"\n\n" for p in payloads)


# ---------------------------------------------------------------------------------------------------------------------
# Fixture files themselves (so the reference cannot rot silently).


def test_fixture_files_have_the_documented_shapes() -> None:
    raw, chunks = load_sse("chat_completion_stream_usage.sse")
    assert raw_framing_ok(raw)
    assert kind_sequence(chunks) == ["role", "delta", "finish", "usage", "done"]
    assert all("usage" in c and c["usage"] is None for c in chunks[:-2])
    raw, chunks = load_sse("chat_completion_stream_tool_calls.sse")
    assert raw_framing_ok(raw)
    assert kind_sequence(chunks) == ["role", "delta", "finish", "usage", "done"]
    args = "".join(c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"] for c in chunks[:-3])
    assert json.loads(args) == {"location": "Paris", "unit": "celsius"}
    floats = load_json("embeddings_float.json")["data"][0]["embedding"]
    b64 = load_json("embeddings_base64.json")["data"][0]["embedding"]
    assert struct.pack(f"<{len(floats)}f", *floats) == base64.b64decode(b64)
    assert load_json("error_429.headers.json")["status"] == 429


# ---------------------------------------------------------------------------------------------------------------------
# Structural conformance.


def test_health_and_models(http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    r = http.get("/v1/models")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert_same_shape(r.json(), load_json("models.json"))
    assert {m["id"] for m in r.json()["data"]} >= {"gpt-4o-mini"}
    assert http.get("/v1/models/gpt-4o-mini").json()["object"] == "model"
    missing = http.get("/v1/models/nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


def test_chat_completion_matches_fixture(http: httpx.Client) -> None:
    headers = tid()
    r = http.post("/v1/chat/completions", json=body(), headers=headers)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers["x-request-id"].startswith("req_")
    data = r.json()
    assert_same_shape(data, load_json("chat_completion.json"))
    assert data["id"].startswith("chatcmpl-")
    assert data["object"] == "chat.completion"
    assert data["model"] == "gpt-4o-mini"
    rec = record_for(http, headers["X-Test-Id"])
    content = data["choices"][0]["message"]["content"]
    assert content.startswith(f"<<req:{rec['n']}>>")
    usage = data["usage"]
    assert usage["completion_tokens"] == 20
    assert usage["prompt_tokens"] == fu.count_prompt_tokens(MESSAGES) > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert data["choices"][0]["finish_reason"] == "stop"
    assert rec["finished"] and not rec["client_disconnected"]
    assert rec["completion_tokens_generated"] == 20
    assert rec["status"] == 200


def test_tokenizer_is_reported(http: httpx.Client) -> None:
    assert http.get("/_info").json()["tokenizer"] == fu.TOKENIZER


def test_n_max_tokens_and_stop(http: httpx.Client) -> None:
    data = http.post("/v1/chat/completions", json=body(n=3, max_tokens=5)).json()
    assert [c["index"] for c in data["choices"]] == [0, 1, 2]
    assert {c["finish_reason"] for c in data["choices"]} == {"length"}
    assert data["usage"]["completion_tokens"] == 15
    assert len({c["message"]["content"] for c in data["choices"]}) == 3  # choices differ
    data = http.post("/v1/chat/completions", json=body(max_completion_tokens=4, fake={"tokens": 50})).json()
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 4
    data = http.post("/v1/chat/completions", json=body(max_tokens=30, fake={"tokens": 10})).json()
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["usage"]["completion_tokens"] == 10
    plain = body(fake={"tokens": 10, "marker": False})
    data = http.post("/v1/chat/completions", json=plain).json()
    assert data["choices"][0]["message"]["content"] == " ".join(fu.WORDS[:10])
    stopped = http.post("/v1/chat/completions", json={**plain, "stop": [" delta", "zzz"]}).json()
    assert stopped["choices"][0]["message"]["content"] == "alpha bravo charlie"
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["usage"]["completion_tokens"] == 3
    _, raw = post_stream(http, "/v1/chat/completions", {**plain, "stop": " delta", "stream": True})
    chunks = json_payloads(parse_sse(raw))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if chunk_kind(c) == "delta")
    assert text == "alpha bravo charlie"


def test_stream_with_usage_matches_fixture(http: httpx.Client) -> None:
    headers = tid()
    payload = body(stream=True, stream_options={"include_usage": True})
    r, raw = post_stream(http, "/v1/chat/completions", payload, headers=headers)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert raw_framing_ok(raw)
    chunks = json_payloads(parse_sse(raw))
    fx_raw, fx = load_sse("chat_completion_stream_usage.sse")
    assert raw_framing_ok(fx_raw)
    assert kind_sequence(chunks) == kind_sequence(fx) == ["role", "delta", "finish", "usage", "done"]
    for kind in ("role", "delta", "finish", "usage"):
        expected = first_of(fx, kind)
        for c in chunks:
            if chunk_kind(c) == kind:
                assert_same_shape(c, expected, f"{kind}-chunk")
    assert first_of(chunks, "role")["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert first_of(chunks, "finish")["choices"][0]["delta"] == {}
    assert all(c["usage"] is None for c in chunks[:-2])
    assert chunks[-1] == "[DONE]"
    assert len({c["id"] for c in chunks[:-1]}) == 1
    usage = chunks[-2]["usage"]
    assert usage["completion_tokens"] == 20
    content = "".join(c["choices"][0]["delta"]["content"] for c in chunks if chunk_kind(c) == "delta")
    rec = record_for(http, headers["X-Test-Id"])
    assert content.startswith(f"<<req:{rec['n']}>>")
    assert len(content.split(" ")) == 20  # marker + 19 words: one token each
    assert sum(1 for c in chunks if chunk_kind(c) == "delta") == 4  # 5 tokens per delta
    assert rec["stream"] and rec["finished"] and rec["completion_tokens_generated"] == 20


def test_stream_without_include_usage_has_no_usage_key(http: httpx.Client) -> None:
    _, raw = post_stream(http, "/v1/chat/completions", body(stream=True, fake={"tokens": 7, "chunk_tokens": 2}))
    chunks = json_payloads(parse_sse(raw))
    assert kind_sequence(chunks) == ["role", "delta", "finish", "done"]
    assert all("usage" not in c for c in chunks[:-1])
    assert sum(1 for c in chunks if chunk_kind(c) == "delta") == 4


def test_stream_usage_modes(http: httpx.Client) -> None:
    so = {"include_usage": True}
    _, raw = post_stream(
        http, "/v1/chat/completions", body(stream=True, stream_options=so, fake={"usage": "final-with-choices"})
    )
    chunks = json_payloads(parse_sse(raw))
    assert kind_sequence(chunks) == ["role", "delta", "finish", "done"]
    finish = first_of(chunks, "finish")
    assert finish["usage"]["completion_tokens"] == 20
    assert_same_shape(finish["usage"], load_json("chat_completion.json")["usage"])
    _, raw = post_stream(http, "/v1/chat/completions", body(stream=True, stream_options=so, fake={"usage": "none"}))
    chunks = json_payloads(parse_sse(raw))
    assert kind_sequence(chunks) == ["role", "delta", "finish", "done"]
    assert all(c["usage"] is None for c in chunks[:-1])


def test_stream_n_choices(http: httpx.Client) -> None:
    _, raw = post_stream(http, "/v1/chat/completions", body(stream=True, n=2, fake={"tokens": 6}))
    chunks = json_payloads(parse_sse(raw))[:-1]
    by_index: dict[int, str] = {0: "", 1: ""}
    finishes = []
    for c in chunks:
        ch = c["choices"][0]
        by_index[ch["index"]] += ch["delta"].get("content") or ""
        if ch["finish_reason"]:
            finishes.append(ch["index"])
    assert sorted(finishes) == [0, 1]
    assert by_index[0] != by_index[1]
    assert all(len(t.split(" ")) == 6 for t in by_index.values())


def test_tool_call_non_stream(http: httpx.Client) -> None:
    data = http.post("/v1/chat/completions", json=body(tools=[TIME_TOOL, WEATHER_TOOL])).json()
    choice = data["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    msg = choice["message"]
    assert msg["content"] is None and msg["refusal"] is None
    (call,) = msg["tool_calls"]
    assert set(call) == {"id", "type", "function"}
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] == "get_time"
    assert json.loads(call["function"]["arguments"]) == {"timezone": "Paris", "utc_offset": 1}
    named = {"type": "function", "function": {"name": "get_weather"}}
    data = http.post("/v1/chat/completions", json=body(tools=[TIME_TOOL, WEATHER_TOOL], tool_choice=named)).json()
    call = data["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"location": "Paris", "unit": "celsius"}
    data = http.post("/v1/chat/completions", json=body(tools=[WEATHER_TOOL], tool_choice="none")).json()
    assert data["choices"][0]["finish_reason"] == "stop"
    assert "tool_calls" not in data["choices"][0]["message"]
    assert isinstance(data["choices"][0]["message"]["content"], str)


def test_tool_call_stream_matches_fixture(http: httpx.Client) -> None:
    payload = body(tools=[WEATHER_TOOL], stream=True, stream_options={"include_usage": True})
    _, raw = post_stream(http, "/v1/chat/completions", payload)
    assert raw_framing_ok(raw)
    chunks = json_payloads(parse_sse(raw))
    _, fx = load_sse("chat_completion_stream_tool_calls.sse")
    assert kind_sequence(chunks) == kind_sequence(fx) == ["role", "delta", "finish", "usage", "done"]
    for kind in ("role", "delta", "finish", "usage"):
        expected = first_of(fx, kind)
        for c in chunks:
            if chunk_kind(c) == kind:
                assert_same_shape(c, expected, f"{kind}-chunk")
    first = first_of(chunks, "role")["choices"][0]["delta"]
    call = first["tool_calls"][0]
    assert set(call) == {"index", "id", "type", "function"}
    assert call["function"] == {"name": "get_weather", "arguments": ""}
    assert first["content"] is None
    deltas = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks if chunk_kind(c) == "delta"]
    assert len(deltas) > 1
    assert all(set(d) == {"index", "function"} and set(d["function"]) == {"arguments"} for d in deltas)
    assert json.loads("".join(d["function"]["arguments"] for d in deltas)) == {"location": "Paris", "unit": "celsius"}
    assert first_of(chunks, "finish")["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-2]["usage"]["completion_tokens"] == len(deltas)


def test_legacy_completions(http: httpx.Client) -> None:
    data = http.post("/v1/completions", json={"model": "gpt-3.5-turbo-instruct", "prompt": "Say hi", "max_tokens": 3})
    assert data.status_code == 200
    d = data.json()
    assert d["object"] == "text_completion" and d["id"].startswith("cmpl-")
    assert set(d["choices"][0]) == {"text", "index", "logprobs", "finish_reason"}
    assert d["choices"][0]["finish_reason"] == "length"
    assert set(d["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert d["usage"]["completion_tokens"] == 3
    payload = {"model": "m", "prompt": ["a", "b"], "stream": True, "stream_options": {"include_usage": True}}
    _, raw = post_stream(http, "/v1/completions", {**payload, "fake": {"tokens": 6}})
    assert raw_framing_ok(raw)
    chunks = json_payloads(parse_sse(raw))
    assert chunks[-1] == "[DONE]"
    assert chunks[-2]["choices"] == [] and chunks[-2]["usage"]["completion_tokens"] == 12
    assert all(c["object"] == "text_completion" and c["usage"] is None for c in chunks[:-2])
    finishes = [c["choices"][0] for c in chunks[:-2] if c["choices"][0]["finish_reason"]]
    assert [f["index"] for f in finishes] == [0, 1] and all(f["text"] == "" for f in finishes)
    bad = http.post("/v1/completions", json={"model": "m"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"


def test_embeddings_float_and_base64(http: httpx.Client) -> None:
    inp = ["hello world", "goodbye"]
    f = http.post("/v1/embeddings", json={"model": "text-embedding-3-small", "input": inp, "encoding_format": "float"})
    b = http.post("/v1/embeddings", json={"model": "text-embedding-3-small", "input": inp, "encoding_format": "base64"})
    assert f.status_code == b.status_code == 200
    fj, bj = f.json(), b.json()
    assert_same_shape(fj, load_json("embeddings_float.json"))
    assert_same_shape(bj, load_json("embeddings_base64.json"))
    assert [d["index"] for d in fj["data"]] == [0, 1]
    for fd, bd in zip(fj["data"], bj["data"], strict=True):
        decoded = struct.unpack("<16f", base64.b64decode(bd["embedding"]))
        assert list(decoded) == fd["embedding"]
        assert abs(sum(x * x for x in decoded) - 1.0) < 1e-5
    assert fj["data"][0]["embedding"] != fj["data"][1]["embedding"]
    assert fj["usage"]["prompt_tokens"] == fj["usage"]["total_tokens"] > 0
    again = http.post("/v1/embeddings", json={"model": "m", "input": "hello world"}).json()
    assert again["data"][0]["embedding"] == fj["data"][0]["embedding"]  # deterministic, float by default
    tokens = http.post("/v1/embeddings", json={"model": "m", "input": [1, 2, 3]}).json()
    assert len(tokens["data"]) == 1 and tokens["usage"]["prompt_tokens"] == 3
    lists = http.post("/v1/embeddings", json={"model": "m", "input": [[1, 2], [3]]}).json()
    assert len(lists["data"]) == 2 and lists["usage"]["prompt_tokens"] == 3
    assert http.post("/v1/embeddings", json={"model": "m", "input": []}).status_code == 400


ERROR_KEYS = set(load_json("error_429.json")["error"])


@pytest.mark.parametrize(
    ("status", "etype", "code"),
    [
        (429, "requests", "rate_limit_exceeded"),
        (400, "invalid_request_error", "context_length_exceeded"),
        (401, "invalid_request_error", "invalid_api_key"),
        (500, "server_error", None),
        (502, "server_error", None),
        (503, "server_error", None),
    ],
)
def test_injected_error_envelopes(http: httpx.Client, status: int, etype: str, code: str | None) -> None:
    r = http.post("/v1/chat/completions", json=body(), headers={"x-fake-status": str(status)})
    assert r.status_code == status
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == ERROR_KEYS
    assert err["type"] == etype and err["code"] == code
    assert isinstance(err["message"], str) and err["message"]
    via_body = http.post("/v1/chat/completions", json=body(fake={"status": status}))
    assert via_body.status_code == status and via_body.json() == r.json()


def test_429_headers_match_fixture(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json=body(fake={"status": 429, "retry_after": "2"}))
    expected = load_json("error_429.headers.json")
    assert r.status_code == expected["status"]
    for name in expected["headers"]:
        assert name in r.headers, f"missing header {name}"
    assert r.headers["retry-after"] == "2"
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    assert_same_shape(r.json(), load_json("error_429.json"))
    assert http.post("/v1/chat/completions", json=body(fake={"status": 429})).headers["retry-after"] == "1"


def test_context_length_error_matches_fixture(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json=body(fake={"status": 400}))
    assert_same_shape(r.json(), load_json("error_context_length.json"))
    err = r.json()["error"]
    assert err["param"] == "messages"
    assert err["message"].startswith("This model's maximum context length is 8192 tokens.")
    big = [{"role": "user", "content": "word " * 200}]
    r = http.post("/v1/chat/completions", json=body(messages=big, fake={"context_window": 50}))
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert f"resulted in {fu.count_prompt_tokens(big)} tokens" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("refusal", "fixture"), [("azure", "error_content_filter.json"), ("openai", "error_invalid_prompt.json")]
)
def test_refusal_errors_match_fixtures(http: httpx.Client, refusal: str, fixture: str) -> None:
    """Content-policy refusals in the providers' recorded shapes (fixtures from public error reports)."""
    r = http.post("/v1/chat/completions", json=body(fake={"refusal": refusal}))
    assert r.status_code == 400
    expected = load_json(fixture)
    assert_same_shape(r.json(), expected)
    assert r.json()["error"]["code"] == expected["error"]["code"]


def test_401_masks_the_key(http: httpx.Client) -> None:
    key = "sk-secret-abcdefghijklmnop-WXYZ"
    r = http.post(
        "/v1/chat/completions", json=body(), headers={"authorization": f"Bearer {key}", "x-fake-status": "401"}
    )
    assert r.status_code == 401
    assert key not in r.text and "WXYZ" in r.json()["error"]["message"]


def test_error_styles(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json=body(fake={"status": 400, "error_style": "llamacpp"}))
    err = r.json()["error"]
    assert r.status_code == 400
    assert err["code"] == 400 and "param" not in err
    assert err["type"] == "exceed_context_size_error" and "exceeds the available context size" in err["message"]
    r = http.post(
        "/v1/chat/completions", json=body(), headers={"x-fake-status": "401", "x-fake-error-style": "llamacpp"}
    )
    assert r.json() == {"error": {"code": 401, "message": "Invalid API Key", "type": "authentication_error"}}
    r = http.post("/v1/chat/completions", json=body(fake={"status": 400, "error_style": "vllm"}))
    err = r.json()["error"]
    assert err["type"] == "BadRequestError" and err["code"] == 400 and "param" in err
    assert "maximum context length" in err["message"]


def test_leaky_upstream_directives(http: httpx.Client) -> None:
    """What some providers do and the gateway must not pass on: echo the key, name internal hosts, and
    send their account's rate-limit headers."""
    key = "sk-bad-provider-key-0001"
    r = http.post(
        "/v1/chat/completions",
        json=body(fake={"deny_key_prefix": "sk-bad"}),
        headers={"authorization": f"Bearer {key}"},
    )
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert key in r.json()["error"]["message"]
    r = http.post(
        "/v1/chat/completions", json=body(fake={"deny_key_prefix": "sk-bad"}), headers={"authorization": "Bearer sk-ok"}
    )
    assert r.status_code == 200
    r = http.post("/v1/chat/completions", json=body(fake={"status": 500, "error_message": "OOM on gpu-7.internal"}))
    assert r.status_code == 500 and r.json()["error"]["message"] == "OOM on gpu-7.internal"
    assert set(r.json()["error"]) == ERROR_KEYS
    r = http.post("/v1/chat/completions", json=body(fake={"ratelimit_headers": True}))
    assert r.status_code == 200 and r.headers["x-ratelimit-remaining-requests"] == "0"
    with http.stream("POST", "/v1/chat/completions", json=body(stream=True, fake={"ratelimit_headers": True})) as s:
        assert s.headers["x-ratelimit-limit-tokens"] == "150000"
        s.read()
    r = http.post(
        "/v1/chat/completions",
        json=body(stream=True, fake={"midstream_error": 1, "error_message": "died at /opt/x.py"}),
    )
    assert '"message":"died at /opt/x.py"' in r.text


def test_bad_input(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert set(r.json()["error"]) == ERROR_KEYS and r.json()["error"]["type"] == "invalid_request_error"
    r = http.post("/v1/chat/completions", json={"model": "m"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = http.post("/v1/chat/completions", json={"messages": MESSAGES})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = http.post("/v1/chat/completions", json=body(fake={"no_such_directive": 1}))
    assert r.status_code == 400 and "no_such_directive" in r.json()["error"]["message"]
    r = http.post("/v1/chat/completions", json=body(), headers={"x-fake-tokens": "many"})
    assert r.status_code == 400
    r = http.post("/v1/nope", json={})
    assert r.status_code == 404 and set(r.json()["error"]) == ERROR_KEYS


def test_seeded_requests_are_byte_identical(http: httpx.Client) -> None:
    payload = body(seed=42, n=2)
    a = http.post("/v1/chat/completions", json=payload).content
    b = http.post("/v1/chat/completions", json=payload).content
    assert a == b
    assert b"<<req:" not in a  # the marker is off by default with a seed
    c = http.post("/v1/chat/completions", json=body(seed=43, n=2)).json()
    assert c["id"] != json.loads(a)["id"]
    sp = body(seed=7, stream=True, tools=[WEATHER_TOOL], stream_options={"include_usage": True})
    assert post_stream(http, "/v1/chat/completions", sp)[1] == post_stream(http, "/v1/chat/completions", sp)[1]
    unseeded = [http.post("/v1/chat/completions", json=body()).json() for _ in range(2)]
    assert unseeded[0]["id"] != unseeded[1]["id"]
    marked = http.post("/v1/chat/completions", json=body(seed=42, fake={"marker": True})).json()
    assert marked["choices"][0]["message"]["content"].startswith("<<req:")


def test_marker_can_be_disabled_by_header(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json=body(), headers={"x-fake-marker": "false", "x-fake-tokens": "3"})
    assert r.json()["choices"][0]["message"]["content"] == "alpha bravo charlie"


def test_ledger_records_and_reset(http: httpx.Client) -> None:
    headers = {**tid(), "X-Mixed-Case": "Yes", "Authorization": "Bearer sk-ledger"}
    http.post("/v1/chat/completions", json=body(fake={"tokens": 3}), headers=headers)
    rec = record_for(http, headers["X-Test-Id"])
    assert set(rec) >= {
        "n",
        "path",
        "method",
        "headers",
        "body",
        "completion_tokens_generated",
        "client_disconnected",
        "finished",
    }
    assert rec["path"] == "/v1/chat/completions" and rec["method"] == "POST"
    assert rec["headers"]["x-mixed-case"] == "Yes" and rec["headers"]["authorization"] == "Bearer sk-ledger"
    assert all(k == k.lower() for k in rec["headers"])
    assert rec["body"]["fake"] == {"tokens": 3} and rec["body"]["messages"] == MESSAGES
    assert rec["completion_tokens_generated"] == 3 and rec["finished"] is True
    assert not any(r["path"] in ("/healthz", "/_ledger") for r in ledger(http))
    n_before = rec["n"]
    assert http.post("/_reset").status_code == 200
    assert ledger(http) == []
    http.get("/v1/models")
    (after,) = ledger(http)
    assert after["n"] == n_before + 1  # the counter (and so the markers) keep going across resets
    http.get("/v1/models")
    assert [r["n"] for r in http.get("/_ledger", params={"since": after["n"]}).json()] == [after["n"] + 1]


def test_ttft_and_chunk_delay(http: httpx.Client) -> None:
    t0 = time.monotonic()
    with http.stream("POST", "/v1/chat/completions", json=body(stream=True, fake={"ttft_ms": 300})) as r:
        t_headers = time.monotonic() - t0
        r.read()
    assert t_headers >= 0.29
    t0 = time.monotonic()
    r = http.post("/v1/chat/completions", json=body(), headers={"x-fake-ttft-ms": "250"})
    assert r.status_code == 200 and time.monotonic() - t0 >= 0.24
    t0 = time.monotonic()
    _, raw = post_stream(http, "/v1/chat/completions", body(stream=True, fake={"chunk_delay_ms": 60, "tokens": 20}))
    assert time.monotonic() - t0 >= 3 * 0.06 - 0.01  # 4 content chunks, 3 gaps
    assert parse_sse(raw)[-1] == "[DONE]"


@pytest.mark.parametrize("mode", ["rst", "fin"])
def test_fail_after_chunks_aborts_without_done(http: httpx.Client, mode: str) -> None:
    headers = {**tid(), "x-fake-fail-after-chunks": "2", "x-fake-fail-mode": mode}
    parser = SSEParser()
    payloads: list[str] = []
    with (
        pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)),
        http.stream("POST", "/v1/chat/completions", json=body(stream=True), headers=headers) as r,
    ):
        for chunk in r.iter_raw():
            payloads.extend(e.data for e in parser.feed(chunk))
    assert "[DONE]" not in payloads
    chunks = json_payloads(payloads)
    assert [chunk_kind(c) for c in chunks] == ["role", "delta", "delta"]
    rec = wait_record(http, headers["X-Test-Id"], lambda r: r["ended_at"] is not None)
    assert rec["aborted"] is True and rec["finished"] is False and rec["client_disconnected"] is False
    assert rec["completion_tokens_generated"] == 10


def test_fail_after_chunks_non_stream_drops_connection(http: httpx.Client) -> None:
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        http.post("/v1/chat/completions", json=body(fake={"fail_after_chunks": 0}))


def test_pad_bytes_makes_a_huge_body_or_a_huge_sse_line(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json=body(fake={"pad_bytes": 300_000}))
    assert r.status_code == 200 and len(r.json()["pad"]) == 300_000
    assert r.json()["choices"][0]["message"]["content"]  # the answer itself is unchanged
    _, raw = post_stream(http, "/v1/chat/completions", body(stream=True, fake={"pad_bytes": 300_000}))
    lines = raw.split(b"\n")
    assert [len(line) > 300_000 for line in lines].count(True) == 1  # one huge line: the first content chunk
    chunks = json_payloads(parse_sse(raw))
    assert len(next(c for c in chunks if "pad" in c)["pad"]) == 300_000
    assert chunk_kind(next(c for c in chunks if "pad" in c)) == "delta"
    assert raw.endswith(b"data: [DONE]\n\n")


def test_midstream_error(http: httpx.Client, sdk: openai.OpenAI) -> None:
    headers = tid()
    payload = body(stream=True, fake={"midstream_error": 1})
    _, raw = post_stream(http, "/v1/chat/completions", payload, headers=headers)
    chunks = json_payloads(parse_sse(raw))
    assert [chunk_kind(c) for c in chunks] == ["role", "delta", "error"]
    assert set(chunks[-1]["error"]) == ERROR_KEYS
    rec = record_for(http, headers["X-Test-Id"])
    assert rec["finished"] is False and rec["completion_tokens_generated"] == 5
    with pytest.raises(openai.APIError) as exc:
        for _ in sdk.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_body={"fake": {"midstream_error": 2}}
        ):
            pass
    assert exc.value.type == "server_error"


def test_hang_until_client_disconnects(fake: str, http: httpx.Client) -> None:
    headers = {**tid(), "x-fake-hang": "true"}
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=fake, timeout=httpx.Timeout(5.0, read=0.3)) as c:
        c.post("/v1/chat/completions", json=body(), headers=headers)
    rec = wait_record(http, headers["X-Test-Id"], lambda r: r["client_disconnected"])
    assert rec["status"] is None and rec["finished"] is False and rec["completion_tokens_generated"] == 0


def test_client_disconnect_midstream_is_recorded(fake: str, http: httpx.Client) -> None:
    headers = tid()
    payload = body(stream=True, fake={"tokens": 400, "chunk_tokens": 1, "chunk_delay_ms": 20})
    parser = SSEParser()
    got: list[str] = []
    with (
        httpx.Client(base_url=fake, timeout=10.0) as c,
        c.stream("POST", "/v1/chat/completions", json=payload, headers=headers) as r,
    ):
        for chunk in r.iter_raw():
            got.extend(e.data for e in parser.feed(chunk))
            if len(got) >= 4:
                break
    rec = wait_record(http, headers["X-Test-Id"], lambda r: r["client_disconnected"])
    assert rec["finished"] is False and rec["aborted"] is False
    assert 3 <= rec["completion_tokens_generated"] < 400


# ---------------------------------------------------------------------------------------------------------------------
# The official openai SDK against the fake.


def test_sdk_chat(sdk: openai.OpenAI) -> None:
    resp = sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, n=2)
    assert len(resp.choices) == 2
    assert resp.choices[0].message.content.startswith("<<req:")
    assert resp.choices[0].message.refusal is None
    assert resp.usage is not None and resp.usage.total_tokens == resp.usage.prompt_tokens + 40
    assert resp.usage.prompt_tokens_details.cached_tokens == 0
    assert resp.system_fingerprint == fu.SYSTEM_FINGERPRINT


def test_sdk_stream_with_usage(sdk: openai.OpenAI) -> None:
    chunks = list(
        sdk.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 20
    assert chunks[-2].choices[0].finish_reason == "stop"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("<<req:") and len(text.split(" ")) == 20


def test_sdk_stream_helper_tool_calls(sdk: openai.OpenAI) -> None:
    with sdk.chat.completions.stream(
        model="gpt-4o-mini", messages=MESSAGES, tools=[WEATHER_TOOL], stream_options={"include_usage": True}
    ) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_completion()
    assert "tool_calls.function.arguments.delta" in events
    assert "tool_calls.function.arguments.done" in events
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    assert call.function.parsed_arguments == {"location": "Paris", "unit": "celsius"}
    assert final.usage is not None and final.usage.completion_tokens > 0


def test_sdk_embeddings_base64_default(sdk: openai.OpenAI, http: httpx.Client) -> None:
    headers = tid()
    resp = sdk.embeddings.create(model="text-embedding-3-small", input=["a", "b"], extra_headers=headers)
    rec = record_for(http, headers["X-Test-Id"])
    assert rec["body"]["encoding_format"] == "base64"  # the SDK's default; it decodes it itself
    floats = http.post("/v1/embeddings", json={"model": "m", "input": ["a", "b"]}).json()
    assert [d.embedding for d in resp.data] == [d["embedding"] for d in floats["data"]]
    assert len(resp.data[0].embedding) == 16


def test_sdk_errors(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as rl:
        sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, extra_headers={"x-fake-status": "429"})
    assert rl.value.status_code == 429 and rl.value.code == "rate_limit_exceeded" and rl.value.type == "requests"
    assert rl.value.response.headers["retry-after"] == "1"
    with pytest.raises(openai.BadRequestError) as br:
        sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, extra_body={"fake": {"status": 400}})
    assert br.value.code == "context_length_exceeded" and br.value.param == "messages"
    assert "maximum context length" in br.value.message
    with pytest.raises(openai.AuthenticationError) as au:
        sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, extra_body={"fake": {"status": 401}})
    assert au.value.code == "invalid_api_key"
    for status in (500, 502, 503):
        with pytest.raises(openai.InternalServerError) as ise:
            sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, extra_body={"fake": {"status": status}})
        assert ise.value.status_code == status
    with pytest.raises(openai.BadRequestError) as ll:
        sdk.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_body={"fake": {"status": 400, "error_style": "llamacpp"}}
        )
    assert ll.value.code == "400"  # the SDK turns llama.cpp's integer code into a string


# ---------------------------------------------------------------------------------------------------------------------
# tests/harness/sse.py


def test_sse_parser_cases() -> None:
    raw = (
        b"\xef\xbb\xbf: ping\r\n\r\n"
        b"data: one\r\n\r\n"
        b"event: update\ndata:two\ndata:  three\nid: 7\n\n"
        b"data: four\r\rdata\n\n"
        b'data: {"a":1}\n\n'
        b"data: unterminated"
    )
    events = parse_events(raw)
    assert [e.data for e in events] == ["one", "two\n three", "four", "", '{"a":1}']
    assert events[1].event == "update" and events[1].id == "7"
    p = SSEParser()
    assert p.feed(b": keep-alive\n\n") == [] and p.comments == ["keep-alive"]
    assert p.feed(b"data: x\r") == [] and p.feed(b"\n") == [] and [e.data for e in p.feed(b"\r\n")] == ["x"]
    assert not p.pending


_LINE = st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=12)


@settings(max_examples=150, deadline=None)
@given(
    events=st.lists(
        st.tuples(st.lists(_LINE, min_size=1, max_size=3), st.lists(_LINE, max_size=2)), min_size=0, max_size=6
    ),
    eol=st.sampled_from(["\n", "\r\n", "\r"]),
    bom=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
)
def test_sse_split_points_do_not_matter(
    events: list[tuple[list[str], list[str]]], eol: str, bom: bool, cuts: list[int]
) -> None:
    text = "".join(
        "".join(f":{c}{eol}" for c in comments) + "".join(f"data: {line}{eol}" for line in lines) + eol
        for lines, comments in events
    )
    raw = (b"\xef\xbb\xbf" if bom else b"") + text.encode()
    expected = ["\n".join(lines) for lines, _ in events]
    assert parse_sse(raw) == expected
    points = sorted({c % (len(raw) + 1) for c in cuts})
    pieces = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]
    assert b"".join(pieces) == raw
    assert parse_chunks(pieces) == expected
