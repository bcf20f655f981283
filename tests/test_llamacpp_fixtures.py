"""What the real llama.cpp server sends, as recorded in tests/fixtures/llamacpp/ (no server needed).

These tests pin the quirks of the recorded responses. Code that uses the fixtures (upstream simulators, the
gateway's normalisation) can rely on them. If a re-recording changes one of them, the server's behaviour
changed: update the README in that folder and whatever depends on the old behaviour.
Regenerate with: python -m tests.fixtures.record_llamacpp
"""

from __future__ import annotations

import base64
import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "llamacpp"
ALIAS = "smollm2"
EMBED_DIM = 576

ERROR_FILES = {
    "error_bad_request.json": (400, "invalid_request_error"),
    "error_invalid_json.json": (400, "invalid_request_error"),
    "error_context.json": (400, "exceed_context_size_error"),
    "error_unauthorized.json": (401, "authentication_error"),
    "error_not_found.json": (404, "not_found_error"),
    "error_embeddings_disabled.json": (501, "not_supported_error"),
}

# Top-level keys exactly as recorded. The live test (tests/integration/test_llamacpp_live.py) checks the
# running server against the same files.
CHAT_KEYS = {"choices", "created", "model", "system_fingerprint", "object", "usage", "id", "timings"}
TIMINGS_KEYS = {
    "cache_n",
    "prompt_n",
    "prompt_ms",
    "prompt_per_token_ms",
    "prompt_per_second",
    "predicted_n",
    "predicted_ms",
    "predicted_per_token_ms",
    "predicted_per_second",
}


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_bytes())


def sse_events(name: str) -> list[str]:
    """The `data:` payloads of a recorded SSE body, in order (the framing itself is checked separately)."""
    raw = (FIXTURES / name).read_bytes().decode("utf-8")
    events = [e for e in raw.split("\n\n") if e]
    out = []
    for event in events:
        lines = event.split("\n")
        assert len(lines) == 1 and lines[0].startswith("data: "), f"unexpected SSE event {event!r}"
        out.append(lines[0][len("data: ") :])
    return out


def chunks(name: str) -> list[dict[str, Any]]:
    events = sse_events(name)
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def requests_index() -> dict[str, dict[str, Any]]:
    return {r["file"]: r for r in load("requests.json")}


# --- chat completion (non-streaming) -------------------------------------------------------------


def test_chat_completion_shape() -> None:
    body = load("chat_completion.json")
    assert set(body) == CHAT_KEYS
    assert body["object"] == "chat.completion"
    assert body["model"] == ALIAS
    assert body["system_fingerprint"] == "b0-unknown"
    assert body["id"].startswith("chatcmpl-")
    assert set(body["timings"]) == TIMINGS_KEYS  # llama.cpp extension, not in the OpenAI schema
    [choice] = body["choices"]
    # no `logprobs` on the choice and no `refusal` on the message (OpenAI sends both, as null)
    assert set(choice) == {"finish_reason", "index", "message"}
    assert set(choice["message"]) == {"role", "content"}
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"]
    assert choice["finish_reason"] in {"stop", "length"}
    usage = body["usage"]
    assert set(usage) == {"completion_tokens", "prompt_tokens", "total_tokens", "prompt_tokens_details"}
    assert set(usage["prompt_tokens_details"]) == {"cached_tokens"}  # no completion_tokens_details
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < usage["completion_tokens"] <= 16


def test_unknown_model_is_accepted_and_answered_as_the_alias() -> None:
    """The single-model server ignores `model`: an unknown name gets 200, and the response names the alias."""
    req = requests_index()["chat_completion_unknown_model.json"]
    assert req["request"]["model"] == "no-such-model"
    assert req["status"] == 200
    body = load("chat_completion_unknown_model.json")
    assert body["model"] == ALIAS
    assert body["choices"][0]["finish_reason"] == "length"  # max_tokens 4


def test_empty_messages_list_is_accepted() -> None:
    """A missing `messages` is a 400, but `messages: []` gets 200 and text generated from an empty prompt."""
    assert requests_index()["chat_completion_empty_messages.json"]["status"] == 200
    body = load("chat_completion_empty_messages.json")
    assert set(body) == CHAT_KEYS
    assert body["choices"][0]["message"]["content"]


# --- streaming ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["chat_completion_stream.sse", "chat_completion_stream_usage.sse"])
def test_stream_framing(name: str) -> None:
    raw = (FIXTURES / name).read_bytes()
    assert raw.startswith(b"data: {")
    assert raw.endswith(b"data: [DONE]\n\n")
    assert b"\r" not in raw  # LF framing, one `data:` line per event
    assert b"event:" not in raw and b"\n:" not in raw  # no named events, no comments or pings
    assert requests_index()[name]["content_type"] == "text/event-stream"


