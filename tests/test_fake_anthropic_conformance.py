"""The fake Anthropic upstream (tests/harness/fake_anthropic.py) against the Messages API's documented shapes
(tests/fixtures/anthropic/): the same keys at every level and the same value types, the same SSE framing and
event order (runs of deltas compared as one), the same error envelopes and statuses. Ids, text and numbers
are not compared. The `anthropic` SDK reads the fake's answers too, as it reads Anthropic's."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from tests.harness.procs import ServerProcess, free_port

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "anthropic"
KEY = "fake-key-1"
HEADERS = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
TOOL = {"name": "get_weather", "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}}}


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("fake-anthropic") / "fake.log"
    argv = [sys.executable, "-m", "tests.harness.fake_anthropic", "--port", str(port), "--key", KEY]
    with ServerProcess(argv, port, ready_path="/healthz", log_path=log) as proc:
        yield proc.base_url


def shape(value: Any) -> Any:
    """Keys and value types, recursively; lists by the shapes of their items (in order)."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value]
    return "number" if isinstance(value, int | float) and not isinstance(value, bool) else type(value).__name__


def events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of an SSE body framed as Anthropic frames it: `event:` then `data:`, blank line."""
    out = []
    for frame in raw.decode().split("\n\n"):
        if not frame.strip():
            continue
        head, data = frame.split("\n")
        assert head.startswith("event: ") and data.startswith("data: "), frame
        payload = json.loads(data[6:])
        assert payload["type"] == head[7:]
        out.append((head[7:], payload))
    return out


def pattern(stream: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, Any]]:
    """Each event's name and data shape, runs of equal ones collapsed (a delta's count is the content's)."""
    out: list[tuple[str, Any]] = []
    for name, payload in stream:
        item = (name, shape(payload))
        if not out or out[-1] != item:
            out.append(item)
    return out


def post(fake: str, **body: Any) -> httpx.Response:
    return httpx.post(fake + "/v1/messages", headers=HEADERS, json={"max_tokens": 64, **body}, timeout=10)


def test_a_message_with_thinking_redacted_thinking_and_a_tool_call_has_the_documented_shape(fake: str) -> None:
    documented = json.loads((FIXTURES / "message_thinking_tool_use.json").read_bytes())
    r = post(
        fake,
        model="claude-fake-redacted",
        thinking={"type": "enabled", "budget_tokens": 1024},
        tools=[TOOL],
        messages=[{"role": "user", "content": "Weather in Paris?"}],
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    got = r.json()
    # The fixture's text block sits between the thinking and the call; the fake's call comes alone.
    documented["content"] = [b for b in documented["content"] if b["type"] != "text"]
    assert shape(got) == shape(documented)
    assert got["stop_reason"] == "tool_use"


def test_a_streamed_thinking_answer_has_the_documented_events_in_order(fake: str) -> None:
    documented = pattern(events((FIXTURES / "stream_thinking_text.sse").read_bytes()))
    with httpx.stream(
        "POST",
        fake + "/v1/messages",
        headers=HEADERS,
        json={
            "model": "claude-fake",
            "max_tokens": 64,
            "stream": True,
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "messages": [{"role": "user", "content": "Add 27 and 453."}],
        },
        timeout=10,
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read()
    assert pattern(events(raw)) == documented


def test_a_streamed_tool_call_has_the_documented_events(fake: str) -> None:
    documented = pattern(events((FIXTURES / "stream_tool_use.sse").read_bytes()))
    raw = post(
        fake, model="claude-fake", stream=True, tools=[TOOL], messages=[{"role": "user", "content": "Weather?"}]
    ).content
    # The documented turn says a sentence (events 1-4) before its call; the fake calls at once, so its
    # ping follows the call's start.
    assert [name for name, _ in documented[1:5]] == [
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_stop",
    ]
    expected = [documented[0], documented[5], documented[2], *documented[6:]]
    assert pattern(events(raw)) == expected


def test_a_mid_stream_error_event_is_framed_as_documented(fake: str) -> None:
    documented = pattern(events((FIXTURES / "stream_error.sse").read_bytes()))
    raw = post(fake, model="fault:error-event", stream=True, messages=[{"role": "user", "content": "Hello"}]).content
    got = pattern(events(raw))
    assert got[-1] == documented[-1] and got[0] == documented[0]


@pytest.mark.parametrize(
    ("model", "status", "fixture"),
    [
        ("fault:529", 529, "error_overloaded.json"),
        ("fault:429", 429, "error_rate_limit.json"),
        ("fault:400", 400, "error_invalid_request.json"),
    ],
)
def test_errors_have_the_documented_envelope_and_status(fake: str, model: str, status: int, fixture: str) -> None:
    documented = json.loads((FIXTURES / fixture).read_bytes())
    r = post(fake, model=model, messages=[{"role": "user", "content": "hi"}])
    assert r.status_code == status
    assert shape(r.json()) == shape(documented)
    assert r.json()["error"]["type"] == documented["error"]["type"]
    if status == 429:
        assert int(r.headers["retry-after"]) >= 1


def test_the_fake_refuses_what_the_api_refuses(fake: str) -> None:
    unknown = post(
        fake, model="claude-fake", stream_options={"include_usage": True}, messages=[{"role": "user", "content": "hi"}]
    )
    assert unknown.status_code == 400 and "stream_options" in unknown.json()["error"]["message"]
    no_key = httpx.post(fake + "/v1/messages", json={"model": "m", "max_tokens": 1, "messages": []}, timeout=5)
    assert no_key.status_code == 401 and no_key.json()["error"]["type"] == "authentication_error"
    forged = post(
        fake,
        model="claude-fake",
        messages=[
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "EqForged"}]},
            {"role": "user", "content": "again"},
        ],
    )
    assert forged.status_code == 400 and "signature" in forged.json()["error"]["message"]


def test_the_anthropic_sdk_reads_the_fake(fake: str) -> None:
    client = anthropic.Anthropic(base_url=fake, api_key=KEY, max_retries=0)
    message = client.messages.create(
        model="claude-fake",
        max_tokens=64,
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=[{"role": "user", "content": "hi"}],
    )
    assert [b.type for b in message.content] == ["thinking", "text"]
    with client.messages.stream(
        model="claude-fake", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        final = stream.get_final_message()
    assert final.content[0].type == "text" and final.stop_reason == "end_turn"
    with pytest.raises(anthropic.APIStatusError) as info:
        client.messages.create(model="fault:529", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 529
