"""The TCP fault proxy against a real redis-server (its own port, never 6379) and against the fake upstream.

Redis is spoken over raw sockets here (RESP inline commands), so no client library's retries or pools can hide what
the proxy did.  Timing checks are lower bounds; waits are deadlines on a condition.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.harness.fault_proxy import FaultProxy
from tests.harness.procs import ServerProcess, free_port
from tests.harness.redis_proc import RedisProc
from tests.harness.sse import SSEParser

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisProc]:
    with RedisProc() as r:
        assert r.port != 6379
        yield r


@pytest.fixture()
def proxy(redis_server: RedisProc) -> Iterator[FaultProxy]:
    with FaultProxy(redis_server.port) as p:
        yield p


@pytest.fixture(scope="module")
def fake() -> Iterator[ServerProcess]:
    port = free_port()
    argv = [sys.executable, "-m", "tests.harness.fake_upstream", "--port", str(port)]
    with ServerProcess(argv, port, ready_path="/healthz") as proc:
        yield proc


def connect(port: int, timeout: float = 2.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.settimeout(timeout)
    return s


def command(s: socket.socket, *args: str) -> bytes:
    """Send one RESP command and read one simple reply line (+OK, +PONG, :n, -ERR, or a short $bulk)."""
    parts = [f"*{len(args)}\r\n".encode()]
    for a in args:
        parts.append(f"${len(a.encode())}\r\n{a}\r\n".encode())
    s.sendall(b"".join(parts))
    data = b""
    while not data.endswith(b"\r\n") or (data.startswith(b"$") and data.count(b"\r\n") < 2 and data != b"$-1\r\n"):
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def read_bulk(s: socket.socket, size: int) -> bytes:
    """Read a `$size` bulk reply whole."""
    want = len(f"${size}\r\n") + size + 2
    data = b""
    while len(data) < want:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


# ---------------------------------------------------------------------------------------------------------------------
# Redis behind the proxy.


def test_pass_forwards_both_ways(proxy: FaultProxy, redis_server: RedisProc) -> None:
    key = "k-" + uuid.uuid4().hex
    with connect(proxy.port) as s:
        assert command(s, "PING") == b"+PONG\r\n"
        assert command(s, "SET", key, "through-the-proxy") == b"+OK\r\n"
    with connect(redis_server.port) as direct:
        assert command(direct, "GET", key) == b"$17\r\nthrough-the-proxy\r\n"  # it really reached Redis
    stats = proxy.wait_for(lambda st: st["active"] == 0)
    assert stats["accepted"] == 1 and stats["bytes_up"] > 0 and stats["bytes_down"] > 0


def test_latency_is_added_per_direction_at_run_time(proxy: FaultProxy) -> None:
    with connect(proxy.port) as s:
        assert command(s, "PING") == b"+PONG\r\n"
        proxy.set(mode="latency", latency_ms=150)  # the open connection is affected too
        t0 = time.monotonic()
        assert command(s, "PING") == b"+PONG\r\n"
        assert time.monotonic() - t0 >= 0.29  # 150 ms each way
        proxy.set(direction="upstream")
        t0 = time.monotonic()
        assert command(s, "PING") == b"+PONG\r\n"
        assert time.monotonic() - t0 >= 0.145
    assert proxy.settings.latency_ms == 150 and proxy.settings.direction == "upstream"


def test_bandwidth_cap(proxy: FaultProxy, redis_server: RedisProc) -> None:
    key, value = "big-" + uuid.uuid4().hex, "v" * 30_000
    with connect(redis_server.port) as direct:
        assert command(direct, "SET", key, value) == b"+OK\r\n"
    proxy.set(mode="bandwidth", bandwidth_bps=40_000, direction="downstream")
    with connect(proxy.port, timeout=5) as s:
        t0 = time.monotonic()
        s.sendall(f"GET {key}\r\n".encode())
        reply = read_bulk(s, 30_000)
        elapsed = time.monotonic() - t0
    assert reply.endswith(value.encode() + b"\r\n")
    assert elapsed >= 0.6  # 30 kB at 40 kB/s is 0.75 s; pacing writes then sleeps, so at least 28 kB/40 kB/s


def test_reset_after_bytes_cuts_at_an_exact_offset(proxy: FaultProxy, redis_server: RedisProc) -> None:
    key = "cut-" + uuid.uuid4().hex
    with connect(redis_server.port) as direct:
        assert command(direct, "SET", key, "x" * 5000) == b"+OK\r\n"
    proxy.set(reset_after_bytes=1000, direction="downstream")
    got = b""
    with connect(proxy.port) as s, pytest.raises(ConnectionResetError):
        s.sendall(f"GET {key}\r\n".encode())
        while chunk := s.recv(65536):
            got += chunk
    assert len(got) == 1000 and got.startswith(b"$5000\r\n")
    proxy.set(reset_after_bytes=None)
    with connect(proxy.port) as s:
        s.sendall(f"GET {key}\r\n".encode())
        assert read_bulk(s, 5000).endswith(b"x\r\n")


def test_reset_existing_and_new_connections(proxy: FaultProxy) -> None:
    s = connect(proxy.port)
    assert command(s, "PING") == b"+PONG\r\n"
    proxy.set(mode="reset")
    with pytest.raises(ConnectionResetError):
        s.recv(10)  # the open connection got an RST, not a FIN (recv would return b"")
    s.close()
    # A new connection is reset as soon as the proxy accepts it: at connect() when that is quick, else at first I/O.
    with pytest.raises((ConnectionResetError, BrokenPipeError)), connect(proxy.port) as fresh:
        command(fresh, "PING")
    assert proxy.wait_for(lambda st: st["reset"] >= 2)["reset"] >= 2
    proxy.set(mode="pass")
    with connect(proxy.port) as again:
        assert command(again, "PING") == b"+PONG\r\n"


def test_blackhole_accepts_and_never_answers(proxy: FaultProxy, redis_server: RedisProc) -> None:
    old = connect(proxy.port, timeout=0.3)
    assert command(old, "PING") == b"+PONG\r\n"
    proxy.set(mode="blackhole")
    with pytest.raises(TimeoutError):
        command(old, "PING")  # open connection: the request is swallowed
    with connect(proxy.port, timeout=0.3) as new, pytest.raises(TimeoutError):
        command(new, "PING")  # new connection: accepted, read, never answered
    assert redis_server.ping()  # Redis itself is fine
    proxy.wait_for(lambda st: st["blackholed"] == 2)  # both were taken in by the blackhole (not just queued)
    proxy.set(mode="pass")
    with connect(proxy.port) as fresh:
        assert command(fresh, "PING") == b"+PONG\r\n"
    with pytest.raises(TimeoutError):
        command(old, "PING")  # a blackholed connection stays broken: its bytes were dropped
    old.close()
    st = proxy.stats()
    assert st["blackholed"] == 2 and st["bytes_dropped"] > 0


def test_refuse_closes_the_listener_and_reopens_it(proxy: FaultProxy) -> None:
    kept = connect(proxy.port)
    assert command(kept, "PING") == b"+PONG\r\n"  # accepted and forwarding before the listener closes
    proxy.set(mode="refuse")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=1)
    assert command(kept, "PING") == b"+PONG\r\n"  # open connections keep working
    kept.close()
    proxy.set(mode="pass")
    with connect(proxy.port) as s:
        assert command(s, "PING") == b"+PONG\r\n"


def test_dead_target_resets_the_client() -> None:
    with FaultProxy(free_port()) as p:
        with pytest.raises((ConnectionResetError, BrokenPipeError)), connect(p.port) as s:
            command(s, "PING")
        assert p.wait_for(lambda st: st["target_failures"] == 1)["reset"] == 1


def test_bad_settings_are_refused(proxy: FaultProxy) -> None:
    with pytest.raises(ValueError, match="mode"):
        proxy.set(mode="explode")
    with pytest.raises(ValueError, match="unknown"):
        proxy.set(latency=5)
    with pytest.raises(ValueError):
        proxy.set(bandwidth_bps=0)
    assert proxy.settings.mode == "pass"


def test_close_stops_listening() -> None:
    with RedisProc() as r:
        p = FaultProxy(r.port).start()
        port = p.port
        held = connect(port)
        assert command(held, "PING") == b"+PONG\r\n"
        p.close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1)
        with contextlib.suppress(ConnectionResetError):  # open connections end too: a FIN (b"") or an RST
            assert held.recv(10) == b""
        held.close()


# ---------------------------------------------------------------------------------------------------------------------
# The fake upstream behind the proxy.


def chat(stream: bool = False, **fake: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": MESSAGES, "stream": stream, "fake": fake}


def test_http_through_the_proxy_with_latency(fake: ServerProcess) -> None:
    with FaultProxy(fake.port) as p, httpx.Client(base_url=p.url(), timeout=10) as c:
        assert c.post("/v1/chat/completions", json=chat()).status_code == 200
        p.set(mode="latency", latency_ms=200, direction="downstream")
        t0 = time.monotonic()
        r = c.post("/v1/chat/completions", json=chat())
        assert r.status_code == 200 and time.monotonic() - t0 >= 0.19
        assert r.json()["choices"][0]["message"]["content"]


def test_reset_mid_stream_reaches_both_ends(fake: ServerProcess) -> None:
    test_id = uuid.uuid4().hex
    payload = chat(stream=True, tokens=400, chunk_tokens=1, chunk_delay_ms=20)
    parser = SSEParser()
    datas: list[str] = []
    with (
        FaultProxy(fake.port) as p,
        httpx.Client(base_url=p.url(), timeout=10) as c,
        pytest.raises(httpx.ReadError, match="reset"),
        c.stream("POST", "/v1/chat/completions", json=payload, headers={"x-test-id": test_id}) as r,
    ):
        for chunk in r.iter_raw():
            datas.extend(e.data for e in parser.feed(chunk))
            if len(datas) >= 3 and p.settings.mode == "pass":
                p.set(mode="reset")
    assert "[DONE]" not in datas
    # The upstream side of the proxy was reset too: the fake records the client as gone.
    deadline = time.monotonic() + 5
    with httpx.Client(base_url=fake.base_url, timeout=5) as direct:
        while True:
            recs = [x for x in direct.get("/_ledger").json() if x["headers"].get("x-test-id") == test_id]
            if recs and recs[0]["client_disconnected"]:
                break
            assert time.monotonic() < deadline, f"the fake never saw the reset: {recs}"
    assert 2 <= recs[0]["completion_tokens_generated"] < 400 and not recs[0]["finished"]


def test_upstream_rst_is_passed_on_as_rst(fake: ServerProcess) -> None:
    """The fake's own RST (fault:reset) reaches the client as a reset, a FIN as an empty answer."""
    with FaultProxy(fake.port) as p, httpx.Client(base_url=p.url(), timeout=10) as c:
        with pytest.raises(httpx.ReadError, match="reset"):
            c.post("/v1/chat/completions", json={"model": "fault:reset", "messages": MESSAGES})
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            c.post("/v1/chat/completions", json={"model": "fault:fin", "messages": MESSAGES})
        ok = c.post("/v1/chat/completions", json=chat())
        assert ok.status_code == 200 and json.loads(ok.text)["object"] == "chat.completion"