@pytest.mark.parametrize("name", ["chat_completion_stream.sse", "chat_completion_stream_usage.sse"])
def test_stream_chunks(name: str) -> None:
    cs = chunks(name)
    assert len({c["id"] for c in cs}) == 1
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == ALIAS for c in cs)
    assert all(c["system_fingerprint"] == "b0-unknown" for c in cs)
    with_choices = [c for c in cs if c["choices"]]
    # the first chunk carries only the role, with content null
    assert with_choices[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    # then content deltas with finish_reason null, then one chunk with finish_reason and an empty delta
    middle = with_choices[1:-1]
    assert middle and all(set(c["choices"][0]["delta"]) == {"content"} for c in middle)
    assert all(c["choices"][0]["finish_reason"] is None for c in with_choices[:-1])
    last = with_choices[-1]["choices"][0]
    assert last["finish_reason"] in {"stop", "length"} and last["delta"] == {}
    assert all(set(c["choices"][0]) == {"finish_reason", "index", "delta"} for c in with_choices)  # no logprobs
    # at temperature 0 the streamed text equals the non-streamed answer
    text = "".join(c["choices"][0]["delta"]["content"] for c in middle)
    assert text == load("chat_completion.json")["choices"][0]["message"]["content"]


def test_stream_without_usage_puts_timings_on_the_finish_chunk() -> None:
    cs = chunks("chat_completion_stream.sse")
    assert all(c["choices"] for c in cs)  # no usage chunk when include_usage is not set
    assert all("usage" not in c for c in cs)
    assert "timings" in cs[-1] and all("timings" not in c for c in cs[:-1])


def test_stream_usage_chunk() -> None:
    cs = chunks("chat_completion_stream_usage.sse")
    usage_chunk = cs[-1]
    assert usage_chunk["choices"] == []
    assert set(usage_chunk) == {"choices", "created", "id", "model", "system_fingerprint", "object", "usage", "timings"}
    usage = usage_chunk["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # with include_usage the timings move from the finish chunk to the usage chunk
    assert all("usage" not in c and "timings" not in c for c in cs[:-1])
    # one content delta per generated token; with finish_reason "stop" the end-of-turn token is counted
    # in completion_tokens but not sent
    content_deltas = [c for c in cs if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert cs[-2]["choices"][0]["finish_reason"] == "stop"
    assert usage["completion_tokens"] == len(content_deltas) + 1


# --- legacy completions --------------------------------------------------------------------------


def test_legacy_completion() -> None:
    body = load("completion.json")
    assert set(body) == CHAT_KEYS
    assert body["object"] == "text_completion"
    assert body["id"].startswith("chatcmpl-")  # quirk: not "cmpl-"
    [choice] = body["choices"]
    assert set(choice) == {"text", "index", "logprobs", "finish_reason"}
    assert choice["logprobs"] is None  # present here, unlike on chat choices
    assert choice["text"].startswith(" Paris")
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 8


# --- embeddings ----------------------------------------------------------------------------------


def test_embeddings_float() -> None:
    body = load("embeddings_float.json")
    assert set(body) == {"model", "object", "usage", "data"}
    assert body["object"] == "list" and body["model"] == "smollm2-embed"
    assert set(body["usage"]) == {"prompt_tokens", "total_tokens"}
    assert [d["index"] for d in body["data"]] == [0, 1]
    for item in body["data"]:
        assert set(item) == {"embedding", "index", "object"}
        assert item["object"] == "embedding"
        vec = item["embedding"]
        assert len(vec) == EMBED_DIM
        assert math.isclose(math.sqrt(sum(x * x for x in vec)), 1.0, rel_tol=1e-5)  # L2-normalised


def test_embeddings_base64_decodes_to_the_float_vectors() -> None:
    b64 = load("embeddings_base64.json")
    floats = load("embeddings_float.json")
    assert b64["usage"] == floats["usage"]
    for item, ref in zip(b64["data"], floats["data"], strict=True):
        # quirk: every item repeats "encoding_format": "base64"
        assert set(item) == {"embedding", "index", "object", "encoding_format"}
        assert item["encoding_format"] == "base64"
        vec = struct.unpack(f"<{EMBED_DIM}f", base64.b64decode(item["embedding"]))  # little-endian float32
        assert vec == pytest.approx(ref["embedding"], abs=1e-7)


# --- models --------------------------------------------------------------------------------------


def test_models_lists_ollama_and_openai_shapes() -> None:
    body = load("models.json")
    assert set(body) == {"models", "object", "data"}
    assert body["models"][0]["name"] == ALIAS  # Ollama-style list
    [model] = body["data"]
    assert model["id"] == ALIAS and model["object"] == "model" and model["owned_by"] == "llamacpp"
    assert model["aliases"] == [ALIAS]
    assert model["meta"]["n_ctx"] == 1024  # per slot: ctx 2048 split across 2 slots
    assert model["meta"]["n_embd"] == EMBED_DIM


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ERROR_FILES))
def test_error_envelope(name: str) -> None:
    status, err_type = ERROR_FILES[name]
    body = load(name)
    assert set(body) == {"error"}
    err = body["error"]
    assert err["type"] == err_type
    assert isinstance(err["code"], int) and err["code"] == status  # an integer, not an OpenAI string code
    assert "param" not in err
    assert isinstance(err["message"], str) and err["message"]
    index = load("errors.json")[name]
    assert index == {"status": status, "body": body}
    assert requests_index()[name]["status"] == status


def test_error_messages() -> None:
    assert load("error_bad_request.json")["error"]["message"] == "'messages' is required"
    assert load("error_unauthorized.json")["error"]["message"] == "Invalid API Key"
    assert load("error_invalid_json.json")["error"]["message"].startswith("[json.exception.parse_error.101]")
    ctx = load("error_context.json")["error"]
    # extra fields; the text is not OpenAI's "maximum context length" and the code is not "context_length_exceeded"
    assert set(ctx) == {"code", "message", "type", "n_prompt_tokens", "n_ctx"}
    assert ctx["n_ctx"] == 256 and ctx["n_prompt_tokens"] > ctx["n_ctx"]
    assert "exceeds the available context size" in ctx["message"]
    assert "maximum context length" not in ctx["message"]


def test_response_headers() -> None:
    for req in requests_index().values():
        headers = req["response_headers"]
        assert headers["server"] == "llama.cpp"
        assert "x-request-id" not in headers  # llama.cpp sends no request id
        if req["status"] >= 400:
            assert headers.get("connection") == "close"  # the server closes the connection after an error
            assert "retry-after" not in headers and "www-authenticate" not in headers
    assert requests_index()["chat_completion_stream.sse"]["response_headers"]["x-accel-buffering"] == "no"
