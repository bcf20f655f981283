"""Byte-faithful passthrough through `strait serve`: an OpenAI client's body reaches an OpenAI-compatible
upstream byte for byte, only the model value replaced (Strait's `strait` field removed; a stream asks for
usage): unknown nested fields, number spellings, unicode escapes, whitespace and key order survive."""

from __future__ import annotations

import base64

import httpx

from tests.e2e.conftest import ALPHA_KEY, Ledger
from tests.harness.procs import ServerProcess

BODY = (
    b'{\n  "model" : "gpt-fake",\n  "messages": [{"role": "user", "content": "caf\\u00e9 \\ud83d\\ude00 \\/ x",'
    b' "x_part_field": {"keep": [1.0e2, -0.0, 1E-7, 10000000000000000000001]}}],\n'
    b'  "temperature": 1.0e0, "top_p": 1.00, "x_vendor": {"nested": {"deep": [true, null, "\\u0041"]}},'
    b' "strait": {"objective": "ordered"},\n  "seed": -0 }'
)


def _sent(ledger: Ledger) -> bytes:
    return base64.b64decode(ledger.records()[-1]["body_b64"])


def _post(gateway: ServerProcess, body: bytes) -> httpx.Response:
    return httpx.post(
        gateway.base_url + "/v1/chat/completions",
        content=body,
        headers={"authorization": f"Bearer {ALPHA_KEY}", "content-type": "application/json"},
        timeout=30,
    )


def test_the_upstream_gets_the_clients_bytes_with_only_the_model_replaced(
    gateway: ServerProcess, ledger: Ledger
) -> None:
    r = _post(gateway, BODY)
    assert r.status_code == 200, r.text
    expected = BODY.replace(b'"gpt-fake"', b'"fake-model"').replace(b', "strait": {"objective": "ordered"}', b"")
    assert expected != BODY
    assert _sent(ledger) == expected


def test_a_stream_asks_for_usage_and_keeps_everything_else(gateway: ServerProcess, ledger: Ledger) -> None:
    body = BODY.replace(b'"seed": -0 }', b'"seed": -0, "stream": true, "stream_options": {"include_usage": false} }')
    r = _post(gateway, body)
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    # The client did not ask for usage: Strait did (to account), and strips the chunk from the answer.
    assert '"usage"' not in r.text.replace('"usage":null', "")
    expected = (
        body.replace(b'"gpt-fake"', b'"fake-model"')
        .replace(b', "strait": {"objective": "ordered"}', b"")
        .replace(b'{"include_usage": false}', b'{"include_usage":true}')
    )
    assert _sent(ledger) == expected
