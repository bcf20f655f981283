"""A streamed request through a real `strait serve`, traced to a real OTLP/HTTP receiver: one SERVER
span continuing the client's traceparent, a child per stage, a CLIENT span per upstream attempt that
the upstream saw as its parent, with the GenAI attributes; no key, prompt or completion in any span."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.e2e.conftest import ALPHA_KEY, BACKEND_SECRET, Ledger, e2e_policy
from tests.harness.gateway import gateway_process
from tests.harness.otlp_receiver import OtlpReceiver, Span
from tests.harness.procs import ServerProcess, free_port

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


@pytest.fixture(scope="module")
def traced_gateway(
    fake_upstream: ServerProcess, receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("traced")
    policy = folder / "policy.yaml"
    policy.write_text(e2e_policy(fake_upstream.base_url, free_port()))
    env = {
        "FAKE_BACKEND_KEY": BACKEND_SECRET,
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_SERVICE_NAME": "strait-e2e",
        "OTEL_BSP_SCHEDULE_DELAY": "50",  # export batches every 50 ms, so the test need not wait 5 s
        "STRAIT_SPOOL_DIR": str(folder / "spool"),
    }
    with gateway_process(policy, log_path=folder / "gw.log", env=env) as gw:
        yield gw


def _trace(receiver: OtlpReceiver, names: set[str], timeout: float = 20.0) -> list[Span]:
    deadline = time.monotonic() + timeout
    while True:
        spans = [s for s in receiver.snapshot() if s.trace_id == TRACE_ID]
        if names <= {s.name for s in spans} or time.monotonic() > deadline:
            return spans
        time.sleep(0.05)  # polling an observable condition (the exporter's batches), with a deadline


def test_a_streamed_request_is_one_trace_with_every_stage_and_attempt(
    traced_gateway: ServerProcess, receiver: OtlpReceiver, ledger: Ledger
) -> None:
    client = openai.OpenAI(
        base_url=traced_gateway.base_url + "/v1",
        api_key=ALPHA_KEY,
        max_retries=0,
        default_headers={"traceparent": PARENT},
    )
    secret_prompt = "the-prompt-text-must-not-be-traced"
    stream = client.chat.completions.create(
        model="fallback-chat",  # a dead deployment first: two attempts
        messages=[{"role": "user", "content": secret_prompt}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks and chunks[-1].usage is not None
    stages = {"strait.auth", "strait.decode", "strait.route", "strait.limits", "strait.upstream"}
    spans = _trace(receiver, {"chat", *stages, "chat fake-model", "chat whatever"})
    by_name = {s.name: s for s in spans}
    assert {"chat", *stages} <= set(by_name), sorted(by_name)
    server = by_name["chat"]
    assert server.kind == 2 and server.parent_id == "00f067aa0ba902b7"  # SERVER, continuing the client's trace
    assert server.service == "strait-e2e"
    for name in stages:
        assert by_name[name].parent_id == server.span_id
    attempts = [s for s in spans if s.kind == 3]  # CLIENT
    assert {a.attributes["gen_ai.request.model"] for a in attempts} == {"whatever", "fake-model"}
    assert all(a.parent_id == server.span_id for a in attempts)
    good = next(a for a in attempts if a.attributes["gen_ai.request.model"] == "fake-model")
    assert good.attributes["gen_ai.provider.name"] == "openai" and good.attributes["http.response.status_code"] == 200
    # The upstream received the attempt's span as its parent.
    record = ledger.records()[-1]
    assert record["headers"]["traceparent"].split("-")[1:3] == [TRACE_ID, good.span_id]
    a = server.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "fallback-chat"
    assert a["gen_ai.response.model"] == "fake-model" and a["strait.route"] == "fallback-chat"
    assert a["strait.tenant"] == "alpha" and a["strait.fallback"] == 1
    assert a["gen_ai.usage.output_tokens"] == chunks[-1].usage.completion_tokens
    assert a["gen_ai.usage.input_tokens"] == chunks[-1].usage.prompt_tokens
    assert a["http.response.status_code"] == 200 and "strait.time_to_first_chunk_ms" in a
    flat = repr([(s.name, s.attributes) for s in spans])
    assert secret_prompt not in flat and ALPHA_KEY not in flat and BACKEND_SECRET not in flat


def test_tracing_off_by_default_sends_no_traceparent_upstream(gateway: ServerProcess, ledger: Ledger) -> None:
    r = httpx.post(
        gateway.base_url + "/v1/chat/completions",
        json={"model": "gpt-fake", "messages": [{"role": "user", "content": "x"}]},
        headers={"authorization": f"Bearer {ALPHA_KEY}", "traceparent": PARENT},
    )
    assert r.status_code == 200
    assert "traceparent" not in ledger.records()[-1]["headers"]
