"""The official `openai` SDK's `responses` against a real llama.cpp server twice: its own `/v1/responses`
(llama.cpp serves one; nobody here wrote it) and Strait in front of it (translated to llama.cpp's chat
endpoint and back). At temperature 0 the SDK must get the same text and the same token counts from both,
whole and streamed; Strait's stream in OpenAI's event order.

One difference is Strait's on purpose: an answer cut at `max_output_tokens` is `incomplete` with
`incomplete_details.reason: max_output_tokens`, as OpenAI reports it (llama.cpp says `completed`)."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.harness.procs import ServerProcess
from tests.integration.test_llamacpp_messages import servers

__all__ = ["servers"]  # the llama.cpp + gateway fixture (route `small-chat` to llama.cpp's `smollm2`)

pytestmark = pytest.mark.llamacpp

ASK = "Name a colour."


@pytest.fixture(scope="module")
def clients(servers: tuple[ServerProcess, ServerProcess]) -> Iterator[tuple[openai.OpenAI, openai.OpenAI]]:
    llama, gw = servers
    own = openai.OpenAI(base_url=llama.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    ours = openai.OpenAI(base_url=gw.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    with own, ours:
        yield own, ours


def test_create_through_strait_matches_llamacpps_own(clients: tuple[openai.OpenAI, openai.OpenAI]) -> None:
    own_client, our_client = clients
    own = own_client.responses.create(model="smollm2", input=ASK, max_output_tokens=8, temperature=0)
    ours = our_client.responses.create(model="small-chat", input=ASK, max_output_tokens=8, temperature=0)
    assert ours.output_text == own.output_text and ours.output_text
    assert own.usage is not None and ours.usage is not None
    assert (ours.usage.input_tokens, ours.usage.output_tokens) == (own.usage.input_tokens, own.usage.output_tokens)
    assert ours.usage.output_tokens == 8
    assert ours.status == "incomplete" and ours.incomplete_details is not None
    assert ours.incomplete_details.reason == "max_output_tokens"
    assert ours.model == "small-chat" and ours.id.startswith("resp_")
    # Stored: the next turn continues it through llama.cpp.
    follow = our_client.responses.create(
        model="small-chat", input="Another one?", previous_response_id=ours.id, max_output_tokens=4, temperature=0
    )
    assert follow.output_text and follow.usage is not None
    assert follow.usage.input_tokens > ours.usage.input_tokens + ours.usage.output_tokens


def test_stream_through_strait_matches_llamacpps_own(clients: tuple[openai.OpenAI, openai.OpenAI]) -> None:
    own_stream = clients[0].responses.create(
        model="smollm2", input=ASK, max_output_tokens=8, temperature=0, stream=True
    )
    own_events = list(own_stream)
    own_text = "".join(e.delta for e in own_events if e.type == "response.output_text.delta")
    our_stream = clients[1].responses.create(
        model="small-chat", input=ASK, max_output_tokens=8, temperature=0, stream=True
    )
    events = list(our_stream)
    names = [e.type for e in events]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == own_text and text
    assert names[:2] == ["response.created", "response.in_progress"] and names[-1] == "response.incomplete"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1]
    assert final.type == "response.incomplete" and final.response.output_text == text
    assert final.response.usage is not None and final.response.usage.output_tokens == 8
