"""The pipeline in-process: stage order, short-circuit by a Reply, on_response in reverse, errors that
propagate; and one request through the real runtime (create_app, simulated adapter, memory state)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from litestar.testing import TestClient

from gateway.app import create_app
from gateway.context import RequestContext
from gateway.errors import RateLimited
from gateway.pipeline import Pipeline, RequestOnly
from gateway.policy.index import key_digest
from gateway.reply import Reply
from gateway.settings import Settings


def make_ctx() -> RequestContext:
    return RequestContext(request_id="r1", operation="chat", started=0.0, headers={})


class Recording:
    def __init__(self, name: str, log: list[str], answer: Reply | None = None, fail: bool = False) -> None:
        self.name = name
        self.log = log
        self.answer = answer
        self.fail = fail

    async def on_request(self, ctx: RequestContext) -> Reply | None:
        self.log.append(f"{self.name}.request")
        if self.fail:
            raise RateLimited("no")
        return self.answer

    async def on_response(self, ctx: RequestContext, reply: Reply) -> Reply:
        self.log.append(f"{self.name}.response")
        reply.headers[f"x-{self.name}"] = "seen"
        return reply


class Quiet(RequestOnly):
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    async def on_request(self, ctx: RequestContext) -> None:
        self.log.append(f"{self.name}.request")


class Terminal:
    name = "terminal"

    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def call(self, ctx: RequestContext) -> Reply:
        self.log.append("terminal")
        return Reply(status=200, headers={}, body=b"{}")


def test_stages_run_in_order_then_the_terminal_then_on_response_in_reverse() -> None:
    log: list[str] = []
    pipeline = Pipeline([Recording("a", log), Quiet("q", log), Recording("b", log)], Terminal(log))
    reply = asyncio.run(pipeline.run(make_ctx()))
    assert log == ["a.request", "q.request", "b.request", "terminal", "b.response", "a.response"]
    assert reply.status == 200 and reply.headers == {"x-b": "seen", "x-a": "seen"}


def test_a_reply_short_circuits_later_stages_and_the_terminal() -> None:
    log: list[str] = []
    cached = Reply(status=200, headers={}, body=b'{"cached":true}')
    stages = [Recording("a", log), Recording("cache", log, answer=cached), Recording("c", log)]
    reply = asyncio.run(Pipeline(stages, Terminal(log)).run(make_ctx()))
    # The answering stage built the reply: only the stages before it see it on the way back.
    assert log == ["a.request", "cache.request", "a.response"]
    assert reply is cached and reply.headers == {"x-a": "seen"}


def test_an_error_raised_by_a_stage_propagates_without_on_response() -> None:
    log: list[str] = []
    stages = [Recording("a", log), Recording("limits", log, fail=True), Recording("c", log)]
    with pytest.raises(RateLimited):
        asyncio.run(Pipeline(stages, Terminal(log)).run(make_ctx()))
    assert log == ["a.request", "limits.request"]


KEY = "sk-pipeline-tenant-0001"
POLICY = f"""
version: 1
backends:
  - {{name: sim, adapter: simulated, simulated: {{ttft_ms: 0, tokens_per_second: 1000000, output_tokens: 5}}}}
models:
  - {{name: m, deployments: [{{backend: sim, upstream_model: sim-1}}]}}
routes:
  - {{name: chat, models: [m]}}
tenants:
  - name: acme
    explain: true
    keys: [{{id: k1, digest: "{key_digest(KEY)}"}}]
"""


def test_through_the_real_runtime(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    app = create_app(Settings(policy_path=str(policy), spool_dir=str(tmp_path / "spool")))
    body = {"model": "chat", "messages": [{"role": "user", "content": "hello"}]}
    with TestClient(app) as client:
        # auth runs before decode: a body that is not even JSON is never parsed for an unknown client.
        refused = client.post("/v1/chat/completions", content=b"{not json")
        assert refused.status_code == 401
        client.headers["authorization"] = f"Bearer {KEY}"
        assert client.post("/v1/chat/completions", content=b"{not json").status_code == 400
        r = client.post("/v1/chat/completions", json=body, headers={"x-strait-explain": "1"})
        assert r.status_code == 200 and r.headers["x-strait-route"] == "chat"
        decision = r.headers["x-strait-decision"]
        assert decision in r.headers["x-strait-explain"]
        assert client.get(f"/admin/decisions/{decision}").status_code == 200
        s = client.post("/v1/chat/completions", json={**body, "stream": True})
        assert s.status_code == 200 and s.text.rstrip().endswith("data: [DONE]")
