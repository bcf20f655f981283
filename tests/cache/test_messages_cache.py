"""The cache serves /v1/messages (Anthropic) requests like chat ones, in process (create_app, the echo
adapter whose every answer is unique): entries are OpenAI answers keyed on the canonical request, and the
edge translates what it gets, a hit included. A repeated Messages question is a hit (whole and streamed,
the same content, a fresh `msg_` id), an equal chat request and Messages request share the entry, and
feedback takes the `msg_` id of a hit."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from litestar.testing import TestClient

from tests.cache.echo_adapter import EchoFactory
from tests.cache.test_stage_in_process import KEYS, ask, gateway, settle
from tests.harness.sse import parse_events


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient[Any], EchoFactory]]:
    with gateway(tmp_path_factory.mktemp("cache-messages")) as found:
        yield found


def _message(client: TestClient[Any], question: str, *, stream: bool = False) -> Any:
    body = {
        "model": "chat",
        "max_tokens": 50,
        "temperature": 0,
        "stream": stream,
        "messages": [{"role": "user", "content": question}],
    }
    response = client.post(
        "/v1/messages", json=body, headers={"authorization": f"Bearer {KEYS['acme']}", "anthropic-version": "x"}
    )
    settle(client)
    return response


def _streamed_text(response: Any) -> str:
    names = [ev.event for ev in parse_events(response.content)]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    deltas = [
        json.loads(ev.data)["delta"] for ev in parse_events(response.content) if ev.event == "content_block_delta"
    ]
    return "".join(d["text"] for d in deltas)


def test_a_repeated_messages_question_is_a_hit_whole_and_streamed(env: tuple[TestClient[Any], EchoFactory]) -> None:
    client, upstream = env
    question = "which otters hold hands while they sleep"
    before = upstream.calls
    first = _message(client, question)
    second = _message(client, question)
    assert (first.headers["x-strait-cache"], second.headers["x-strait-cache"]) == ("miss", "hit")
    assert upstream.calls == before + 1  # the hit reached no adapter
    assert second.json()["content"] == first.json()["content"]
    assert second.json()["id"] != first.json()["id"] and second.json()["id"].startswith("msg_")
    assert second.json()["type"] == "message" and second.json()["stop_reason"] == "end_turn"
    streamed = _message(client, question, stream=True)
    assert streamed.headers["x-strait-cache"] == "hit"
    assert upstream.calls == before + 1
    assert _streamed_text(streamed) == first.json()["content"][0]["text"]


def test_an_equal_chat_request_and_messages_request_share_the_entry(env: tuple[TestClient[Any], EchoFactory]) -> None:
    client, upstream = env
    question = "why do sea otters keep a favourite stone"
    chat = ask(client, "acme", question, max_tokens=50)
    assert chat.headers["x-strait-cache"] == "miss"
    calls = upstream.calls
    message = _message(client, question)
    assert message.headers["x-strait-cache"] == "hit" and upstream.calls == calls
    assert message.json()["content"] == [{"type": "text", "text": chat.json()["choices"][0]["message"]["content"]}]


def test_feedback_takes_the_msg_id_of_a_hit(env: tuple[TestClient[Any], EchoFactory]) -> None:
    client, _ = env
    question = "how long can a river otter hold its breath"
    _message(client, question)
    hit = _message(client, question)
    assert hit.headers["x-strait-cache"] == "hit"
    report = client.post(
        "/v1/cache/feedback", json={"id": hit.json()["id"]}, headers={"authorization": f"Bearer {KEYS['acme']}"}
    )
    assert report.status_code == 200 and report.json()["recorded"] is True
    assert _message(client, question).headers["x-strait-cache"] == "miss"  # the reported answer left the cache
