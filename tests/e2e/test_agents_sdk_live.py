"""The OpenAI Agents SDK (`openai-agents`, in the dev lock) with its default model, the Responses one, against
`strait serve`: an agent with two function tools runs its loop through `POST /v1/responses` (each tool called
in turn, then a text answer), whole and streamed. The upstream is the fake's `tools-in-turn` model (it calls
each offered tool once, in order, then answers), behind the route `agent` of test_responses_sdk_live.py's
gateway, whose fixture this module imports."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from agents import Agent, RunConfig, Runner, function_tool
from agents.models.openai_provider import OpenAIProvider

from tests.e2e.conftest import Ledger
from tests.e2e.test_responses_sdk_live import KEY, gw
from tests.harness.procs import ServerProcess

__all__ = ["gw"]  # the gateway fixture, imported (not copied)


@pytest.mark.parametrize("stream", [False, True])
async def test_an_agent_runs_a_two_tool_loop(gw: ServerProcess, ledger: Ledger, stream: bool) -> None:
    calls: list[tuple[str, str]] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(("get_weather", city))
        return f"Sunny in {city}"

    @function_tool
    def get_time(city: str) -> str:
        """The local time in a city."""
        calls.append(("get_time", city))
        return "12:00"

    client = openai.AsyncOpenAI(base_url=gw.base_url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    # The SDK's default provider and model class (Responses), given the gateway's client; no traces sent.
    config = RunConfig(model_provider=OpenAIProvider(openai_client=client), tracing_disabled=True)
    agent = Agent(name="assistant", instructions="Use the tools.", tools=[get_weather, get_time], model="agent")
    before = ledger.count()
    if stream:
        run = Runner.run_streamed(agent, "Weather and time in Oslo?", run_config=config)
        kinds = [event.type async for event in run.stream_events()]
        assert "raw_response_event" in kinds and "run_item_stream_event" in kinds
        final: Any = run.final_output
    else:
        result = await Runner.run(agent, "Weather and time in Oslo?", run_config=config)
        final = result.final_output
    await client.close()
    assert [name for name, _ in calls] == ["get_weather", "get_time"]
    assert isinstance(final, str) and final
    # Three model calls, each a Responses request translated to a chat body; the last carries both results.
    records = ledger.records()[before:]
    assert len(records) == 3
    last = records[-1]["body"]["messages"]
    assert [m["role"] for m in last] == ["system", "user", "assistant", "tool", "assistant", "tool"]
    assert [m["content"] for m in last if m["role"] == "tool"] == [f"Sunny in {calls[0][1]}", "12:00"]
