"""`POST /v1/responses` (OpenAI Responses) driven by the official `openai` SDK (in the dev lock) against
`strait serve`, in front of the simulated backend and the fake OpenAI upstream: create, instructions, a
function-tool loop, structured output, streaming (the SDK's helper and raw events), `previous_response_id`,
GET/DELETE of stored responses, tenants kept apart, `store: false`, an upstream failing mid-stream, and
limits and usage records as on /v1/chat/completions.

The SDK parses every answer into its pydantic types and checks the stream's item identities, so a field
Strait leaves out or an event out of order fails here, not in a user's app.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pydantic
import pytest
from openai.types.responses import FunctionToolParam, Response, ResponseFunctionToolCall, ResponseInputItemParam

from gateway.policy.index import key_digest
from tests.e2e.conftest import Ledger
from tests.harness.gateway import gateway_process
from tests.harness.procs import ServerProcess
from tests.harness.waiting import wait_until

KEY = "sk-responses-alpha-0001"
OTHER_KEY = "sk-responses-beta-0002"
TIGHT_KEY = "sk-responses-tight-0003"
TIGHT_RPM = 2
TOOLS: list[FunctionToolParam] = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        "strict": True,
    }
]
# The order of a streamed text item's events (deltas repeat), as OpenAI sends them.
TEXT_ITEM = [
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]
CALL_ITEM = [
    "response.output_item.added",
    "response.function_call_arguments.delta",
    "response.function_call_arguments.done",
    "response.output_item.done",
]


def _policy(fake_url: str) -> str:
    return f"""
version: 1
backends:
  - {{name: fake, adapter: openai, base_url: "{fake_url}/v1"}}
  - {{name: sim, adapter: simulated, simulated: {{ttft_ms: 1, tokens_per_second: 5000, output_tokens: 12}}}}
models:
  - {{name: fake-m, capabilities: [chat, tools, vision, json], deployments: [{{backend: fake, upstream_model: fake-model}}]}}
  - {{name: broken-m, deployments: [{{backend: fake, upstream_model: "fault:error-event-after-2"}}]}}
  - {{name: sim-m, capabilities: [chat, tools, json], deployments: [{{backend: sim, upstream_model: sim-1}}]}}
routes:
  - {{name: gpt-fake, models: [fake-m]}}
  - {{name: broken, models: [broken-m]}}
  - {{name: sim-chat, models: [sim-m]}}
tenants:
  - name: alpha
    keys: [{{id: a-1, digest: "{key_digest(KEY)}"}}]
  - name: beta
    keys: [{{id: b-1, digest: "{key_digest(OTHER_KEY)}"}}]
  - name: tight
    keys: [{{id: t-1, digest: "{key_digest(TIGHT_KEY)}"}}]
    allowed_routes: [sim-chat]
    limits: {{tenant: {{requests_per_minute: {TIGHT_RPM}}}}}
