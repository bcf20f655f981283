"""Upstream errors reach clients as OpenAI envelopes with string codes, the right status and capped Retry-After."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

from gateway.upstream.normalize import cap_retry_after, upstream_error
from gateway.upstream.redact import Redactor

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _envelope(body: bytes) -> dict[str, object]:
    doc = msgspec.json.decode(body)
    assert set(doc) == {"error"}
    assert set(doc["error"]) == {"message", "type", "param", "code"}
    assert doc["error"]["code"] is None or isinstance(doc["error"]["code"], str)
    return doc["error"]  # type: ignore[no-any-return]


def test_llamacpp_integer_code_becomes_string_or_null() -> None:
    body = b'{"error":{"code":404,"message":"File Not Found","type":"not_found_error"}}'
    err = upstream_error(404, body, {})
    env = _envelope(err.body())
    assert err.status == 404
    assert env["message"] == "File Not Found"
    assert env["code"] is None and env["type"] == "not_found_error"


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
        # The provider refusing the gateway's credentials is a gateway failure (502), not the client's.
        assert err.status == (502 if status in (401, 403) else status)
        _envelope(err.body())


def test_openai_429_keeps_retry_after_but_never_the_providers_rate_limit_headers() -> None:
    """x-ratelimit-* of an upstream describe the gateway's provider account, not the tenant."""
    body = b'{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}'
    recorded = json.loads((FIXTURES / "openai" / "error_429.headers.json").read_text())
    headers = {k.lower(): str(v) for k, v in recorded["headers"].items()}
    assert any(k.startswith("x-ratelimit-") for k in headers)
    err = upstream_error(429, body, {**headers, "retry-after": "3", "server": "internal-7"})
    assert err.headers == {"retry-after": "3"}
    assert _envelope(err.body())["code"] == "rate_limit_exceeded"


PROVIDER_KEY = "sk-proj-provider-Zq81xLm0"


def test_upstream_401_echoing_the_provider_key_is_the_gateways_problem() -> None:
    """Measured: an upstream 401 echoing our provider key reached the client verbatim as invalid_api_key."""
    body = (
        b'{"error":{"message":"Incorrect API key provided: ' + PROVIDER_KEY.encode() + b". You can find your API "
        b'key at https://platform.openai.com/account/api-keys.","type":"invalid_request_error","param":null,'
        b'"code":"invalid_api_key"}}'
    )
    for status in (401, 403):
        err = upstream_error(status, body, {"x-ratelimit-remaining-requests": "0"}, Redactor([PROVIDER_KEY]))
        env = _envelope(err.body())
        assert err.status == 502
        assert env["code"] == "upstream_auth_failed" and env["type"] == "server_error"
        assert PROVIDER_KEY not in err.body().decode() and "key" not in str(env["message"]).lower()
        assert err.headers == {}


def test_upstream_500_naming_internal_hosts_and_paths_is_redacted() -> None:
    """Measured: `CUDA OOM on gpu-node-7.corp.internal:8000 (/opt/vllm/engine.py:812)` was relayed as is."""
    body = (
        b'{"error":{"message":"CUDA OOM on gpu-node-7.corp.internal:8000 (/opt/vllm/engine.py:812) key '
        + PROVIDER_KEY.encode()
        + b'","type":"server_error","param":"messages","code":"engine_oom"}}'
    )
    err = upstream_error(500, body, {}, Redactor([PROVIDER_KEY]))
    env = _envelope(err.body())
    assert err.status == 500
    assert env == {
        "message": "CUDA OOM on [host] ([path]) key [redacted]",
        "type": "server_error",
        "param": "messages",
        "code": "engine_oom",
    }


def test_context_overflow_keeps_its_useful_text() -> None:
    message = "This model's maximum context length is 8192 tokens. However, you requested 9000 tokens."
    body = json.dumps({"error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}})
    env = _envelope(upstream_error(400, body.encode(), {}, Redactor([PROVIDER_KEY])).body())
    assert env["message"] == message and env["code"] == "context_length_exceeded" and env["param"] == "messages"


def test_retry_after_is_capped_and_a_missing_one_is_supplied() -> None:
    assert cap_retry_after("600") == "120"
    assert cap_retry_after("0.2") == "1"
    assert cap_retry_after("-1") is None
    assert upstream_error(503, b"{}", {}).headers["retry-after"] == "1"


def test_anthropics_overloaded_529_is_read_like_a_503() -> None:
    body = b'{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}, "request_id": "req_1"}'
    error = upstream_error(529, body, {})
    env = _envelope(error.body())
    assert error.status == 529 and error.headers["retry-after"] == "1"
    assert (
        env["message"] == "Overloaded" and env["type"] == "overloaded_error" and env["code"] == "upstream_unavailable"
    )


def test_html_error_page_never_reaches_the_client() -> None:
    html = b"<html><body>502 Bad Gateway from gpu-node-17.internal.corp</body></html>"
    env = _envelope(upstream_error(502, html, {}).body())
    assert "internal" not in str(env["message"])
    assert env["message"] == "The upstream returned HTTP 502."


def test_vllm_flat_error_object() -> None:
    body = b'{"object":"error","message":"bad","type":"BadRequestError","param":null,"code":400}'
    env = _envelope(upstream_error(400, body, {}).body())
    assert env["message"] == "bad" and env["type"] == "BadRequestError" and env["code"] is None
