"""Prompt tokens are counted only when something needs them: a request through an open policy with no
token limit never runs the tokenizer; a token limit, a context window the cheap bound does not clear, a
cost-ranked route, or an upstream that reports no usage each count it, once."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from litestar.testing import TestClient

import gateway.tokens
from gateway.app import create_app
from gateway.contracts import UpstreamCall, UpstreamResponse
from gateway.policy.index import key_digest
from gateway.policy.model import Backend
from gateway.settings import Settings
from gateway.tokens import PromptTokens, count_chat, count_text, utf8_bound

KEY = "sk-lazy-prompt-tenant-0001"
PROMPT = "a prompt of some length, to be counted only when needed"


class Answering:
    """An upstream that answers every chat request, with usage unless the backend's name says otherwise."""

    def __init__(self, backend: Backend) -> None:
        self.usage = backend.name != "silent"

    async def send(self, call: UpstreamCall) -> UpstreamResponse:
        body: dict[str, object] = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": call.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        }
        if self.usage:
            body["usage"] = {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8}
        return UpstreamResponse(
            status=200, body=json.dumps(body).encode(), headers={"content-type": "application/json"}
        )

    async def aclose(self) -> None:
        return None


def policy(*, tenants: str = "", window: str = "", objective: str = "ordered", backend: str = "up") -> str:
    return f"""
version: 1
backends:
  - {{name: {backend}, adapter: answering, base_url: "http://upstream.invalid/v1"}}
models:
  - {{name: m, {window} deployments: [{{backend: {backend}, upstream_model: x}}]}}
routes:
  - {{name: chat, objective: {objective}, models: [m]}}
{tenants}
"""


LIMITED = f"""
tenants:
  - name: t
    keys: [{{id: k, digest: "{key_digest(KEY)}"}}]
    limits: {{tenant: {{tokens_per_minute: 100000}}}}
"""
REQUESTS_ONLY = f"""
tenants:
  - name: t
    keys: [{{id: k, digest: "{key_digest(KEY)}"}}]
    limits: {{tenant: {{requests_per_minute: 1000, max_concurrency: 10}}}}
"""


@pytest.fixture()
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every tokenizer run of the gateway's prompt counter, by its result."""
    calls: list[int] = []

    def spy_chat(texts: list[str], encoding_name: str = gateway.tokens.FALLBACK_ENCODING) -> int:
        calls.append(count_chat(texts, encoding_name))
        return calls[-1]

    monkeypatch.setattr(gateway.tokens, "count_chat", spy_chat)
    return calls


@pytest.fixture()
def run(tmp_path: Path) -> Iterator[Callable[[str], int]]:
    clients: list[TestClient[object]] = []

    def send(text: str) -> int:
        path = tmp_path / "policy.yaml"
        path.write_text(text)
        app = create_app(
            Settings(policy_path=str(path), spool_dir=str(tmp_path / "spool")),
            factories={"answering": Answering},  # type: ignore[dict-item]
        )
        client = TestClient(app)
        clients.append(client)
        client.__enter__()
        r = client.post(
            "/v1/chat/completions",
            json={"model": "chat", "messages": [{"role": "user", "content": PROMPT}]},
            headers={"authorization": f"Bearer {KEY}"},
        )
        return r.status_code

    yield send
    for client in clients:
        client.__exit__(None, None, None)


def test_an_open_policy_without_token_limits_never_runs_the_tokenizer(
    run: Callable[[str], int], counted: list[int]
) -> None:
    assert run(policy()) == 200
    assert counted == []


def test_request_and_concurrency_limits_do_not_need_the_count(run: Callable[[str], int], counted: list[int]) -> None:
    assert run(policy(tenants=REQUESTS_ONLY)) == 200
    assert counted == []


def test_a_context_window_the_bound_clears_does_not_need_the_count(
    run: Callable[[str], int], counted: list[int]
) -> None:
    assert run(policy(window="context_window: 100000,")) == 200
    assert counted == []


@pytest.mark.parametrize(
    ("text", "why"),
    [
        (policy(tenants=LIMITED), "a token rate limit reserves prompt + max_tokens"),
        (policy(window="context_window: 40,"), "the bound (UTF-8 bytes) does not clear the window"),
        (policy(objective="cost"), "cost ranking reads the prompt's size"),
        (policy(backend="silent"), "the upstream sent no usage: accounting estimates"),
    ],
)
def test_whatever_needs_the_count_gets_it_counted_once(
    run: Callable[[str], int], counted: list[int], text: str, why: str
) -> None:
    assert run(text) == 200, why
    assert counted == [count_chat([PROMPT])], why


async def test_a_long_prompt_is_counted_off_the_event_loop_and_only_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    threads: list[str] = []

    def spy(texts: list[str], encoding_name: str = gateway.tokens.FALLBACK_ENCODING) -> int:
        threads.append(threading.current_thread().name)
        return count_chat(texts, encoding_name)

    monkeypatch.setattr(gateway.tokens, "count_chat", spy)
    long = ["word " * (gateway.tokens.OFFLOAD_CHARS // 5 + 1)]
    prompt = PromptTokens(lambda: long, chat=True)
    assert prompt.known is None
    assert await prompt.count() == await prompt.count() == prompt.count_now() == count_chat(long)
    assert len(threads) == 1 and threads[0] != threading.main_thread().name


@settings(max_examples=200, deadline=None)
@given(texts=st.lists(st.text(max_size=200), max_size=5), chat=st.booleans())
def test_the_cheap_bound_is_never_below_the_count(texts: list[str], chat: bool) -> None:
    counter = PromptTokens(lambda: texts, chat=chat)
    exact = count_chat(texts) if chat else sum(count_text(t) for t in texts)
    assert utf8_bound(texts) >= sum(count_text(t) for t in texts)
    assert counter.bound() >= exact == counter.count_now()


async def test_the_first_count_with_an_encoding_not_yet_built_builds_it_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Building an encoding takes up to a second or so: the first short prompt must not pay it on the loop.
    import threading

    threads: list[str] = []
    real = gateway.tokens.encoding
    expected = count_chat(["a short question"])

    def spy(name: str) -> object:
        threads.append(threading.current_thread().name)
        return real(name)

    monkeypatch.setattr(gateway.tokens, "encoding", spy)
    gateway.tokens.forget_encodings()  # as in a process that never counted
    prompt = PromptTokens(lambda: ["a short question"], chat=True)
    assert prompt.long()  # the accounting tap counts it in a worker thread for this reason
    assert await prompt.count() == expected
    assert threads and threading.main_thread().name not in threads
    assert gateway.tokens.built(gateway.tokens.FALLBACK_ENCODING)
    short = PromptTokens(lambda: ["again"], chat=True)
    assert not short.long()  # built now: a short prompt is counted in place
