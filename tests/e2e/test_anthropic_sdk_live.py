"""`POST /v1/messages` and `/v1/messages/count_tokens` driven by the official `anthropic` SDK (2.17.0, in the
dev lock) against `strait serve`: what Claude Code's users and SDK users actually run, rather than the raw
HTTP shapes of test_anthropic_messages_live.py (whose gateway fixture and policy this module reuses).

The SDK's `base_url` is the gateway's root: it appends `/v1/messages` itself. It parses every answer into
its pydantic types, so a field Strait leaves out or an event out of order fails here, not in a user's app.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import anthropic
import pydantic
import pytest
from anthropic.types import JSONOutputFormatParam, Message, MessageParam, TextBlock, ToolParam, ToolUseBlock

from tests.e2e.conftest import Ledger
from tests.e2e.test_anthropic_messages_live import HELLO as HELLO_JSON
from tests.e2e.test_anthropic_messages_live import KEY, TIGHT_KEY, TIGHT_RPM, gw, in_order
from tests.e2e.test_anthropic_messages_live import TOOL as TOOL_JSON
from tests.harness.procs import ServerProcess

__all__ = ["gw"]  # the gateway fixture, imported (not copied) from the raw-HTTP module

# The raw module's request parts, as the SDK's parameter types.
HELLO = cast(list[MessageParam], HELLO_JSON)
TOOL = cast(ToolParam, TOOL_JSON)
# The SDK's own events that follow a raw event (helpers for the text, the tool input and the thinking so
# far); the wire events are the rest.
SDK_DERIVED_EVENTS = {"text", "input_json", "thinking", "signature", "citation"}


@pytest.fixture
def client(gw: ServerProcess) -> Iterator[anthropic.Anthropic]:
    # No retries: a refused request must surface as its error at once, and a retried one would hide a 5xx.
    with anthropic.Anthropic(base_url=gw.base_url, api_key=KEY, max_retries=0, timeout=30) as sdk:
        yield sdk


def _text(message: Message) -> str:
    return "".join(block.text for block in message.content if isinstance(block, TextBlock))


# ---- 1. create ----


@pytest.mark.parametrize("route", ["sim-chat", "gpt-fake"])
def test_create_is_parsed_into_the_sdks_message(client: anthropic.Anthropic, route: str) -> None:
    raw = client.messages.with_raw_response.create(model=route, max_tokens=32, messages=HELLO)
    message = raw.parse()
    assert isinstance(message, Message)
    assert message.type == "message" and message.role == "assistant" and message.model == route
    assert message.id.startswith("msg_")
    assert [block.type for block in message.content] == ["text"] and _text(message)
    assert message.stop_reason in ("end_turn", "max_tokens") and message.stop_sequence is None
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    assert raw.headers["request-id"]
    # The SDK reads the request id from that header for its error reports and `_request_id`.
    assert message._request_id == raw.headers["request-id"]


def test_max_tokens_stops_with_max_tokens(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model="gpt-fake", max_tokens=5, messages=HELLO)
    # The fake upstream answers exactly max_tokens words and says `length`.
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 5


# ---- 2. streaming with the SDK's helper ----


@pytest.mark.parametrize("route", ["sim-chat", "gpt-fake"])
def test_stream_helper_text_equals_the_final_message(client: anthropic.Anthropic, route: str) -> None:
    with client.messages.stream(model=route, max_tokens=12, messages=HELLO) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1, pieces  # streamed in deltas, not one block
    assert "".join(pieces) == _text(final) and _text(final)
    assert final.id.startswith("msg_") and final.model == route
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert final.usage.input_tokens > 0 and final.usage.output_tokens > 0


@pytest.mark.parametrize("tools", [[], [TOOL]], ids=["text", "tool_use"])
def test_stream_events_come_in_anthropics_order(client: anthropic.Anthropic, tools: list[ToolParam]) -> None:
    with client.messages.stream(model="sim-chat", max_tokens=12, messages=HELLO, tools=tools) as stream:
        seen: list[str] = [event.type for event in stream]
        final = stream.get_final_message()
    wire = [name for name in seen if name not in SDK_DERIVED_EVENTS]
    assert in_order(wire), wire
    assert wire.count("content_block_start") == len(final.content) >= 1
    if tools:
        assert "input_json" in seen and final.stop_reason == "tool_use"
    else:
        assert "text" in seen and final.stop_reason in ("end_turn", "max_tokens")


# ---- 3. tools: a tool_use answer, then the tool_result turn answered in text ----


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_loop(client: anthropic.Anthropic, stream: bool) -> None:
    def ask(messages: list[anthropic.types.MessageParam]) -> Message:
        if stream:
            with client.messages.stream(model="sim-chat", max_tokens=32, messages=messages, tools=[TOOL]) as s:
                return s.get_final_message()
        return client.messages.create(model="sim-chat", max_tokens=32, messages=messages, tools=[TOOL])

    turns: list[anthropic.types.MessageParam] = [{"role": "user", "content": "What is the weather in Oslo?"}]
    first = ask(turns)
    assert first.stop_reason == "tool_use"
    calls = [block for block in first.content if isinstance(block, ToolUseBlock)]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].id
    assert isinstance(calls[0].input, dict)
    turns += [
        {"role": "assistant", "content": first.content},  # the SDK's blocks sent back as they came
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": calls[0].id, "content": "sunny"}]},
    ]
    second = ask(turns)
    # The simulated model reads the tool's result and answers in text: the loop ends.
    assert second.stop_reason in ("end_turn", "max_tokens")
    assert [block.type for block in second.content] == ["text"] and _text(second)


def test_what_sdk_2_17_types_allow_is_accepted(client: anthropic.Anthropic, ledger: Ledger) -> None:
    """SDK 2.17 types allow a `system` message among the messages and `thinking: between_tools`: a chat
    upstream gets the system message where it stood; the thinking setting is accepted as enabled."""
    turns: list[MessageParam] = [*HELLO, {"role": "system", "content": "Now answer in French."}]
    client.messages.create(model="gpt-fake", max_tokens=4, messages=turns, thinking={"type": "between_tools"})
    sent = ledger.records()[-1]["body"]["messages"]
    assert sent[-1] == {"role": "system", "content": "Now answer in French."}


# ---- structured output: the SDK's `output_format` (sent as `output_config.format`) ----


class Weather(pydantic.BaseModel):
    city: str
    celsius: int


def test_structured_output_reaches_the_upstream_and_parses(client: anthropic.Anthropic, ledger: Ledger) -> None:
    """SDK 2.17's structured output: `messages.parse(output_format=Model)` sends `output_config.format`
    (a JSON schema). Ignoring it would hand the SDK's parser free text; Strait gives it to a chat upstream as
    `response_format` json_schema, and the simulated backend answers an instance of the schema."""
    parsed = client.messages.parse(model="sim-chat", max_tokens=64, messages=HELLO, output_format=Weather)
    assert isinstance(parsed.parsed_output, Weather)
    # The fake upstream ignores formats (its answer would not parse): what it was sent is the point here.
    schema: JSONOutputFormatParam = {"type": "json_schema", "schema": Weather.model_json_schema()}
    client.messages.create(model="gpt-fake", max_tokens=8, messages=HELLO, output_config={"format": schema})
    fmt = ledger.records()[-1]["body"]["response_format"]
    assert fmt["type"] == "json_schema"
    assert fmt["json_schema"]["schema"]["properties"].keys() == {"city", "celsius"}
    # A route whose models lack the `json` capability refuses it rather than answering free text: a 400
    # (capability_missing), the request asks for what no candidate has.
    with pytest.raises(anthropic.BadRequestError, match="supports json"):
        client.messages.parse(model="broken", max_tokens=8, messages=HELLO, output_format=Weather)


def test_an_output_schema_that_is_not_an_object_is_a_400(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as raised:
        client.messages.create(
            model="sim-chat",
            max_tokens=8,
            messages=HELLO,
            output_config={"format": {"type": "json_schema", "schema": cast(dict[str, object], [1])}},
        )
    assert "output_config.format.schema" in str(raised.value)


# ---- 4. count_tokens ----


def test_count_tokens(client: anthropic.Anthropic) -> None:
    counted = client.messages.count_tokens(model="sim-chat", system="Be brief.", messages=HELLO)
    assert counted.input_tokens > 0
    with_tools = client.messages.count_tokens(model="sim-chat", system="Be brief.", messages=HELLO, tools=[TOOL])
    assert with_tools.input_tokens > counted.input_tokens  # tool definitions count


# ---- 5. errors and both ways of sending the key ----


def test_a_bad_key_raises_authentication_error(gw: ServerProcess) -> None:
    with anthropic.Anthropic(base_url=gw.base_url, api_key="sk-wrong-0000", max_retries=0) as bad:
        with pytest.raises(anthropic.AuthenticationError) as raised:
            bad.messages.create(model="sim-chat", max_tokens=4, messages=HELLO)
        with pytest.raises(anthropic.AuthenticationError):
            bad.messages.count_tokens(model="sim-chat", messages=HELLO)
    assert raised.value.status_code == 401
    assert raised.value.request_id  # read from Strait's request-id header
    assert "sk-wrong-0000" not in str(raised.value)


def test_a_malformed_request_raises_bad_request_with_straits_message(client: anthropic.Anthropic) -> None:
    # The SDK refuses a call without max_tokens itself (a required argument), so the malformed request it
    # lets through is a role Messages does not have.
    with pytest.raises(anthropic.BadRequestError) as raised:
        client.messages.create(
            model="sim-chat", max_tokens=4, messages=[cast(MessageParam, {"role": "robot", "content": "hi"})]
        )
    assert raised.value.status_code == 400
    body = raised.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert "role" in body["error"]["message"] and body["error"]["message"] in str(raised.value)


def test_an_unknown_model_raises_not_found(client: anthropic.Anthropic) -> None:
    # README: an unknown route is Anthropic's 404 not_found_error.
    with pytest.raises(anthropic.NotFoundError) as raised:
        client.messages.create(model="no-such-route", max_tokens=4, messages=HELLO)
    assert raised.value.status_code == 404
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="no-such-route", messages=HELLO)


def test_the_model_list_reads_as_anthropics(client: anthropic.Anthropic) -> None:
    # /v1/models carries Anthropic's fields beside OpenAI's: the SDK's types are filled, not None.
    page = client.models.list()
    ids = [m.id for m in page.data]
    assert "sim-chat" in ids and page.has_more is False
    assert page.first_id == ids[0] and page.last_id == ids[-1]
    card = client.models.retrieve("sim-chat")
    assert (card.type, card.display_name) == ("model", "sim-chat")
    assert card.created_at.year >= 2026  # the gateway's start, parsed by the SDK as a datetime


def test_bearer_auth_token_is_accepted_as_well_as_x_api_key(gw: ServerProcess) -> None:
    # api_key= sends `x-api-key`; auth_token= sends `Authorization: Bearer` (an LLM gateway's usual form).
    with anthropic.Anthropic(base_url=gw.base_url, auth_token=KEY, max_retries=0) as bearer:
        message = bearer.messages.create(model="sim-chat", max_tokens=8, messages=HELLO)
    assert message.usage.output_tokens > 0
    bad = anthropic.Anthropic(base_url=gw.base_url, auth_token="sk-wrong-0000", max_retries=0)
    with bad, pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(model="sim-chat", max_tokens=8, messages=HELLO)


def test_a_stream_that_fails_upstream_raises_in_the_sdk(client: anthropic.Anthropic) -> None:
    """The answer started (200) then the upstream failed: Strait's `event: error` is what makes the SDK
    raise instead of handing the application a message that silently stops short."""
    pieces: list[str] = []
    stream = client.messages.stream(model="broken", max_tokens=12, messages=HELLO)
    with pytest.raises(anthropic.APIStatusError) as raised, stream as events:
        for piece in events.text_stream:
            pieces.append(piece)
    assert pieces, "the error came before any text: not the mid-stream case"
    body = raised.value.body
    assert isinstance(body, dict) and body["type"] == "error" and body["error"]["type"] == "api_error"
    assert raised.value.request_id  # the stream's request-id header


def test_a_rate_limited_tenant_gets_rate_limit_error_with_retry_after(gw: ServerProcess) -> None:
    """This module's gateway is its own process, so the tight tenant's minute starts here."""
    tight = anthropic.Anthropic(base_url=gw.base_url, api_key=TIGHT_KEY, max_retries=0)
    with tight:
        for _ in range(TIGHT_RPM):
            tight.messages.create(model="sim-chat", max_tokens=4, messages=HELLO)
        with pytest.raises(anthropic.RateLimitError) as raised:
            tight.messages.create(model="sim-chat", max_tokens=4, messages=HELLO)
    assert raised.value.status_code == 429
    # What the SDK's own retry waits on (it honours retry-after up to a minute).
    assert 0 < float(raised.value.response.headers["retry-after"]) <= 120


# ---- 6. the async client ----


async def test_async_client_streams(gw: ServerProcess) -> None:
    sdk = anthropic.AsyncAnthropic(base_url=gw.base_url, api_key=KEY, max_retries=0, timeout=30)
    async with sdk, sdk.messages.stream(model="sim-chat", max_tokens=12, messages=HELLO) as stream:
        pieces = [piece async for piece in stream.text_stream]
        final = await stream.get_final_message()
    assert len(pieces) > 1 and "".join(pieces) == _text(final)
    assert final.stop_reason in ("end_turn", "max_tokens") and final.usage.output_tokens > 0
