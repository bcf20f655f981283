"""The gemini adapter's own behaviour beyond the contract suite (tests/test_adapter_contract.py), against
the fake Gemini process: what it refuses without sending, what a cut stream is charged, errors mid-stream."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.canonical import Message, Request, Text
from gateway.contracts import UpstreamCall, UpstreamStreamBroken
from gateway.policy.model import Backend, OutlierPolicy
from gateway.upstream.health import HealthMonitor
from gateway.upstream.signals import LiveSignals
from plugins.gemini.adapter import GeminiAdapter
from tests.harness.procs import ServerProcess, free_port

KEY = "gemini-adapter-key-0d2"


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("fake_gemini_adapter") / "fake.log"
    argv = [sys.executable, "-m", "tests.harness.fake_gemini", "--port", str(port), "--key", KEY]
    with ServerProcess(argv, port, log_path=log) as proc:
        yield proc.base_url


def backend(url: str) -> Backend:
    return Backend(name="g", adapter="gemini", base_url=url, api_key="env:GK")


def call(model: str, *, stream: bool = False, **fields: Any) -> UpstreamCall:
    request = Request(operation="chat", model="r", messages=(Message(role="user", content=(Text(text="Hi there"),)),))
    return UpstreamCall(operation="chat", request=request, model=model, stream=stream, request_id="rq", **fields)


def run(url: str, scenario: Any) -> Any:
    async def main() -> Any:
        adapter = GeminiAdapter(backend(url), environ={"GK": KEY})
        try:
            return await scenario(adapter)
        finally:
            await adapter.aclose()

    return asyncio.run(main())


def test_configuration_errors_are_refused_at_load() -> None:
    with pytest.raises(ValueError, match="query"):
        GeminiAdapter(backend("https://example.test/?key=abc"), environ={"GK": KEY})
    with pytest.raises(ValueError, match="GK"):
        GeminiAdapter(backend("https://example.test"), environ={})


def test_what_it_does_not_serve_is_a_400_without_a_request(fake: str) -> None:
    async def scenario(adapter: GeminiAdapter) -> list[tuple[int, str]]:
        embeddings = call("gemini-2.5-flash")
        embeddings.operation = "embeddings"
        out = []
        for c in (embeddings, call("gemini-2.5-flash", stream=True, prefill="Par", prefill_tokens=1)):
            r = await adapter.send(c)
            out.append((r.status, json.loads(r.body)["error"]["code"]))
        return out

    assert run(fake, scenario) == [(400, "unsupported"), (400, "unsupported_prefill")]


def test_a_cut_stream_is_charged_geminis_last_usage(fake: str) -> None:
    async def scenario(adapter: GeminiAdapter) -> list[bytes]:
        r = await adapter.send(call("gemini-2.5-flash+cut", stream=True))
        assert r.batches is not None and r.drain is not None and r.close is not None
        with pytest.raises(UpstreamStreamBroken):
            async for _ in r.batches:
                pass
        drained = r.drain()
        r.close()
        return drained

    (usage_chunk,) = run(fake, scenario)
    chunk = json.loads(usage_chunk)
    assert chunk["choices"] == [] and chunk["usage"]["prompt_tokens"] == 2


def test_an_error_event_mid_stream_says_only_googles_status(fake: str) -> None:
    async def scenario(adapter: GeminiAdapter) -> UpstreamStreamBroken:
        r = await adapter.send(call("gemini-2.5-flash+error-event", stream=True))
        assert r.batches is not None
        try:
            async for _ in r.batches:
                pass
        except UpstreamStreamBroken as exc:
            return exc
        finally:
            if r.close is not None:
                r.close()
        raise AssertionError("the stream did not break")

    broken = run(fake, scenario)
    assert broken.code == "upstream_error" and "INTERNAL" in broken.client_message
    assert "Internal error encountered" not in broken.client_message


def test_the_health_probe_is_geminis_model_list_with_its_own_key_header(fake: str) -> None:
    probed = Backend(
        name="g", adapter="gemini", base_url=fake, api_key="env:GK", outlier=OutlierPolicy(active_interval_s=0.05)
    )
    signals = LiveSignals()
    signals.configure([probed], probed=["g"])
    monitor = HealthMonitor(signals, environ={"GK": KEY})

    async def scenario() -> None:
        adapter = GeminiAdapter(probed, environ={"GK": KEY})
        monitor.apply([probed], {"g": adapter})
        await monitor.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while monitor.probes.get("g", 0) < 2:
            assert loop.time() < deadline, "no probe was sent"
            await asyncio.sleep(0.02)
        await monitor.aclose()
        await adapter.aclose()

    asyncio.run(scenario())
    probes = [r for r in httpx.get(f"{fake}/_ledger", timeout=5).json() if r["path"] == "/v1beta/models"]
    assert probes and probes[0]["query"] == "pageSize=1"
    assert probes[0]["headers"]["x-goog-api-key"] == KEY and "authorization" not in probes[0]["headers"]
