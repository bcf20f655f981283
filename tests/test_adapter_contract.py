"""The Adapter contract (gateway.contracts), one suite for every adapter that talks to a wire upstream:
each is loaded through its `strait.adapters` entry point and driven against its own fake upstream (a real
process on loopback): `openai` against tests.harness.fake_upstream, `anthropic` against
tests.harness.fake_anthropic, `gemini` against tests.harness.fake_gemini; `openai` runs it again with the
backend capability `responses` (its own client a Responses one). A new adapter adds a `Kit` to KITS.

What every adapter must do, whatever its upstream speaks:
- answer a chat request (from a client of either protocol: its own passed through, the other translated;
  an adapter without a client protocol of its own translates both) in OpenAI's chat completion format
  with usage, and a stream as batches of chunk payloads (never an empty batch) ending in `[DONE]`, with a
  usage chunk, its connection released by `close`;
- a tool offered: a `tool_calls` answer with the call's id and JSON arguments;
- send a client of its own protocol its own bytes with only the model replaced;
- hand over, without waiting, what a stream received but did not yield when the client leaves (`drain`);
- pass an upstream 429 on with its status and `retry-after`, an upstream failure (5xx) in OpenAI's
  envelope that gateway.upstream.normalize reads back with its status;
- raise UpstreamStreamBroken for a stream that ends before its end (after relaying what came), with a
  `drain` that answers;
- raise UpstreamResponseTooLarge for an answer over the backend's `max_body_bytes`;
- raise UpstreamConnectError for an upstream that cannot be reached (not a reset: nothing was sent);
- answer what it cannot translate with a 400 without calling the upstream;
- send the backend's key in a header only (never in the URL) and the request id.
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.api.anthropic.decode import decode_messages
from gateway.api.openai.decode import decode as decode_openai
from gateway.api.responses import decode as responses
from gateway.canonical import Request
from gateway.contracts import (
    Adapter,
    UpstreamCall,
    UpstreamConnectError,
    UpstreamResponse,
    UpstreamResponseTooLarge,
    UpstreamStreamBroken,
)
from gateway.policy.model import Backend, UpstreamLimits
from gateway.registry import discover_adapters
from gateway.upstream.normalize import upstream_error
from tests.harness.procs import ServerProcess, free_port

KEY_ENV = "CONTRACT_UPSTREAM_KEY"
KEY = "contract-key-1"
TOOL_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}


def openai_client(model: str, **fields: Any) -> Request:
    body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16, **fields}
    return decode_openai(json.dumps(body).encode(), "chat")


def anthropic_client(model: str, **fields: Any) -> Request:
    body = {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "Say hello."}], **fields}
    return decode_messages(json.dumps(body).encode())


def responses_client(model: str, **fields: Any) -> Request:
    body = json.dumps({"model": model, "input": "Say hello.", "max_output_tokens": 16, **fields}).encode()
    wire, top = responses.parse(body)
    return responses.build(wire, top, None, body)[0]


RESPONSES_TOOLS = {"tools": [{"type": "function", "name": "get_weather", "parameters": TOOL_SCHEMA}]}
OPENAI_TOOLS = {"tools": [{"type": "function", "function": {"name": "get_weather", "parameters": TOOL_SCHEMA}}]}
ANTHROPIC_TOOLS = {"tools": [{"name": "get_weather", "input_schema": TOOL_SCHEMA}]}


@dataclass(frozen=True)
class Kit:
    """How to run the contract for one adapter: its fake upstream and the requests of each protocol."""

    adapter: str
    argv: list[str]
    base_path: str  # appended to the fake's URL for the backend's base_url
    model: str
    rate_limited_model: str
    own: Callable[..., Request]  # a request from a client of the adapter's own protocol
    foreign: Callable[..., Request]  # from a client of the other protocol (translated)
    own_tools: dict[str, Any]
    foreign_tools: dict[str, Any]
    untranslatable: Callable[[str], Request]
    failing_model: str  # the upstream answers a 5xx
    cut_model: str  # a stream that ends before its end
    key_header: str  # where the backend's key goes
    # None: the adapter has no client protocol of its own (both sides are translated).
    own_protocol: str | None = None
    # The backend's serving capabilities (`responses`: the openai adapter passes Responses through).
    capabilities: tuple[str, ...] = ()
    variant: str = ""  # tells two kits of one adapter apart

    @property
    def name(self) -> str:
        return f"{self.adapter}-{self.variant}" if self.variant else self.adapter


KITS = [
    Kit(
        adapter="openai",
        argv=[sys.executable, "-m", "tests.harness.fake_upstream"],
        base_path="/v1",
        model="fake-model",
        rate_limited_model="fault:429-retry-after-2",
        own=openai_client,
        foreign=anthropic_client,
        own_tools=OPENAI_TOOLS,
        foreign_tools=ANTHROPIC_TOOLS,
        # A signed thinking block: Chat Completions would lose its signature.
        untranslatable=lambda m: anthropic_client(
            m,
            messages=[
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "sig"}]},
                {"role": "user", "content": "again"},
            ],
        ),
        failing_model="fault:503",
        cut_model="fault:cut-after-3",
        key_header="authorization",
        own_protocol="openai",
    ),
    Kit(
        adapter="openai",
        variant="responses",
        argv=[sys.executable, "-m", "tests.harness.fake_upstream"],
        base_path="/v1",
        model="fake-model",
        rate_limited_model="fault:429-retry-after-2",
        own=responses_client,
        foreign=openai_client,  # passed through as chat (the openai adapter's other protocol)
        own_tools=RESPONSES_TOOLS,
        foreign_tools=OPENAI_TOOLS,
        untranslatable=lambda m: anthropic_client(
            m,
            messages=[
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "sig"}]},
                {"role": "user", "content": "again"},
            ],
        ),
        failing_model="fault:503",
        cut_model="fault:cut-after-3",
        key_header="authorization",
        own_protocol="responses",
        capabilities=("responses",),
    ),
    Kit(
        adapter="anthropic",
        argv=[sys.executable, "-m", "tests.harness.fake_anthropic", "--key", KEY],
        base_path="/v1",
        model="claude-fake",
        rate_limited_model="fault:429",
        own=anthropic_client,
        foreign=openai_client,
        own_tools=ANTHROPIC_TOOLS,
        foreign_tools=OPENAI_TOOLS,
        # Several choices: Messages has one answer.
        untranslatable=lambda m: openai_client(m, n=2),
        failing_model="fault:529",
        cut_model="fault:no-stop",
        key_header="x-api-key",
        own_protocol="anthropic",
    ),
    Kit(
        adapter="gemini",
        argv=[sys.executable, "-m", "tests.harness.fake_gemini", "--key", KEY],
        base_path="",
        model="gemini-2.5-flash",
        rate_limited_model="gemini-2.5-flash+429",
        # No client speaks Gemini's protocol to Strait: both sides are translated.
        own=openai_client,
        foreign=anthropic_client,
        own_tools=OPENAI_TOOLS,
        foreign_tools=ANTHROPIC_TOOLS,
        # A bias on token ids: Gemini has no such thing.
        untranslatable=lambda m: openai_client(m, logit_bias={"50256": -100}),
        failing_model="gemini-2.5-flash+503",
        cut_model="gemini-2.5-flash+cut",
        key_header="x-goog-api-key",
    ),
]


@pytest.fixture(scope="module", params=KITS, ids=[k.name for k in KITS])
def kit(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Kit, str]]:
    k: Kit = request.param
    port = free_port()
    log = tmp_path_factory.mktemp(k.name) / "fake.log"
    with ServerProcess([*k.argv, "--port", str(port)], port, ready_path="/healthz", log_path=log) as proc:
        yield k, proc.base_url


@pytest.fixture()
def adapter(kit: tuple[Kit, str], monkeypatch: pytest.MonkeyPatch) -> Adapter:
    k, url = kit
    monkeypatch.setenv(KEY_ENV, KEY)
    backend = Backend(
        name=f"contract-{k.name}",
        adapter=k.adapter,
        base_url=url + k.base_path,
        api_key=f"env:{KEY_ENV}",
        capabilities=k.capabilities,  # type: ignore[arg-type]
    )
    return discover_adapters()[k.adapter](backend)


def call(request: Request, model: str, *, stream: bool = False) -> UpstreamCall:
    return UpstreamCall(operation="chat", request=request, model=model, stream=stream, request_id="req_contract")


def ledger(url: str) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = httpx.get(url + "/_ledger", timeout=5).json()
    return records


def chat_message(response: UpstreamResponse) -> tuple[dict[str, Any], dict[str, Any]]:
    assert response.status == 200 and not response.streaming
    body = json.loads(response.body)
    assert body["object"] == "chat.completion"
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    return choice, usage


async def collect(response: UpstreamResponse) -> list[bytes]:
    assert response.status == 200 and response.batches is not None
    events: list[bytes] = []
    try:
        async for batch in response.batches:
            assert batch, "an adapter never yields an empty batch"
            events += batch
    finally:
        assert response.close is not None
        closing = response.close()
        if closing is not None:
            await closing
    return events


@pytest.mark.parametrize("side", ["own", "foreign"])
async def test_a_chat_answer_is_a_chat_completion_with_usage(adapter: Adapter, kit: tuple[Kit, str], side: str) -> None:
    k, _ = kit
    request = (k.own if side == "own" else k.foreign)(k.model)
    try:
        choice, _ = chat_message(await adapter.send(call(request, k.model)))
        assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
        assert choice["finish_reason"] in ("stop", "length")
    finally:
        await adapter.aclose()


@pytest.mark.parametrize("side", ["own", "foreign"])
async def test_a_stream_is_chunk_batches_ending_in_done_with_a_usage_chunk(
    adapter: Adapter, kit: tuple[Kit, str], side: str
) -> None:
    k, _ = kit
    request = (k.own if side == "own" else k.foreign)(k.model, stream=True)
    try:
        events = await collect(await adapter.send(call(request, k.model, stream=True)))
    finally:
        await adapter.aclose()
    assert events[-1] == b"[DONE]" and b"[DONE]" not in events[:-1]
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join((ch["delta"].get("content") or "") for c in chunks for ch in c["choices"])
    assert text
    assert [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]] in (["stop"], ["length"])
    usage = [c["usage"] for c in chunks if c.get("usage") and c["choices"] == []]
    assert len(usage) == 1 and usage[0]["completion_tokens"] > 0


@pytest.mark.parametrize("side", ["own", "foreign"])
async def test_an_offered_tool_is_called_with_its_id_and_json_arguments(
    adapter: Adapter, kit: tuple[Kit, str], side: str
) -> None:
    k, _ = kit
    request = (k.own(k.model, **k.own_tools)) if side == "own" else k.foreign(k.model, **k.foreign_tools)
    try:
        choice, _ = chat_message(await adapter.send(call(request, k.model)))
    finally:
        await adapter.aclose()
    assert choice["finish_reason"] == "tool_calls"
    (tool_call,) = choice["message"]["tool_calls"]
    assert tool_call["id"] and tool_call["function"]["name"] == "get_weather"
    assert isinstance(json.loads(tool_call["function"]["arguments"]), dict)


async def test_a_client_of_the_adapters_protocol_has_its_bytes_sent_with_only_the_model_replaced(
    adapter: Adapter, kit: tuple[Kit, str]
) -> None:
    k, url = kit
    request = k.own("route-name", temperature=0.25, metadata={"user_id": "u-\u00e9"})
    assert request.original is not None
    try:
        chat_message(await adapter.send(call(request, k.model)))
    finally:
        await adapter.aclose()
    record = ledger(url)[-1]
    if k.own_protocol is None:
        # No protocol of its own: the client's bytes are translated, never sent as they are.
        assert request.original.protocol != k.adapter and "body_b64" not in record
        assert record["body"]["generationConfig"]["temperature"] == 0.25
        return
    sent = base64.b64decode(record["body_b64"])
    assert sent == request.original.body.replace(b'"route-name"', json.dumps(k.model).encode())


async def test_a_client_that_leaves_mid_stream_is_drained_and_closed(adapter: Adapter, kit: tuple[Kit, str]) -> None:
    """What the relay does when the client goes: `drain` (never waits; hands over events received but not
    yet yielded, each a chunk payload) once, then `close` (the connection aborted, not kept)."""
    k, _ = kit
    request = k.own(k.model, stream=True)
    try:
        response = await adapter.send(call(request, k.model, stream=True))
        assert response.batches is not None and response.drain is not None and response.close is not None
        first = await response.batches.__anext__()
        assert first  # a short answer may be whole already: then nothing is left to drain
        drained = response.drain()
        assert b"[DONE]" not in drained and all(isinstance(json.loads(e), dict) for e in drained)
        closing = response.close()
        if closing is not None:
            await closing
    finally:
        await adapter.aclose()


async def test_a_429_keeps_its_status_and_retry_after(adapter: Adapter, kit: tuple[Kit, str]) -> None:
    k, _ = kit
    try:
        response = await adapter.send(call(k.own(k.rate_limited_model), k.rate_limited_model))
    finally:
        await adapter.aclose()
    assert response.status == 429 and not response.streaming
    assert float(response.headers["retry-after"]) > 0
    assert json.loads(response.body)["error"]["message"]


async def test_an_unreachable_upstream_is_a_connect_error_not_a_reset(kit: tuple[Kit, str]) -> None:
    k, _ = kit
    backend = Backend(name="gone", adapter=k.adapter, base_url=f"http://127.0.0.1:{free_port()}{k.base_path}")
    adapter = discover_adapters()[k.adapter](backend)
    try:
        with pytest.raises(UpstreamConnectError) as info:
            await adapter.send(call(k.own(k.model), k.model))
    finally:
        await adapter.aclose()
    assert not info.value.reset and not info.value.timeout


async def test_what_cannot_be_translated_is_a_400_and_never_sent(adapter: Adapter, kit: tuple[Kit, str]) -> None:
    k, url = kit
    before = len(ledger(url))
    try:
        response = await adapter.send(call(k.untranslatable(k.model), k.model))
    finally:
        await adapter.aclose()
    assert response.status == 400
    assert json.loads(response.body)["error"]["code"] == "untranslatable"
    assert len(ledger(url)) == before


@pytest.mark.parametrize("stream", [False, True])
async def test_an_upstream_failure_is_an_openai_envelope_normalize_reads(
    adapter: Adapter, kit: tuple[Kit, str], stream: bool
) -> None:
    k, _ = kit
    try:
        response = await adapter.send(call(k.own(k.failing_model, stream=stream), k.failing_model, stream=stream))
    finally:
        await adapter.aclose()
    assert response.status >= 500 and not response.streaming
    assert json.loads(response.body)["error"]["message"]
    error = upstream_error(response.status, response.body, response.headers)
    assert error.status == response.status and error.message


async def test_a_stream_cut_before_its_end_is_broken_after_what_came(adapter: Adapter, kit: tuple[Kit, str]) -> None:
    k, _ = kit
    response = await adapter.send(call(k.own(k.cut_model, stream=True), k.cut_model, stream=True))
    got: list[bytes] = []
    try:
        assert response.batches is not None
        with pytest.raises(UpstreamStreamBroken):
            async for batch in response.batches:
                got += batch
        assert got and b"[DONE]" not in got
        assert response.drain is not None and isinstance(response.drain(), list)
    finally:
        assert response.close is not None
        closing = response.close()
        if closing is not None:
            await closing
        await adapter.aclose()


async def test_an_answer_over_the_body_limit_is_refused(kit: tuple[Kit, str], monkeypatch: pytest.MonkeyPatch) -> None:
    k, url = kit
    monkeypatch.setenv(KEY_ENV, KEY)
    backend = Backend(
        name="small",
        adapter=k.adapter,
        base_url=url + k.base_path,
        api_key=f"env:{KEY_ENV}",
        limits=UpstreamLimits(max_body_bytes=64),  # below any answer
        capabilities=k.capabilities,  # type: ignore[arg-type]
    )
    adapter = discover_adapters()[k.adapter](backend)
    try:
        with pytest.raises(UpstreamResponseTooLarge):
            await adapter.send(call(k.own(k.model), k.model))
    finally:
        await adapter.aclose()


async def test_the_key_goes_in_a_header_only_and_the_request_id_goes_up(adapter: Adapter, kit: tuple[Kit, str]) -> None:
    k, url = kit
    try:
        chat_message(await adapter.send(call(k.own(k.model), k.model)))
    finally:
        await adapter.aclose()
    record = ledger(url)[-1]
    assert KEY not in record["path"] + record["query"]
    assert KEY in record["headers"][k.key_header]
    assert record["headers"]["x-request-id"] == "req_contract"


def test_every_installed_wire_adapter_runs_a_contract_suite() -> None:
    wire = {name for name in discover_adapters() if name != "simulated"}
    assert wire <= {k.adapter for k in KITS}, Path(__file__).name + " needs a Kit for every adapter"
