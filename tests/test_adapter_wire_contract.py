"""The adapter contract (gateway/contracts.py), run over every HTTP adapter against its own fake upstream
process: what the dispatcher and the relay rely on, whatever the provider's wire format.

- a JSON answer is a 200 whose body is an OpenAI chat completion (choices, message, usage);
- a stream is `batches` of OpenAI chunk payloads, never an empty batch, `[DONE]` last when yielded at
  all, the usage chunk among them; `close` is always callable;
- an upstream error is its status with OpenAI's envelope, which gateway.upstream.normalize reads (a
  503 stays retryable, a 429 keeps its retry hint);
- a stream cut before its end raises UpstreamStreamBroken after what came; `drain` answers a list;
- an answer over the backend's `max_body_bytes` raises UpstreamResponseTooLarge;
- an upstream nobody listens on raises UpstreamConnectError (not a timeout);
- the backend's key reaches the upstream in a header only, never in the URL; the request id goes up.

A new adapter adds a `Driver` to DRIVERS (its factory, fake and scenario model names)."""

from __future__ import annotations

import asyncio
import inspect
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from gateway.canonical import Message, Request, Text
from gateway.contracts import (
    Adapter,
    UpstreamCall,
    UpstreamConnectError,
    UpstreamResponse,
    UpstreamResponseTooLarge,
    UpstreamStreamBroken,
)
from gateway.policy.model import Backend, UpstreamLimits
from gateway.upstream.normalize import upstream_error
from gateway.upstream.sse import DONE
from plugins.gemini.adapter import GeminiAdapter
from plugins.openai_compat import OpenAICompatAdapter
from tests.harness.procs import ServerProcess, free_port

SECRET = "contract-secret-7c1d"
MAX_BODY = 64 * 1024


@dataclass(frozen=True)
class Driver:
    name: str
    argv: Callable[[int], list[str]]
    base_url: Callable[[str], str]
    build: Callable[[Backend, dict[str, str]], Adapter]
    ok: str
    unavailable: str
    rate_limited: str
    cut: str
    big: str
    # The ledger's records: (path with any query, headers) of each request the fake received.
    ledger: Callable[[str], list[tuple[str, dict[str, str]]]]
    key_header: str


def _openai_ledger(base: str) -> list[tuple[str, dict[str, str]]]:
    return [(r["path"], r["headers"]) for r in httpx.get(f"{base}/_ledger", timeout=5).json()]


def _gemini_ledger(base: str) -> list[tuple[str, dict[str, str]]]:
    return [
        (r["path"] + ("?" + r["query"] if r["query"] else ""), r["headers"])
        for r in httpx.get(f"{base}/_ledger", timeout=5).json()
    ]


DRIVERS = [
    Driver(
        name="openai",
        argv=lambda port: [sys.executable, "-m", "tests.harness.fake_upstream", "--port", str(port)],
        base_url=lambda fake: f"{fake}/v1",
        build=lambda b, env: OpenAICompatAdapter(b, environ=env),
        ok="fake-model",
        unavailable="fault:503",
        rate_limited="fault:429-retry-after-2",
        cut="fault:cut-after-3",
        big=f"fault:pad_bytes={4 * MAX_BODY}",
        ledger=_openai_ledger,
        key_header="authorization",
    ),
    Driver(
        name="gemini",
        argv=lambda port: [sys.executable, "-m", "tests.harness.fake_gemini", "--port", str(port), "--key", SECRET],
        base_url=lambda fake: fake,
        build=lambda b, env: GeminiAdapter(b, environ=env),
        ok="gemini-2.5-flash",
        unavailable="gemini-2.5-flash+503",
        rate_limited="gemini-2.5-flash+429",
        cut="gemini-2.5-flash+cut",
        big="gemini-2.5-flash+big",
        ledger=_gemini_ledger,
        key_header="x-goog-api-key",
    ),
]


@pytest.fixture(scope="module", params=DRIVERS, ids=lambda d: d.name)
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Driver, str]]:
    driver: Driver = request.param
    port = free_port()
    log = tmp_path_factory.mktemp(f"contract-{driver.name}") / "fake.log"
    with ServerProcess(driver.argv(port), port, log_path=log) as proc:
        yield driver, proc.base_url


def adapter_for(driver: Driver, base_url: str) -> Adapter:
    backend = Backend(
        name="b",
        adapter=driver.name,
        base_url=base_url,
        api_key="env:CONTRACT_KEY",
        limits=UpstreamLimits(max_body_bytes=MAX_BODY),
    )
    return driver.build(backend, {"CONTRACT_KEY": SECRET})