"""


@pytest.fixture(scope="module")
def gw(fake_upstream: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("gw-responses")
    policy = folder / "policy.yaml"
    policy.write_text(_policy(fake_upstream.base_url))
    log = folder / "gateway.log"
    with gateway_process(policy, log_path=log) as proc:
        yield proc
    assert KEY not in log.read_text(errors="replace"), "a client key reached the gateway log"


def _client(gw: ServerProcess, key: str = KEY) -> openai.OpenAI:
    # No retries: a refused request must surface as its error at once, and a retried one would hide a 5xx.
    return openai.OpenAI(base_url=gw.base_url + "/v1", api_key=key, max_retries=0, timeout=30)


@pytest.fixture
def client(gw: ServerProcess) -> Iterator[openai.OpenAI]:
    with _client(gw) as sdk:
        yield sdk


@pytest.fixture
def other(gw: ServerProcess) -> Iterator[openai.OpenAI]:
    with _client(gw, OTHER_KEY) as sdk:
        yield sdk


def _sent(ledger: Ledger) -> dict[str, Any]:
    """The chat body the fake upstream got last."""
    body: dict[str, Any] = ledger.records()[-1]["body"]
    return body


# ---- create ----


@pytest.mark.parametrize("route", ["sim-chat", "gpt-fake"])
def test_create_is_parsed_into_the_sdks_response(client: openai.OpenAI, route: str) -> None:
    raw = client.responses.with_raw_response.create(model=route, input="Say hello", max_output_tokens=64)
    response = raw.parse()
    assert isinstance(response, Response)
    assert response.id.startswith("resp_") and response.object == "response" and response.model == route
    assert response.status == "completed" and response.error is None and response.incomplete_details is None
    assert [item.type for item in response.output] == ["message"]
    assert response.output_text  # the SDK's own property, from the output_text parts
    usage = response.usage
    assert usage is not None and usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens == 0 and usage.output_tokens_details.reasoning_tokens == 0
    assert response._request_id == raw.headers["x-request-id"]
    assert raw.headers["x-strait-route"] == route


def test_instructions_and_settings_reach_the_upstream_as_a_chat_body(client: openai.OpenAI, ledger: Ledger) -> None:
    response = client.responses.create(
        model="gpt-fake",
        instructions="Answer in French.",
        input=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        max_output_tokens=7,
        temperature=0.2,
        top_p=0.9,
        reasoning={"effort": "low"},
        metadata={"ticket": "T-1"},
        extra_body={"some_future_field": {"x": 1}},  # unknown fields are tolerated
    )
    sent = _sent(ledger)
    assert sent["messages"] == [
        {"role": "system", "content": "Answer in French."},
        {"role": "system", "content": "Be brief."},  # developer: a chat engine's system message
        {"role": "user", "content": "Hello"},
    ]
    assert (sent["max_tokens"], sent["temperature"], sent["top_p"]) == (7, 0.2, 0.9)
    assert sent["reasoning_effort"] == "low" and "some_future_field" not in sent
    # The response repeats the request's settings, as OpenAI's does.
    assert response.instructions == "Answer in French." and response.max_output_tokens == 7
    assert response.metadata == {"ticket": "T-1"} and response.reasoning is not None
    assert response.reasoning.effort == "low"


def test_max_output_tokens_makes_an_incomplete_response(client: openai.OpenAI) -> None:
    response = client.responses.create(model="gpt-fake", input="Say hello", max_output_tokens=5)
    # The fake upstream answers exactly max_tokens words and says `length`.
    assert response.status == "incomplete"
    assert response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == 5
    assert response.output[0].type == "message" and response.output[0].status == "incomplete"


class Weather(pydantic.BaseModel):
    city: str
    celsius: int


def test_structured_output_with_the_sdks_parse(client: openai.OpenAI, ledger: Ledger) -> None:
    parsed = client.responses.parse(model="sim-chat", input="Weather in Oslo as JSON", text_format=Weather)
    assert isinstance(parsed.output_parsed, Weather)
    schema = Weather.model_json_schema()
    fmt_param: Any = {"type": "json_schema", "name": "Weather", "schema": schema, "strict": True}
    client.responses.create(model="gpt-fake", input="Weather in Oslo as JSON", text={"format": fmt_param})
    fmt = _sent(ledger)["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "Weather"
    assert fmt["json_schema"]["strict"] is True and fmt["json_schema"]["schema"]["required"] == ["city", "celsius"]


def test_json_object_format(client: openai.OpenAI, ledger: Ledger) -> None:
    response = client.responses.create(
        model="sim-chat", input="Give me JSON", text={"format": {"type": "json_object"}}, max_output_tokens=200
    )
    assert isinstance(json.loads(response.output_text), dict)


# ---- tools ----


@pytest.mark.parametrize("stream", [False, True])
def test_a_function_tool_loop(client: openai.OpenAI, stream: bool) -> None:
    def ask(items: list[ResponseInputItemParam]) -> Response:
        if stream:
            with client.responses.stream(model="sim-chat", input=items, tools=TOOLS) as s:
                return s.get_final_response()
        return client.responses.create(model="sim-chat", input=items, tools=TOOLS)

    items: list[ResponseInputItemParam] = [{"role": "user", "content": "What is the weather in Oslo?"}]
    first = ask(items)
    calls = [item for item in first.output if isinstance(item, ResponseFunctionToolCall)]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id
    assert isinstance(json.loads(calls[0].arguments), dict)
    # The SDK's output items sent back as they came, then the tool's result.
    items += [*first.output, {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"}]  # type: ignore[list-item]
    second = ask(items)
    # The simulated model reads the tool's result and answers in text: the loop ends.
    assert [item.type for item in second.output] == ["message"] and second.output_text


def test_tool_turns_reach_an_openai_upstream_as_tool_calls_and_tool_messages(
    client: openai.OpenAI, ledger: Ledger
) -> None:
    items: list[ResponseInputItemParam] = [
        {"role": "user", "content": "Weather?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Oslo"}'},
        {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": '{"city":"Bergen"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "rain"},
        {"type": "function_call_output", "call_id": "call_2", "output": "sun"},
    ]
    client.responses.create(model="gpt-fake", input=items, tools=TOOLS, tool_choice="auto", parallel_tool_calls=False)
    sent = _sent(ledger)
    # Parallel calls: one assistant message holding both, then one tool message per result.
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "tool", "tool"]
    calls = sent["messages"][1]["tool_calls"]
    assert [(c["id"], c["function"]["arguments"]) for c in calls] == [
        ("call_1", '{"city":"Oslo"}'),
        ("call_2", '{"city":"Bergen"}'),
    ]
    assert sent["messages"][3] == {"role": "tool", "tool_call_id": "call_2", "content": "sun"}
    assert sent["tools"][0] == {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": TOOLS[0]["parameters"],
        },
    }
    assert sent["tool_choice"] == "auto" and sent["parallel_tool_calls"] is False


def test_a_forced_function_is_named_in_the_chat_body(client: openai.OpenAI, ledger: Ledger) -> None:
    client.responses.create(
        model="gpt-fake", input="Weather?", tools=TOOLS, tool_choice={"type": "function", "name": "get_weather"}
    )
    assert _sent(ledger)["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize("tool", ["web_search", "file_search", "code_interpreter"])
def test_built_in_tools_are_refused_naming_the_tool(client: openai.OpenAI, ledger: Ledger, tool: str) -> None:
    before = ledger.count()
    spec: Any = {"type": tool} if tool != "file_search" else {"type": tool, "vector_store_ids": ["vs_1"]}
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="gpt-fake", input="Search", tools=[spec])
    assert f"'{tool}'" in caught.value.message and caught.value.param == "tools[0].type"
    assert ledger.count() == before  # refused before any upstream call


# ---- streaming ----


def _collapsed(names: list[str]) -> list[str]:
    """Consecutive deltas as one (their number depends on the chunking)."""
    out: list[str] = []
    for name in names:
        if not (out and out[-1] == name and name.endswith(".delta")):
            out.append(name)
    return out


@pytest.mark.parametrize("route", ["sim-chat", "gpt-fake"])
def test_stream_events_come_in_openais_order(client: openai.OpenAI, route: str) -> None:
    stream = client.responses.create(model=route, input="Say hello", stream=True)
    events = list(stream)
    names = [event.type for event in events]
    assert _collapsed(names) == ["response.created", "response.in_progress", *TEXT_ITEM, "response.completed"]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1]
    assert final.type == "response.completed"
    assert deltas == final.response.output_text and deltas
    assert final.response.usage is not None and final.response.usage.output_tokens > 0
    created = events[0]
    assert created.type == "response.created" and created.response.id == final.response.id
    assert created.response.status == "in_progress"


def test_stream_helper_text_equals_the_final_response(client: openai.OpenAI) -> None:
    with client.responses.stream(model="sim-chat", input="Say hello") as stream:
        pieces = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert len(pieces) > 1  # streamed in deltas, not one block
    assert "".join(pieces) == final.output_text and final.status == "completed"


def test_a_streamed_function_call(client: openai.OpenAI) -> None:
    with client.responses.stream(model="sim-chat", input="Weather in Oslo?", tools=TOOLS) as stream:
        names = [event.type for event in stream]
        final = stream.get_final_response()
    assert _collapsed(names) == ["response.created", "response.in_progress", *CALL_ITEM, "response.completed"]
    (call,) = final.output
    assert isinstance(call, ResponseFunctionToolCall) and call.status == "completed"
    assert json.loads(call.arguments) and call.call_id


def test_a_stream_that_fails_upstream_raises_in_the_sdk(client: openai.OpenAI) -> None:
    seen: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        for event in client.responses.create(model="broken", input="Say hello", stream=True):
            seen.append(event.type)
    assert "response.output_text.delta" in seen and "response.completed" not in seen
    assert seen[-1] == "response.failed"  # the output so far, with its error, then the error event
    assert caught.value.message
    with pytest.raises(openai.APIError), client.responses.stream(model="broken", input="Say hello") as stream:
        for _ in stream:
            pass


def test_a_failed_stream_is_not_stored(gw: ServerProcess) -> None:
    body = {"model": "broken", "input": "Say hello", "stream": True}
    headers = {"authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", gw.base_url + "/v1/responses", json=body, headers=headers, timeout=30) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    failed = json.loads(lines[-2][6:])
    assert failed["type"] == "response.failed" and failed["response"]["error"]["message"]
    rid = failed["response"]["id"]
    assert httpx.get(f"{gw.base_url}/v1/responses/{rid}", headers=headers, timeout=10).status_code == 404


# ---- stored responses: previous_response_id, GET, DELETE, tenants, store=false ----


@pytest.mark.parametrize("stream", [False, True])
def test_previous_response_id_continues_the_conversation(client: openai.OpenAI, ledger: Ledger, stream: bool) -> None:
    def ask(**fields: Any) -> Response:
        if stream:
            with client.responses.stream(model="gpt-fake", **fields) as s:
                return s.get_final_response()
        return client.responses.create(model="gpt-fake", **fields)

    first = ask(input="My name is Ada.", instructions="Be brief.")
    second = ask(input="What is my name?", previous_response_id=first.id)
    sent = _sent(ledger)["messages"]
    # The stored conversation first (instructions are not carried over, as OpenAI's are not).
    assert sent == [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"},
    ]
    assert second.previous_response_id == first.id
    third = ask(input="And again?", previous_response_id=second.id)
    assert len(_sent(ledger)["messages"]) == 5 and third.status == "completed"


def test_get_returns_the_stored_response_and_delete_removes_it(client: openai.OpenAI, gw: ServerProcess) -> None:
    created = client.responses.create(model="sim-chat", input="Say hello")
    fetched = client.responses.retrieve(created.id)
    assert fetched.model_dump() == created.model_dump()
    second = client.responses.create(model="sim-chat", input="Once more", previous_response_id=created.id)
    items = client.responses.input_items.list(second.id, order="asc")
    assert [item.type for item in items.data] == ["message", "message", "message"]
    headers = {"authorization": f"Bearer {KEY}"}
    deleted = httpx.delete(f"{gw.base_url}/v1/responses/{created.id}", headers=headers, timeout=10)
    assert deleted.status_code == 200
    assert deleted.json() == {"id": created.id, "object": "response.deleted", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model="sim-chat", input="Again", previous_response_id=created.id)
    assert caught.value.param == "previous_response_id"


def test_another_tenants_response_is_not_found(client: openai.OpenAI, other: openai.OpenAI) -> None:
    mine = client.responses.create(model="sim-chat", input="A secret")
    with pytest.raises(openai.NotFoundError) as unknown:
        other.responses.retrieve("resp_req_000000000000000000000000")
    with pytest.raises(openai.NotFoundError) as foreign:
        other.responses.retrieve(mine.id)
    # The same answer as for an id that never existed (the id itself aside): no existence leak.
    assert foreign.value.body == {**unknown.value.body, "message": f"Response with id '{mine.id}' not found."}  # type: ignore[dict-item]
    with pytest.raises(openai.NotFoundError):
        other.responses.create(model="sim-chat", input="Go on", previous_response_id=mine.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(mine.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.input_items.list(mine.id)
    assert client.responses.retrieve(mine.id).id == mine.id  # still there for its own tenant


def test_store_false_is_not_retrievable(client: openai.OpenAI) -> None:
    response = client.responses.create(model="sim-chat", input="Forget this", store=False)
    assert response.status == "completed"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="sim-chat", input="Go on", previous_response_id=response.id)


def test_stored_endpoints_need_a_key(gw: ServerProcess, client: openai.OpenAI) -> None:
    mine = client.responses.create(model="sim-chat", input="Say hello")
    assert httpx.get(f"{gw.base_url}/v1/responses/{mine.id}", timeout=10).status_code == 401
    bad = {"authorization": "Bearer sk-wrong"}
    assert httpx.delete(f"{gw.base_url}/v1/responses/{mine.id}", headers=bad, timeout=10).status_code == 401


# ---- bad input ----


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "sim-chat", "input": 5}, "input"),
        ({"model": "sim-chat"}, "input"),
        ({"model": "sim-chat", "input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        ({"model": "sim-chat", "input": [{"type": "computer_call", "id": "c"}]}, "input[0].type"),
        ({"model": "sim-chat", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": "sim-chat", "input": "x", "temperature": "hot"}, "temperature"),
        ({"model": "sim-chat", "input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}}, None),
        ({"model": "sim-chat", "input": "x", "tool_choice": {"type": "web_search_preview"}}, "tool_choice.type"),
        ({"model": "sim-chat", "input": "x", "background": True}, "background"),
        ({"model": "sim-chat", "input": "x", "api_base": "http://evil"}, "api_base"),
    ],
)
def test_bad_input_is_a_400_in_openais_envelope(
    gw: ServerProcess, ledger: Ledger, body: dict[str, Any], param: str | None
) -> None:
    before = ledger.count()
    response = httpx.post(
        gw.base_url + "/v1/responses", json=body, headers={"authorization": f"Bearer {KEY}"}, timeout=10
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param
    assert ledger.count() == before


def test_unknown_model_and_key_are_404_and_401(gw: ServerProcess, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="no-such-route", input="x")
    with _client(gw, "sk-unknown") as stranger, pytest.raises(openai.AuthenticationError):
        stranger.responses.create(model="sim-chat", input="x")


# ---- limits and usage records apply as on /v1/chat/completions ----


async def test_limits_and_usage_records_apply_to_responses(gw: ServerProcess) -> None:
    async with openai.AsyncOpenAI(base_url=gw.base_url + "/v1", api_key=TIGHT_KEY, max_retries=0) as tight:
        answers = [await tight.responses.create(model="sim-chat", input="Hi", store=False) for _ in range(TIGHT_RPM)]
        with pytest.raises(openai.RateLimitError) as caught:
            await tight.responses.create(model="sim-chat", input="Hi")
        assert 0 < float(caught.value.response.headers["retry-after"]) <= 120
    spent_in = sum(a.usage.input_tokens for a in answers if a.usage is not None)
    spent_out = sum(a.usage.output_tokens for a in answers if a.usage is not None)
    headers = {"authorization": f"Bearer {TIGHT_KEY}"}
    async with httpx.AsyncClient(base_url=gw.base_url, headers=headers, timeout=30) as http:

        async def recorded() -> bool:
            rows = (await http.get("/v1/usage?by=route")).json()["data"]
            row = next((r for r in rows if r["value"] == "sim-chat"), None)
            return row is not None and row["requests"] >= TIGHT_RPM

        await wait_until(recorded, timeout=15)
        rows = (await http.get("/v1/usage?by=route")).json()["data"]
    row = next(r for r in rows if r["value"] == "sim-chat")
    # The records the chat route writes: under the route name, with the tokens the client was shown.
    assert (row["requests"], row["prompt_tokens"], row["completion_tokens"]) == (TIGHT_RPM, spent_in, spent_out)
