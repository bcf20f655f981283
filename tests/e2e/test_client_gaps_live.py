"""The client gaps of issue 11 through `strait serve` in front of the fake OpenAI upstream: requests that
other upstreams accept but OpenAI's product limits would refuse reach the upstream as the client wrote them."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Literal

import httpx
import openai
import pydantic
import pytest

from gateway.tokens import DATA_DIR, encoding
from tests.e2e.conftest import ALPHA_KEY, Ledger
from tests.harness.procs import ServerProcess

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


# ---- custom (freeform) tools and tool types Strait does not know ----

CUSTOM_TOOL = {
    "type": "custom",
    "custom": {
        "name": "run_sql",
        "description": "Runs one SQL query",
        "format": {"type": "grammar", "grammar": {"syntax": "regex", "definition": "SELECT .+;"}},
    },
}
BUILT_IN_TOOL = {"type": "web_search_preview", "search_context_size": "low"}


def test_custom_and_unknown_tool_types_pass_through_byte_for_byte(gateway: ServerProcess, ledger: Ledger) -> None:
    body = json.dumps(
        {
            "model": "gpt-fake",
            "messages": USER,
            "tools": [CUSTOM_TOOL, BUILT_IN_TOOL],
            "tool_choice": {"type": "custom", "custom": {"name": "run_sql"}},
            "max_tokens": 5,
        }
    ).encode()
    r = httpx.post(
        gateway.base_url + "/v1/chat/completions",
        content=body,
        headers={"authorization": f"Bearer {ALPHA_KEY}", "content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    sent = base64.b64decode(ledger.records()[-1]["body_b64"])
    assert sent == body.replace(b'"gpt-fake"', b'"fake-model"')


def test_the_openai_sdk_sends_custom_tools_and_their_calls_back(client: openai.OpenAI, ledger: Ledger) -> None:
    history: list[Any] = [
        *USER,
        {
            "role": "assistant",
            "tool_calls": [{"id": "call_1", "type": "custom", "custom": {"name": "run_sql", "input": "SELECT 1;"}}],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "1"},
    ]
    client.chat.completions.create(model="gpt-fake", messages=history, tools=[CUSTOM_TOOL], max_tokens=5)
    sent = _sent(ledger)
    assert sent["tools"] == [CUSTOM_TOOL]
    assert sent["messages"][1]["tool_calls"][0]["custom"] == {"name": "run_sql", "input": "SELECT 1;"}


def test_the_simulated_backend_calls_a_custom_tool(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="sim-chat", messages=USER, tools=[CUSTOM_TOOL])
    call = (reply.choices[0].message.tool_calls or [])[0]
    assert call.type == "custom" and call.custom.name == "run_sql" and call.custom.input
    streamed = list(client.chat.completions.create(model="sim-chat", messages=USER, tools=[CUSTOM_TOOL], stream=True))
    deltas = [d for c in streamed for d in (c.choices[0].delta.tool_calls or []) if c.choices]
    assert deltas and deltas[0].model_dump()["custom"]["name"] == "run_sql"


def test_a_backend_that_cannot_carry_a_tool_type_refuses_it_clearly(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="sim-chat", messages=USER, tools=[BUILT_IN_TOOL])  # type: ignore[list-item]
    assert "cannot run tools of type 'web_search_preview'" in info.value.message
    assert isinstance(info.value.body, dict) and info.value.body.get("code") == "unsupported_tool_type"


# ---- embeddings given as token arrays (cl100k_base ids, as LangChain's OpenAIEmbeddings sends them) ----

RED_APPLES = [1171, 41776]  # "red apples" in cl100k_base


def test_token_arrays_reach_a_model_of_another_vocabulary_as_text(client: openai.OpenAI, ledger: Ledger) -> None:
    # `fake-embed` declares no tokenizer (o200k_base): its ids would mean other words.
    reply = client.embeddings.create(model="embed", input=[RED_APPLES, [15339, 1917]], encoding_format="float")
    assert len(reply.data) == 2
    assert _sent(ledger)["input"] == ["red apples", "hello world"]
    client.embeddings.create(model="embed", input=RED_APPLES, encoding_format="float")  # one array
    assert _sent(ledger)["input"] == "red apples"


def test_a_completion_prompt_of_token_ids_reaches_the_model_as_text(client: openai.OpenAI, ledger: Ledger) -> None:
    client.completions.create(model="gpt-fake", prompt=RED_APPLES, max_tokens=3)
    assert _sent(ledger)["prompt"] == "red apples"
    client.completions.create(model="gpt-fake", prompt=[RED_APPLES, [15339, 1917]], max_tokens=3)
    assert _sent(ledger)["prompt"] == ["red apples", "hello world"]
    client.completions.create(model="gpt-fake", prompt="as text", max_tokens=3)
    assert _sent(ledger)["prompt"] == "as text"


def test_token_arrays_reach_a_cl100k_model_unchanged(client: openai.OpenAI, ledger: Ledger) -> None:
    client.embeddings.create(model="embed-cl100k", input=[RED_APPLES], encoding_format="float")
    sent = _sent(ledger)
    assert sent["input"] == [RED_APPLES] and sent["model"] == "text-embedding-3-large"


def test_the_simulated_backend_embeds_token_arrays_as_their_text(client: openai.OpenAI) -> None:
    as_tokens = client.embeddings.create(model="sim-chat", input=[RED_APPLES], encoding_format="float")
    as_text = client.embeddings.create(model="sim-chat", input=["red apples"], encoding_format="float")
    assert as_tokens.data[0].embedding == as_text.data[0].embedding


def test_an_id_cl100k_does_not_have_is_a_400_naming_the_input(client: openai.OpenAI, ledger: Ledger) -> None:
    before = ledger.count()
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="embed", input=[RED_APPLES, [1171, 100261]])
    assert "100261" in info.value.message and "cl100k_base" in info.value.message
    assert isinstance(info.value.body, dict) and info.value.body.get("param") == "input[1]"
    assert ledger.count() == before


def test_langchain_openai_embeddings_default_reaches_the_model_as_text(
    gateway: ServerProcess, ledger: Ledger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LangChain tokenizes with tiktoken's cl100k_base and sends the ids: offline, from the bundled file."""
    from langchain_openai import OpenAIEmbeddings

    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    shutil.copy(DATA_DIR / "cl100k_base.tiktoken", tmp_path / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))

    def embedder(route: str) -> OpenAIEmbeddings:
        return OpenAIEmbeddings(
            model=route,
            tiktoken_model_name="text-embedding-3-small",
            base_url=gateway.base_url + "/v1",
            api_key=ALPHA_KEY,  # type: ignore[arg-type]
            max_retries=0,
        )

    # To a cl100k model, LangChain's ids arrive as ids: it did send token arrays.
    embedder("embed-cl100k").embed_documents(["red apples", "green pears"])
    assert _sent(ledger)["input"] == [RED_APPLES, encoding("cl100k_base").encode("green pears")]
    vectors = embedder("embed").embed_documents(["red apples", "green pears"])
    assert len(vectors) == 2
    assert _sent(ledger)["input"] == ["red apples", "green pears"]


