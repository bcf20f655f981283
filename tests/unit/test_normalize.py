"""Upstream errors reach clients as OpenAI envelopes with string codes, the right status and capped Retry-After."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

from gateway.upstream.normalize import cap_retry_after, upstream_error

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _envelope(body: bytes) -> dict[str, object]:
    doc = msgspec.json.decode(body)
    assert set(doc) == {"error"}
    assert set(doc["error"]) == {"message", "type", "param", "code"}
    assert doc["error"]["code"] is None or isinstance(doc["error"]["code"], str)
    return doc["error"]  # type: ignore[no-any-return]


def test_llamacpp_integer_code_becomes_string_or_null() -> None:
    body = b'{"error":{"code":401,"message":"Invalid API Key","type":"authentication_error"}}'
    err = upstream_error(401, body, {})
    env = _envelope(err.body())
    assert err.status == 401
    assert env["message"] == "Invalid API Key"
    assert env["code"] is None and env["type"] == "authentication_error"


def test_llamacpp_context_overflow_maps_to_openai_context_length_exceeded() -> None:
    body = (
        b'{"error":{"code":400,"message":"request (3031 tokens) exceeds the available context size (1024 tokens),'
        b' try increasing it","type":"exceed_context_size_error","n_prompt_tokens":3031,"n_ctx":1024}}'
    )
    env = _envelope(upstream_error(400, body, {}).body())
    assert env["code"] == "context_length_exceeded"
    assert env["param"] == "messages"
    assert "maximum context length" in str(env["message"])
    assert env["type"] == "invalid_request_error"


def test_recorded_llamacpp_errors_normalise(tmp_path: Path) -> None:
    index = FIXTURES / "llamacpp" / "errors.json"
    if not index.exists():  # recorded by tests/fixtures/record_llamacpp.py
        raise AssertionError("tests/fixtures/llamacpp/errors.json is missing")
    recorded = json.loads(index.read_text())
    assert recorded, "no recorded errors"
    for entry in recorded.values() if isinstance(recorded, dict) else recorded:
        status = int(entry["status"])
        body = json.dumps(entry["body"]).encode() if not isinstance(entry["body"], str) else entry["body"].encode()
        err = upstream_error(status, body, {})
        assert err.status == status
        _envelope(err.body())


def test_openai_429_keeps_retry_after_and_rate_limit_headers() -> None:
    body = b'{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}'
    err = upstream_error(429, body, {"retry-after": "3", "x-ratelimit-remaining-requests": "0", "server": "internal-7"})
    assert err.headers == {"retry-after": "3", "x-ratelimit-remaining-requests": "0"}
    assert _envelope(err.body())["code"] == "rate_limit_exceeded"


def test_retry_after_is_capped_and_a_missing_one_is_supplied() -> None:
    assert cap_retry_after("600") == "120"
    assert cap_retry_after("0.2") == "1"
    assert cap_retry_after("-1") is None
    assert upstream_error(503, b"{}", {}).headers["retry-after"] == "1"


def test_html_error_page_never_reaches_the_client() -> None:
    html = b"<html><body>502 Bad Gateway from gpu-node-17.internal.corp</body></html>"
    env = _envelope(upstream_error(502, html, {}).body())
    assert "internal" not in str(env["message"])
    assert env["message"] == "The upstream returned HTTP 502."


def test_vllm_flat_error_object() -> None:
    body = b'{"object":"error","message":"bad","type":"BadRequestError","param":null,"code":400}'
    env = _envelope(upstream_error(400, body, {}).body())
    assert env["message"] == "bad" and env["type"] == "BadRequestError" and env["code"] is None
