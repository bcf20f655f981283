"""Upstream answers are bounded (server.upstream defaults: 16 MiB body, 1 MiB SSE event), end to end."""

from __future__ import annotations

import httpx

from tests.e2e.conftest import ALPHA_KEY
from tests.harness.procs import ServerProcess

HEADERS = {"authorization": f"Bearer {ALPHA_KEY}"}
BODY = {"model": "gpt-fake", "messages": [{"role": "user", "content": "hi"}]}


def test_an_oversize_answer_is_a_502_naming_the_limit(gateway: ServerProcess) -> None:
    url = gateway.base_url + "/v1/chat/completions"
    r = httpx.post(url, json={**BODY, "fake": {"pad_bytes": 20 * 1024 * 1024}}, headers=HEADERS, timeout=60)
    assert r.status_code == 502
    error = r.json()["error"]
    assert error["code"] == "upstream_response_too_large" and error["type"] == "upstream_error"
    assert "16777216 bytes" in error["message"]
    # Under the limit, the same upstream answers as usual.
    ok = httpx.post(url, json={**BODY, "fake": {"pad_bytes": 1024 * 1024}}, headers=HEADERS, timeout=60)
    assert ok.status_code == 200 and len(ok.json()["pad"]) == 1024 * 1024


def test_an_oversize_stream_event_before_content_fails_with_its_reason(gateway: ServerProcess) -> None:
    # The fake pads its first content chunk: the stream fails before its first content, so nothing was
    # committed to the client (gateway.upstream.commit): a plain error answer that says why.
    body = {**BODY, "stream": True, "fake": {"pad_bytes": 2 * 1024 * 1024}}
    r = httpx.post(gateway.base_url + "/v1/chat/completions", json=body, headers=HEADERS, timeout=60)
    assert r.status_code == 502
    assert len(r.content) < 1024 * 1024
    error = r.json()["error"]
    assert error["code"] == "upstream_event_too_large" and "1048576 bytes" in error["message"]