# ---- the simulated backend: structured output and the end of a tool loop (what `make run` serves) ----


class Step(pydantic.BaseModel):
    explanation: str
    output: int = pydantic.Field(ge=1, le=10)


class MathAnswer(pydantic.BaseModel):
    steps: list[Step] = pydantic.Field(min_length=1)
    verdict: Literal["right", "wrong"]
    final_answer: str


def test_the_sdks_parse_gets_an_instance_of_the_schema(client: openai.OpenAI) -> None:
    reply = client.chat.completions.parse(model="sim-chat", messages=USER, response_format=MathAnswer)
    parsed = reply.choices[0].message.parsed
    assert isinstance(parsed, MathAnswer) and parsed.steps and parsed.verdict in ("right", "wrong")
    assert reply.choices[0].finish_reason == "stop"


def test_json_schema_and_json_object_stream_valid_json(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 3}}}
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "trip", "schema": schema, "strict": True}}
    chunks = list(client.chat.completions.create(model="sim-chat", messages=USER, response_format=fmt, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert json.loads(text) == {"city": "simulated", "days": 3}
    reply = client.chat.completions.create(model="sim-chat", messages=USER, response_format={"type": "json_object"})
    assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_a_tool_loop_ends_with_a_text_answer(client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.chat.completions.create(model="sim-chat", messages=messages, tools=[WEATHER])  # type: ignore[list-item]
    calls = first.choices[0].message.tool_calls or []
    assert first.choices[0].finish_reason == "tool_calls" and calls
    messages += [first.choices[0].message.model_dump(exclude_none=True)]
    messages += [{"role": "tool", "tool_call_id": calls[0].id, "content": "sunny, 21 C"}]
    second = client.chat.completions.create(model="sim-chat", messages=messages, tools=[WEATHER])  # type: ignore[list-item]
    assert second.choices[0].finish_reason == "stop" and not second.choices[0].message.tool_calls
    assert second.choices[0].message.content
    # A client that forces a tool still gets a call, as from a real model.
    forced = client.chat.completions.create(
        model="sim-chat",
        messages=messages,
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
    )
    assert forced.choices[0].message.tool_calls


# ---- a base_url without /v1 (llama.cpp and vLLM accept it) ----


def test_a_base_url_without_v1_reaches_the_same_endpoints(gateway: ServerProcess, ledger: Ledger) -> None:
    bare = openai.OpenAI(base_url=gateway.base_url, api_key=ALPHA_KEY, max_retries=0, timeout=30)
    reply = bare.chat.completions.create(model="gpt-fake", messages=USER, max_tokens=3)
    assert reply.choices[0].message.content and ledger.records()[-1]["path"] == "/v1/chat/completions"
    chunks = list(bare.chat.completions.create(model="gpt-fake", messages=USER, max_tokens=3, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert bare.completions.create(model="gpt-fake", prompt="Say", max_tokens=3).choices[0].text
    assert len(bare.embeddings.create(model="embed", input=["a"]).data) == 1
    assert "gpt-fake" in [m.id for m in bare.models.list()]
    assert bare.models.retrieve("gpt-fake").id == "gpt-fake"
    with pytest.raises(openai.NotFoundError):
        bare.models.retrieve("ghost")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gateway.base_url, api_key="sk-wrong", max_retries=0).models.list()
