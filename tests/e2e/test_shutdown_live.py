"""SIGTERM against a real `strait serve` with Redis state: it stops accepting at once, finishes the streams
in flight, flushes their usage records to the ledger, then exits 0 (not 143, death by the signal); a
stream still running when the grace period (STRAIT_SHUTDOWN_GRACE_S) runs out ends with an in-band error
event, never a silent cut, and is charged for what the upstream produced."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import redis

from gateway.accounting.spool import Spool
from gateway.policy.index import key_digest
from tests.harness.fake_control import FakeControl
from tests.harness.gateway import gateway_process
from tests.harness.procs import ServerProcess
from tests.harness.redis_proc import RedisProc
from tests.harness.waiting import poll

KEY = "sk-tenant-shutdown-0b7e"
TOKENS = 30


def _refuses_connections(base_url: str) -> bool:
    try:
        httpx.get(base_url + "/healthz", timeout=2)
    except httpx.ConnectError:
        return True
    except httpx.HTTPError:
        return False
    return False


def _policy(fake_url: str) -> str:
    return f"""
version: 1
backends:
  - {{name: fake, adapter: openai, base_url: "{fake_url}/v1", api_key: "env:SHUTDOWN_BACKEND_KEY"}}
models:
  - {{name: m, deployments: [{{backend: fake, upstream_model: fake-model}}]}}
routes:
  - {{name: chat, models: [m]}}
tenants:
  - name: t
    keys: [{{id: t-1, digest: "{key_digest(KEY)}"}}]
"""


def _ledger(server: RedisProc) -> list[dict[str, Any]]:
    """The final usage records in the tenant's ledger stream, read straight from Redis."""
    with redis.Redis(port=server.port) as c:
        entries = c.xrange("strait:{t:t}:ledger")
    records = [json.loads(fields[b"r"]) for _, fields in entries]
    return [r for r in records if r["final"]]


def _gateway(fake: ServerProcess, redis_server: RedisProc, folder: Path, **env: str) -> ServerProcess:
    policy = folder / "policy.yaml"
    policy.write_text(_policy(fake.base_url))
    env = {
        "SHUTDOWN_BACKEND_KEY": "sk-x-0000",
        "STRAIT_STATE": redis_server.url,
        "STRAIT_SPOOL_DIR": str(folder / "spool"),
        # Generous: event-loop lag on 2 shared cores counts against it.
        "STRAIT_STATE_TIMEOUT_MS": "2000",
        **env,
    }
    return gateway_process(policy, log_path=folder / "gateway.log", env=env)


def test_sigterm_drains_a_stream_then_exits_0(
    fake_upstream: ServerProcess, fresh_redis: RedisProc, tmp_path: Path
) -> None:
    proc = _gateway(fake_upstream, fresh_redis, tmp_path)
    with proc:
        client = openai.OpenAI(base_url=proc.base_url + "/v1", api_key=KEY, max_retries=0, timeout=30)
        # One token per event, 60 ms apart: the stream lasts about 1.8 s after its first event, far longer
        # than the signal takes to arrive, and well inside the 25 s default grace period.
        fake = {"tokens": TOKENS, "chunk_tokens": 1, "chunk_delay_ms": 60, "marker": False}
        stream = client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}], stream=True, extra_body={"fake": fake}
        )
        words: list[str] = []
        closed_at: int | None = None  # how many words had arrived when new connections were first refused
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                words.append(chunk.choices[0].delta.content)
                if len(words) == 1:
                    proc.signal(signal.SIGTERM)  # the synchronisation: the first event has arrived
                elif closed_at is None and _refuses_connections(proc.base_url):
                    closed_at = len(words)
        assert proc.proc is not None
        returncode = proc.proc.wait(timeout=30)
        log = proc.read_log()
    # Shutdown was under way (the listener closed) while the stream was still in flight...
    assert closed_at is not None and closed_at < TOKENS
    # ...and the stream still ended normally ([DONE]: the SDK raised nothing), whole.
    assert len("".join(words).split()) == TOKENS
    assert returncode == 0, f"exit status {returncode}; log: {log}"
    # Its usage record reached the ledger before the process exited (nothing left in memory or spooled).
    [record] = _ledger(fresh_redis)
    assert record["completion_tokens"] == TOKENS and not record["partial"] and record["status"] == 200
    assert not Spool(tmp_path / "spool").pending()


