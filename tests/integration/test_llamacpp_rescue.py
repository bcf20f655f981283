"""Mid-stream rescue proven once on real engines: two llama.cpp servers (nobody here wrote them) behind
Strait, a route with `resume: continue`. The first server is SIGKILLed while it streams, after some of
its content reached the client; the client still receives one complete answer (a finish_reason, then
`[DONE]`, no error), the second server continuing the text the client already had (llama.cpp continues
a final assistant message)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import pytest

from tests.harness.fake_control import parse_prometheus
from tests.harness.gateway import gateway_process
from tests.harness.llamacpp import llamacpp_server
from tests.harness.procs import ServerProcess
from tests.harness.sse import SSEParser

pytestmark = pytest.mark.llamacpp

POLICY = """
version: 1
backends:
  - {{name: first, adapter: openai, base_url: "{first}/v1", capabilities: [prefill], timeouts: {{read_s: 120}}}}
  - {{name: second, adapter: openai, base_url: "{second}/v1", capabilities: [prefill], timeouts: {{read_s: 120}}}}
models:
  - name: small
    deployments: [{{backend: first, upstream_model: smollm2}}, {{backend: second, upstream_model: smollm2}}]
routes:
  # Generous per-try timeouts: two engines on shared CPUs can be slow, and slowness is not the point.
  - {{name: chat, models: [small], resume: continue, timeouts: {{first_token_s: 120, stall_s: 120}}}}
"""
PROMPT = [{"role": "user", "content": "Write a short story about a cat who learns to sail."}]
MAX_TOKENS = 48
# Content events the client reads before the first server is killed.
BEFORE_KILL = 4


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, ServerProcess, ServerProcess]]:
    folder = tmp_path_factory.mktemp("llama-rescue")
    first = llamacpp_server("smollm2", n_parallel=1, log_path=folder / "first.log")
    second = llamacpp_server("smollm2", n_parallel=1, log_path=folder / "second.log")
    with first, second:
        policy = folder / "policy.yaml"
        policy.write_text(POLICY.format(first=first.base_url, second=second.base_url))
        with gateway_process(policy, log_path=folder / "gateway.log") as gw:
            yield gw, first, second


def _content(chunk: dict[str, Any]) -> str:
    choices = chunk.get("choices") or []
    return "".join((c.get("delta") or {}).get("content") or "" for c in choices)


def test_a_killed_llamacpp_mid_stream_is_continued_by_the_other_into_one_complete_answer(
    stack: tuple[ServerProcess, ServerProcess, ServerProcess],
) -> None:
    gw, first, second = stack
    body = {"model": "chat", "messages": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    decoder = SSEParser()
    payloads: list[str] = []
    content_events = 0
    killed = False
    with (
        httpx.Client(base_url=gw.base_url, timeout=180) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        assert r.status_code == 200
        assert r.headers["x-strait-deployment"] == "small@first"
        for piece in r.iter_bytes():
            for event in decoder.feed(piece):
                payloads.append(event.data)
                if event.data != "[DONE]" and _content(msgspec.json.decode(event.data)):
                    content_events += 1
            if not killed and content_events >= BEFORE_KILL:
                first.signal(9)  # SIGKILL, mid-stream: content already reached the client
                killed = True
    assert killed, payloads
    assert first.proc is not None and first.proc.wait(30) == -9
    # One complete answer: no error event, a finish_reason, then [DONE].
    assert payloads[-1] == "[DONE]", payloads[-3:]
    chunks = [msgspec.json.decode(p) for p in payloads[:-1]]
    assert not any("error" in c for c in chunks), chunks[-3:]
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")]
    assert finish[-1] in ("stop", "length")
    # One stream: the ids the client saw first, one role chunk.
    assert len({c["id"] for c in chunks}) == 1
    assert sum(1 for c in chunks if c.get("choices") and c["choices"][0]["delta"].get("role")) == 1
    text = "".join(_content(c) for c in chunks)
    # The second server continued (it was asked for what the first had not written): the answer does
    # not start over, and it is longer than what the first server had sent before it died.
    before = "".join(_content(c) for c in chunks[: 1 + BEFORE_KILL])
    assert text.startswith(before) and len(text) > len(before)
    assert text.count(before) == 1
    # The second engine really generated the rest (its own counter of generated tokens moved).
    metrics = parse_prometheus(httpx.get(second.base_url + "/metrics", timeout=10).text)
    assert metrics.get("llamacpp:tokens_predicted_total", 0.0) > 0
