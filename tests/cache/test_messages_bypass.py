"""The cache does not serve or store Anthropic Messages requests yet (its entries are OpenAI answers keyed on
OpenAI requests): a repeated Messages question reaches the upstream every time and is marked `bypass`, while
the same question on /v1/chat/completions is a hit (the cache was in play for the tenant and route)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from litestar.testing import TestClient

from tests.cache.echo_adapter import EchoFactory
from tests.cache.test_stage_in_process import KEYS, ask, gateway, settle


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


@pytest.mark.parametrize("stream", [False, True])
def test_a_repeated_messages_question_bypasses_the_cache(
    env: tuple[TestClient[Any], EchoFactory], stream: bool
) -> None:
    client, upstream = env
    question = f"messages question streamed={stream} about otters"
    before = upstream.calls
    first = _message(client, question, stream=stream)
    second = _message(client, question, stream=stream)
    assert first.status_code == second.status_code == 200
    assert first.headers["x-strait-cache"] == second.headers["x-strait-cache"] == "bypass"
    assert upstream.calls == before + 2  # both answered fresh, neither stored nor served
    if not stream:
        assert first.json()["content"] != second.json()["content"]  # the echo numbers every answer
    # The same question over the OpenAI route: the cache is in play for this tenant and route.
    assert ask(client, "acme", question).headers["x-strait-cache"] == "miss"
    assert ask(client, "acme", question).headers["x-strait-cache"] == "hit"
