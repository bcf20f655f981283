"""The client gaps of issue 11 through `strait serve` in front of the fake OpenAI upstream: requests that
other upstreams accept but OpenAI's product limits would refuse reach the upstream as the client wrote them."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.e2e.conftest import Ledger

USER = [{"role": "user", "content": "Say hello"}]


def _sent(ledger: Ledger) -> dict[str, Any]:
    body: dict[str, Any] = ledger.records()[-1]["body"]
    return body


def test_more_than_four_stop_sequences_reach_the_upstream(client: openai.OpenAI, ledger: Ledger) -> None:
    stops = ["zulu", "yankee", "xray", "whiskey", "victor", "uniform"]
    reply = client.chat.completions.create(model="gpt-fake", messages=USER, stop=stops, max_tokens=5)
    assert reply.choices[0].message.content
    sent = _sent(ledger)
    assert sent["stop"] == stops and sent["model"] == "fake-model"


def test_engine_ranges_reach_the_upstream(client: openai.OpenAI, ledger: Ledger) -> None:
    client.chat.completions.create(
        model="gpt-fake",
        messages=USER,
        max_tokens=5,
        temperature=2.5,
        presence_penalty=3,
        logprobs=True,
        top_logprobs=40,
        logit_bias={"15043": 150},
    )
    sent = _sent(ledger)
    assert (sent["temperature"], sent["presence_penalty"], sent["top_logprobs"]) == (2.5, 3, 40)
    assert sent["logit_bias"] == {"15043": 150}


def test_the_upstreams_own_400_for_a_limit_is_passed_on(client: openai.OpenAI, ledger: Ledger) -> None:
    """OpenAI answers its own 400 for five stop sequences; Strait passes it on (here the fake plays OpenAI)."""
    before = ledger.count()
    refusal = {"status": 400, "error_message": "The engine limits 'stop' to 4 sequences."}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="gpt-fake", messages=USER, stop=["a", "b", "c", "d", "e"], extra_body={"fake": refusal}
        )
    assert info.value.status_code == 400
    assert "The engine limits 'stop' to 4 sequences" in info.value.message
    assert ledger.count() == before + 1  # the upstream decided, not Strait