def test_a_stream_past_the_grace_period_ends_with_an_error_event_and_is_charged(
    fake_upstream: ServerProcess, fresh_redis: RedisProc, tmp_path: Path
) -> None:
    proc = _gateway(fake_upstream, fresh_redis, tmp_path, STRAIT_SHUTDOWN_GRACE_S="1")
    fake = FakeControl(fake_upstream.base_url)
    start = max((r["n"] for r in fake.ledger()), default=0)
    # Two events, then the upstream stalls with the connection open, for ever: only the grace period ends it.
    body = {
        "model": "chat",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "fake": {"tokens": 20, "chunk_tokens": 1, "stall_after_chunks": 2, "marker": False},
    }
    lines: list[str] = []
    signalled = False
    with proc:
        headers = {"authorization": f"Bearer {KEY}"}
        with httpx.stream("POST", proc.base_url + "/v1/chat/completions", json=body, headers=headers, timeout=30) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                lines.append(line)
                if not signalled and line.startswith("data: {") and '"content"' in line:
                    proc.signal(signal.SIGTERM)  # the synchronisation: content has arrived
                    signalled = True
        assert proc.proc is not None
        returncode = proc.proc.wait(timeout=30)
        log = proc.read_log()
    events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    # Not a stream that just stops: its last event is an error the SDKs raise, and there is no [DONE].
    assert "[DONE]" not in events
    last = json.loads(events[-1])
    assert last["error"]["code"] == "shutting_down", events
    assert returncode == 0, f"exit status {returncode}; log: {log}"
    # Charged for what the upstream produced, flagged partial.
    [record] = _ledger(fresh_redis)
    assert record["partial"] and record["completion_tokens"] >= 1, record
    # The upstream was let go (the engine stops generating for nobody).
    [upstream] = [r for r in fake.ledger(since=start) if r["path"] == "/v1/chat/completions"]
    assert upstream["client_disconnected"] and upstream["ended_at"] is not None
    fake.close()


def test_sigterm_on_an_idle_gateway_exits_0(fake_upstream: ServerProcess, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(_policy(fake_upstream.base_url))
    proc = gateway_process(policy, log_path=tmp_path / "gateway.log", env={"SHUTDOWN_BACKEND_KEY": "sk-x-0000"})
    with proc:
        proc.signal(signal.SIGTERM)
        assert proc.proc is not None
        assert proc.proc.wait(timeout=30) == 0, proc.read_log()


def _draining(base_url: str) -> bool:
    r = httpx.get(base_url + "/readyz", timeout=5)
    return r.status_code == 503 and r.json()["status"] == "draining"


def test_with_a_drain_delay_the_replica_reports_draining_and_still_serves_until_it_closes(
    fake_upstream: ServerProcess, fresh_redis: RedisProc, tmp_path: Path
) -> None:
    """STRAIT_DRAIN_DELAY_S (Kubernetes' preStop sleep, Envoy's drain time): on SIGTERM /readyz answers
    503 `draining` at once, so a load balancer takes the replica out of rotation, while requests that still
    arrive, on new connections too, are served; only after the delay does the listener close and the
    process exit 0. Without it (delay 0) the listener closes within uvicorn's next tick (~0.1 s) and a
    balancer that has not yet seen the readiness change sends requests to a closed port."""
    proc = _gateway(fake_upstream, fresh_redis, tmp_path, STRAIT_DRAIN_DELAY_S="8")
    body = {"model": "chat", "messages": [{"role": "user", "content": "still there?"}]}
    auth = {"authorization": f"Bearer {KEY}"}
    with proc:
        assert httpx.get(proc.base_url + "/readyz", timeout=5).status_code == 200
        proc.signal(signal.SIGTERM)
        assert poll(lambda: _draining(proc.base_url)), "readiness never turned draining"
        draining_at = time.monotonic()
        served: list[int] = []
        # New connections (one per httpx.post) until one is refused: each is answered in full meanwhile.
        while time.monotonic() - draining_at < 60:
            try:
                r = httpx.post(proc.base_url + "/v1/chat/completions", json=body, headers=auth, timeout=30)
            except httpx.ConnectError:
                break
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text
            served.append(r.status_code)
        open_for = time.monotonic() - draining_at
        assert proc.proc is not None
        returncode = proc.proc.wait(timeout=60)
        log = proc.read_log()
    # Accepting for seconds after it said draining (a lower bound: a busy machine only lengthens it).
    assert open_for >= 2.0 and len(served) >= 2, (open_for, len(served))
    assert returncode == 0, f"exit status {returncode}; log: {log}"
    whole_log = (tmp_path / "gateway.log").read_text(errors="replace")
    assert "shutting down in 8 s" in whole_log
    # 8 s of delay + the default 25 s grace: past a 30 s kill timeout, which it said at start.
    assert "STRAIT_DRAIN_DELAY_S + STRAIT_SHUTDOWN_GRACE_S = 33 s" in whole_log
    # Every request served during the delay was accounted before the exit.
    assert [r["status"] for r in _ledger(fresh_redis)] == served
