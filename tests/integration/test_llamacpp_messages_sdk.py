"""The official `anthropic` SDK against a real llama.cpp server twice: its own `/v1/messages` (xllamacpp
serves it) and Strait in front of it (translated to llama.cpp's chat endpoint). At temperature 0 the SDK
must get the same message, the same streamed text and the same raw event sequence from both.

The servers (llama.cpp and the gateway before it) are test_llamacpp_messages.py's fixture, imported."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import pytest
from anthropic.types import Message, MessageParam, TextBlock

from tests.harness.procs import ServerProcess
from tests.integration.test_llamacpp_messages import servers

__all__ = ["servers"]  # the llama.cpp + gateway fixture

pytestmark = pytest.mark.llamacpp

ASK: list[MessageParam] = [{"role": "user", "content": "Name a colour."}]
# SDK 2.17 has no `temperature` argument any more; the field still goes on the wire through extra_body.
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def clients(servers: tuple[ServerProcess, ServerProcess]) -> Iterator[tuple[anthropic.Anthropic, anthropic.Anthropic]]:
    llama, gw = servers
    own = anthropic.Anthropic(base_url=llama.base_url, api_key="unused", max_retries=0, timeout=120)
    ours = anthropic.Anthropic(base_url=gw.base_url, api_key="unused", max_retries=0, timeout=120)
    with own, ours:
        yield own, ours


def _text(message: Message) -> str:
    return "".join(block.text for block in message.content if isinstance(block, TextBlock))


def test_create_through_strait_matches_llamacpps_own(clients: tuple[anthropic.Anthropic, anthropic.Anthropic]) -> None:
    own_client, our_client = clients
    own = own_client.messages.create(model="smollm2", max_tokens=8, messages=ASK, extra_body=GREEDY)
    ours = our_client.messages.create(model="small-chat", max_tokens=8, messages=ASK, extra_body=GREEDY)
    assert _text(ours) == _text(own) and _text(ours)
    assert ours.stop_reason == own.stop_reason == "max_tokens"
    assert ours.usage.output_tokens == own.usage.output_tokens == 8
    assert ours.model == "small-chat" and ours.id.startswith("msg_")


def test_stream_through_strait_matches_llamacpps_own(clients: tuple[anthropic.Anthropic, anthropic.Anthropic]) -> None:
    def run(client: anthropic.Anthropic, model: str) -> tuple[list[str], str, Message]:
        with client.messages.stream(model=model, max_tokens=8, messages=ASK, extra_body=GREEDY) as stream:
            names: list[str] = []
            for event in stream:
                # Consecutive deltas (and the SDK's own `text` helper events) as one: the chunking may differ.
                if event.type not in ("ping", "text") and not (
                    names and names[-1] == event.type == "content_block_delta"
                ):
                    names.append(event.type)
            return (
                names,
                "".join(b.text for b in stream.current_message_snapshot.content if b.type == "text"),
                stream.get_final_message(),
            )

    own_names, own_text, own = run(clients[0], "smollm2")
    names, text, ours = run(clients[1], "small-chat")
    assert names == own_names
    assert text == own_text == _text(ours) and text
    assert ours.stop_reason == own.stop_reason and ours.usage.output_tokens == own.usage.output_tokens