def test_process_mode_with_http_control(redis_server: RedisProc) -> None:
    port, control = free_port(), free_port()
    argv = [sys.executable, "-m", "tests.harness.fault_proxy", "--target-port", str(redis_server.port)]
    argv += ["--port", str(port), "--control-port", str(control)]
    with ServerProcess(argv, control, ready_path="/healthz") as proc, httpx.Client(base_url=proc.base_url) as c:
        with connect(port) as s:
            assert command(s, "PING") == b"+PONG\r\n"
        deadline = time.monotonic() + 5
        while c.get("/_proxy").json()["stats"]["active"]:  # the proxy has seen that connection close
            assert time.monotonic() < deadline
        view = c.post("/_proxy", json={"mode": "reset"}).json()
        assert view["settings"]["mode"] == "reset"
        with pytest.raises((ConnectionResetError, BrokenPipeError)), connect(port) as s:
            command(s, "PING")
        assert c.post("/_proxy", json={"mode": "nope"}).status_code == 400
        c.post("/_proxy", json={"mode": "pass"})
        with connect(port) as s:
            assert command(s, "PING") == b"+PONG\r\n"
        stats = c.get("/_proxy").json()["stats"]
        assert stats["accepted"] == 3 and stats["reset"] == 1
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1)  # stopped by PID: nothing listens any more
