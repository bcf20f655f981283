"""The `make run` demo's cache, through a real `strait serve` process and the official openai SDK: the
demo tenant gets an exact hit on a repeated question and a semantic hit on a reworded one, a streamed
request replays a hit as SSE the SDK reads like any stream, and a bad hit is reported with feedback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.harness.gateway import gateway_process
from tests.harness.procs import ServerProcess

DEMO = Path(__file__).resolve().parents[2] / "policies" / "demo.yaml"
DEMO_KEY = "sk-strait-demo"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("demo")
    proc = gateway_process(DEMO, log_path=folder / "gateway.log", env={"STRAIT_SPOOL_DIR": str(folder / "spool")})
    with proc:
        yield proc


@pytest.fixture()
def client(demo: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=demo.base_url + "/v1", api_key=DEMO_KEY, max_retries=0, timeout=30)


def _ask(client: openai.OpenAI, question: str) -> tuple[str, str, str | None, str]:
    raw = client.chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": question}], temperature=0
    )
    completion = raw.parse()
    text = completion.choices[0].message.content or ""
    return raw.headers["x-strait-cache"], text, raw.headers.get("x-strait-cache-similarity"), completion.id


def test_the_demo_serves_a_repeat_and_a_rewording_from_the_cache(client: openai.OpenAI) -> None:
    state, first, _, first_id = _ask(client, "How do I reset my router to factory settings?")
    assert state == "miss" and first
    state, again, _, again_id = _ask(client, "How do I reset my router to factory settings?")
    assert state == "hit" and again == first and again_id != first_id
    state, reworded, similarity, _ = _ask(client, "How can I reset my router to factory settings?")
    assert state == "semantic-hit" and reworded == first
    assert similarity is not None and 0.9 <= float(similarity) <= 1.0


def test_a_streamed_hit_is_a_stream_the_sdk_reads(client: openai.OpenAI) -> None:
    question = [{"role": "user", "content": "Name three primary colours."}]
    first = client.chat.completions.create(model="chat", messages=question, temperature=0)
    stream = client.chat.completions.with_raw_response.create(
        model="chat", messages=question, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    assert stream.headers["x-strait-cache"] == "hit"
    chunks = list(stream.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == first.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == first.usage.completion_tokens  # type: ignore[union-attr]


def test_feedback_on_a_semantic_hit(client: openai.OpenAI, demo: ServerProcess) -> None:
    _ask(client, "What is the tallest mountain on Earth?")
    state, _, _, hit_id = _ask(client, "What's the tallest mountain on Earth?")
    assert state == "semantic-hit"
    r = httpx.post(
        demo.base_url + "/v1/cache/feedback",
        json={"id": hit_id, "reason": "wrong mountain"},
        headers={"authorization": f"Bearer {DEMO_KEY}"},
        timeout=10,
    )
    assert r.status_code == 200 and r.json()["recorded"] is True
    state, *_ = _ask(client, "What's the tallest mountain on Earth?")
    assert state == "miss"
