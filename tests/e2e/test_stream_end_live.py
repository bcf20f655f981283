"""A stream that ends cleanly after its finish_reason but without `[DONE]` (some engines omit it) is a
complete answer: the client gets `[DONE]` from Strait and the whole content; a stream cut before its
finish_reason is still an error, never a truncated answer that looks complete."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.e2e.conftest import ALPHA_KEY
from tests.harness.procs import ServerProcess

USER = [{"role": "user", "content": "Say hello"}]


def test_a_clean_end_without_done_after_finish_reason_is_complete(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="gpt-fake",
        messages=USER,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"fake": {"no_done": True}},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 6
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


def test_the_raw_stream_ends_with_done_sent_by_strait(gateway: ServerProcess) -> None:
    body = {"model": "gpt-fake", "messages": USER, "max_tokens": 4, "stream": True, "fake": {"no_done": True}}
    r = httpx.post(
        gateway.base_url + "/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {ALPHA_KEY}"},
        timeout=30,
    )
    assert r.status_code == 200
    lines = [line for line in r.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert not any('"error"' in line for line in lines)


def test_a_stream_cut_cleanly_before_its_finish_reason_is_still_an_error(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="gpt-fake",
        messages=USER,
        stream=True,
        extra_body={"fake": {"tokens": 40, "fail_after_chunks": 3, "fail_mode": "fin"}},
    )
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass


def test_a_malformed_chunk_mid_stream_is_skipped_and_counted(client: openai.OpenAI, gateway: ServerProcess) -> None:
    stream = client.chat.completions.create(
        model="gpt-fake",
        messages=USER,
        stream=True,
        extra_body={"fake": {"tokens": 12, "chunk_tokens": 2, "malformed_after_chunks": 3}},
    )
    chunks = list(stream)  # no exception: the answer went on past the bad event
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 12
    metrics = httpx.get(gateway.base_url + "/metrics", timeout=10).text
    counted = [
        line
        for line in metrics.splitlines()
        if line.startswith('strait_upstream_malformed_events_total{backend="fake"}')
    ]
    assert counted and float(counted[0].rsplit(" ", 1)[1]) >= 1
