"""Body sizes through the compose stack's nginx (the committed docker/nginx.conf, Debian's nginx) in front of
two real `strait serve` replicas: the policy's limit (server.max_body_bytes, 4 MiB) is the one clients meet,
answered by the gateway in OpenAI's envelope; nginx's own bound is far above it and answers in the same
envelope, never nginx's HTML page (the SDKs would surface an unreadable error)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx

from tests.deploy.stack import GATEWAYS
from tests.deploy.test_failover import Nginx, redis_aof  # noqa: F401 - the fixture, shared
from tests.harness.gateway import replica_processes
from tests.harness.procs import REPO_ROOT
from tests.harness.redis_proc import RedisProc

KEY = "sk-strait-demo"


def _raw_post(port: int, content_length: int) -> tuple[int, bytes]:
    """A request that announces `content_length` bytes and sends none: nginx decides from the header alone."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {content_length}\r\n\r\n"
        )
        conn.sendall(head.encode())
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def test_over_the_policys_limit_the_gateway_answers_and_past_nginxs_bound_nginx_answers_alike(
    tmp_path: Path,
    redis_aof: RedisProc,  # noqa: F811
) -> None:
    policy = REPO_ROOT / "policies" / "compose.yaml"
    with replica_processes(policy, redis_aof.url, len(GATEWAYS), tmp_path) as replicas:
        nginx = Nginx(tmp_path, {name: gw.port for name, gw in zip(GATEWAYS, replicas, strict=True)}).start()
        try:
            # 5 MiB: past the policy's 4 MiB, well inside nginx's bound: the gateway's own 413.
            big = {"model": "chat", "messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]}
            r = httpx.post(
                f"http://127.0.0.1:{nginx.port}/v1/chat/completions",
                content=json.dumps(big).encode(),
                headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"},
                timeout=60,
            )
            assert r.status_code == 413, r.text
            assert r.json()["error"]["code"] == "request_too_large" and "x-strait-request-id" in r.headers
            # Past nginx's own bound: refused from the header, in the same envelope.
            status, body = _raw_post(nginx.port, 65 * 1024 * 1024)
            assert status == 413, body
            error = json.loads(body)["error"]
            assert error["code"] == "request_too_large" and error["type"] == "invalid_request_error"
            assert b"<html" not in body
        finally:
            nginx.stop()
