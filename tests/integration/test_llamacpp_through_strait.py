"""Strait in front of a real llama.cpp server (nobody here wrote it), driven by the openai SDK and LangChain."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from gateway.tokens import encoding
from tests.harness.gateway import gateway_process
from tests.harness.llamacpp import llamacpp_server
from tests.harness.procs import ServerProcess

pytestmark = pytest.mark.llamacpp

POLICY = """
version: 1
backends:
  - {{name: llama-chat, adapter: openai, base_url: "{chat}/v1", tier: self-hosted, timeouts: {{read_s: 60}}}}
  - {{name: llama-embed, adapter: openai, base_url: "{embed}/v1", tier: self-hosted}}
models:
  - name: smollm2
    origin: {{developer: HuggingFace, country: US}}
    context_window: 8192  # larger than the server really has, so its own overflow error is exercised
    deployments: [{{backend: llama-chat, upstream_model: smollm2}}]
  - name: smollm2-embed
    capabilities: [embeddings]
    deployments: [{{backend: llama-embed, upstream_model: smollm2-embed}}]
routes:
  - {{name: small-chat, models: [smollm2]}}
  - {{name: small-embed, models: [smollm2-embed]}}
"""


@pytest.fixture(scope="module")
def stack(llama_chat: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("llama")
    with llamacpp_server("smollm2-embed", embedding=True, log_path=folder / "embed.log") as embed:
        policy = folder / "policy.yaml"
        policy.write_text(POLICY.format(chat=llama_chat.base_url, embed=embed.base_url))
        with gateway_process(policy, log_path=folder / "gateway.log") as gw:
            yield gw


@pytest.fixture()
def client(stack: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


MESSAGES = [{"role": "user", "content": "Name a colour."}]


def test_chat_through_strait(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="small-chat", messages=MESSAGES, max_tokens=8, temperature=0
    )
    out = raw.parse()
    assert raw.headers["x-strait-deployment"] == "smollm2@llama-chat"
    assert out.choices[0].message.content
    assert out.usage is not None and 0 < out.usage.completion_tokens <= 8


def test_stream_with_usage_through_strait(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="small-chat",
            messages=MESSAGES,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_stream_without_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(model="small-chat", messages=MESSAGES, max_tokens=4, temperature=0, stream=True)
    )
    assert chunks and all(c.choices for c in chunks)


def test_embeddings_through_strait(client: openai.OpenAI) -> None:
    b64 = client.embeddings.create(model="small-embed", input=["red", "blue"])
    flt = client.embeddings.create(model="small-embed", input=["red", "blue"], encoding_format="float")
    assert len(b64.data) == 2 and len(flt.data[0].embedding) == 576
    assert b64.data[0].embedding == pytest.approx(flt.data[0].embedding, rel=1e-5)


def test_cl100k_token_ids_embed_as_their_text(client: openai.OpenAI) -> None:
    """LangChain's default: cl100k_base ids. llama.cpp would read them in SmolLM2's vocabulary (other
    words); Strait decodes them to text first, so they embed as the text does."""
    ids = encoding("cl100k_base").encode("red apples")
    as_ids = client.embeddings.create(model="small-embed", input=[ids], encoding_format="float").data[0].embedding
    as_text = client.embeddings.create(model="small-embed", input=["red apples"], encoding_format="float")
    assert as_ids == pytest.approx(as_text.data[0].embedding, rel=1e-4, abs=1e-6)


def test_context_overflow_is_openai_shaped(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="small-chat", messages=[{"role": "user", "content": "word " * 3000}], max_tokens=4
        )
    assert info.value.code == "context_length_exceeded"
    assert "maximum context length" in info.value.message


def test_langchain_chat_openai_as_a_second_client(stack: ServerProcess) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=stack.base_url + "/v1",
        api_key="unused",  # type: ignore[arg-type]
        model="small-chat",
        max_tokens=8,
        temperature=0,
        stream_usage=True,
        max_retries=0,
    )
    reply = llm.invoke("Name a colour.")
    assert reply.content and reply.usage_metadata is not None and reply.usage_metadata["output_tokens"] > 0
    streamed = list(llm.stream("Name a colour."))
    assert "".join(str(c.content) for c in streamed)
    assert any(c.usage_metadata for c in streamed)


def test_gateway_log_has_no_tracebacks(stack: ServerProcess) -> None:
    assert stack.log_path is not None
    assert "Traceback" not in Path(stack.log_path).read_text(errors="replace")
