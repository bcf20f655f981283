"""The load test's reference proxy (`loadtest/reference_proxy.py`) answers through a real redis-server and the
fast upstream: a wrong key is refused, a JSON and a streamed request pass, and its batched accounting lands
in Redis (one usage record per request, every concurrency slot released). Every process is stopped by PID."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from gateway.policy.index import key_digest
from tests.harness.procs import ServerProcess, free_port
from tests.harness.redis_proc import RedisProc

KEY = "sk-reference-test-1"


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    logs: Path = tmp_path_factory.mktemp("reference")
    up_port, port = free_port(), free_port()
    upstream_argv = [sys.executable, "-m", "loadtest.fast_upstream", "--host", "127.0.0.1", "--port", str(up_port)]
    with RedisProc() as rds, ServerProcess(upstream_argv, up_port, log_path=logs / "upstream.log"):
        argv = [sys.executable, "-m", "loadtest.reference_proxy", "--port", str(port)]
        argv += ["--upstream", f"http://127.0.0.1:{up_port}/v1", "--redis", rds.url, "--key-digest", key_digest(KEY)]
        with ServerProcess(argv, port, ready_path="/readyz", log_path=logs / "proxy.log"):
            yield f"http://127.0.0.1:{port}/v1/chat/completions", rds.port


def _body(stream: bool) -> dict[str, object]:
    return {"model": "bench", "messages": [{"role": "user", "content": "hi"}], "stream": stream}


def test_json_stream_and_accounting(proxy: tuple[str, int]) -> None:
    url, redis_port = proxy
    auth = {"authorization": f"Bearer {KEY}"}
    assert httpx.post(url, json=_body(False), headers={"authorization": "Bearer nope"}).status_code == 401

    r = httpx.post(url, json=_body(False), headers=auth)
    assert r.status_code == 200
    assert r.json()["usage"]["completion_tokens"] == 50

    with httpx.stream("POST", url, json=_body(True), headers=auth) as s:
        assert s.status_code == 200
        events = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert len(events) == 13  # role + 10 content + finish + [DONE]; the usage chunk it asked for is stripped
    assert not any('"usage"' in e for e in events)

    client = redis.Redis(port=redis_port)
    deadline = time.monotonic() + 3
    while client.xlen("ref:usage") < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.xlen("ref:usage") == 2
    assert client.zcard("ref:slots:bench") == 0
    days = [client.hgetall(k) for k in client.scan_iter("ref:totals:bench:*")]  # one, unless at midnight UTC
    assert sum(int(d[b"requests"]) for d in days) == 2
    assert sum(int(d[b"completion_tokens"]) for d in days) == 100
    client.close()