def call(model: str, *, stream: bool = False) -> UpstreamCall:
    request = Request(
        operation="chat", model="route", messages=(Message(role="user", content=(Text(text="What is the capital?"),)),)
    )
    return UpstreamCall(operation="chat", request=request, model=model, stream=stream, request_id="req-contract-1")


async def _close(response: UpstreamResponse) -> None:
    if response.close is not None:
        result = response.close()
        if inspect.isawaitable(result):
            await result


async def _collect(response: UpstreamResponse) -> list[list[bytes]]:
    assert response.batches is not None
    batches = []
    async for batch in response.batches:
        batches.append(batch)
    return batches


def run(driver: Driver, fake: str, scenario: Callable[[Adapter], Any]) -> Any:
    async def main() -> Any:
        adapter = adapter_for(driver, driver.base_url(fake))
        try:
            return await scenario(adapter)
        finally:
            await adapter.aclose()

    return asyncio.run(main())


def test_json_answer_is_a_chat_completion(setup: tuple[Driver, str]) -> None:
    driver, fake = setup

    async def scenario(adapter: Adapter) -> None:
        response = await adapter.send(call(driver.ok))
        assert response.status == 200 and not response.streaming
        body = json.loads(response.body)
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
        assert (
            isinstance(body["choices"][0]["message"]["content"], str) and body["choices"][0]["finish_reason"] == "stop"
        )
        assert body["usage"]["prompt_tokens"] > 0 and body["usage"]["completion_tokens"] > 0

    run(driver, fake, scenario)


def test_stream_is_batches_of_chunks_done_last_with_usage(setup: tuple[Driver, str]) -> None:
    driver, fake = setup

    async def scenario(adapter: Adapter) -> None:
        response = await adapter.send(call(driver.ok, stream=True))
        assert response.status == 200 and response.streaming
        try:
            batches = await _collect(response)
        finally:
            await _close(response)
        assert batches and all(batches)
        events = [e for b in batches for e in b]
        if DONE in events:
            assert events.index(DONE) == len(events) - 1
        chunks = [json.loads(e) for e in events if e != DONE]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert any(c["choices"] and c["choices"][0].get("finish_reason") == "stop" for c in chunks)
        assert any(not c["choices"] and c.get("usage") for c in chunks)
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        assert text

    run(driver, fake, scenario)


@pytest.mark.parametrize("stream", [False, True])
def test_errors_are_openai_envelopes_normalize_reads(setup: tuple[Driver, str], stream: bool) -> None:
    driver, fake = setup

    async def scenario(adapter: Adapter) -> None:
        unavailable = await adapter.send(call(driver.unavailable, stream=stream))
        assert unavailable.status == 503 and not unavailable.streaming
        err = upstream_error(unavailable.status, unavailable.body, unavailable.headers)
        assert err.status == 503 and err.message and "error" in json.loads(unavailable.body)
        limited = await adapter.send(call(driver.rate_limited, stream=stream))
        assert limited.status == 429
        err = upstream_error(limited.status, limited.body, limited.headers)
        assert err.headers["retry-after"] == "2"

    run(driver, fake, scenario)


def test_a_cut_stream_is_broken_and_drains(setup: tuple[Driver, str]) -> None:
    driver, fake = setup

    async def scenario(adapter: Adapter) -> None:
        response = await adapter.send(call(driver.cut, stream=True))
        assert response.batches is not None
        got: list[bytes] = []
        try:
            with pytest.raises(UpstreamStreamBroken):
                async for batch in response.batches:
                    got.extend(batch)
            assert got and DONE not in got
            assert response.drain is not None and isinstance(response.drain(), list)
        finally:
            await _close(response)

    run(driver, fake, scenario)


def test_an_answer_over_the_body_limit_is_refused(setup: tuple[Driver, str]) -> None:
    driver, fake = setup

    async def scenario(adapter: Adapter) -> None:
        with pytest.raises(UpstreamResponseTooLarge):
            await adapter.send(call(driver.big))

    run(driver, fake, scenario)


def test_nobody_listening_is_a_connect_error(setup: tuple[Driver, str]) -> None:
    driver, _ = setup

    async def scenario(adapter: Adapter) -> None:
        with pytest.raises(UpstreamConnectError) as caught:
            await adapter.send(call(driver.ok))
        assert not caught.value.timeout

    run(driver, f"http://127.0.0.1:{free_port()}", scenario)


def test_the_key_goes_in_a_header_only_and_the_request_id_goes_up(setup: tuple[Driver, str]) -> None:
    driver, fake = setup

    async def scenario(adapter: Adapter) -> None:
        response = await adapter.send(call(driver.ok))
        assert response.status == 200

    run(driver, fake, scenario)
    path, headers = driver.ledger(fake)[-1]
    assert SECRET not in path and SECRET in headers[driver.key_header]
    assert headers["x-request-id"] == "req-contract-1"
