"""The processes compose runs, for real on loopback: two gateway replicas (`strait serve`, the stack's policy),
Debian's nginx with the committed docker/nginx.conf in front (ports templated), one redis-server with the
committed persistence settings (AOF). Traffic goes through nginx; one replica is SIGKILLed mid-run.

Proven: nginx routes around the dead replica (every request sent after the kill is answered 200, by the
survivor); the only requests that fail are ones that were in flight on the dead replica at the kill; every
answered request's final usage record is in Redis (except a record the dead replica had not yet written in
its last 50 ms writer round before the kill), and the ledger is still there after Redis restarts from its AOF.
Everything is started and stopped by PID."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.deploy.stack import GATEWAYS, NGINX_CONF, nginx_for_loopback, service, tool
from tests.harness.gateway import replica_processes
from tests.harness.procs import REPO_ROOT, free_port
from tests.harness.reaper import track
from tests.harness.redis_proc import RedisProc
from tests.harness.waiting import poll

KEY = "sk-strait-demo"  # policies/compose.yaml's demo tenant
TENANT = "demo"
CLIENTS = 4
REQUESTS = 50  # per client
KILL_AFTER = 40  # answered requests before the kill
# A record is handed to the usage writer at the end of its request and written within one 50 ms round.
WRITER_ROUND_S = 0.25


@dataclass
class Outcome:
    rid: str
    started: float
    ended: float
    status: int  # 0: the connection failed
    completion_tokens: int | None


class Nginx:
    """Debian's nginx in the foreground on the templated config, stopped by its PID."""

    def __init__(self, folder: Path, servers: dict[str, int]) -> None:
        self.port = free_port()
        self.folder = folder
        self.conf = folder / "nginx.conf"
        self.conf.write_text(nginx_for_loopback(NGINX_CONF.read_text(), self.port, servers, folder))
        self.log = folder / "nginx.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Nginx:
        argv = [tool("nginx"), "-p", str(self.folder), "-c", str(self.conf)]
        argv += ["-g", f"daemon off; pid {self.folder / 'nginx.pid'}; error_log {self.folder / 'error.log'} warn;"]
        with open(self.log, "wb") as out:
            self.proc = track(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"nginx exited: {self.log.read_text()}")
            try:
                return httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        assert poll(ready, timeout=20), "nginx did not answer /readyz through the gateways"
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)


@pytest.fixture()
def redis_aof(tmp_path: Path) -> Iterator[RedisProc]:
    """redis-server with the committed compose command's settings (AOF, noeviction) after the harness's own."""
    command = service("redis")["command"]
    assert command[0] == "redis-server"
    server = RedisProc(extra_args=command[1:], workdir=tmp_path / "redis")
    (tmp_path / "redis").mkdir()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _ledger(server: RedisProc) -> dict[str, dict[str, Any]]:
    """Final usage records of the demo tenant, by the client's x-request-id."""
    with redis.Redis(port=server.port) as c:
        entries = c.xrange(f"strait:{{t:{TENANT}}}:ledger")
    records = (json.loads(fields[b"r"]) for _, fields in entries)
    return {r["client_request_id"]: r for r in records if r["final"] and r.get("client_request_id")}


def _served_by(log: Path) -> set[str]:
    """Client request ids in a replica's access log (one JSON line per request)."""
    ids = set()
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"request_id"' in line:
            with_id = json.loads(line).get("client_request_id")
            if with_id:
                ids.add(with_id)
    return ids


def test_nginx_routes_around_a_killed_replica_and_usage_stays_in_redis(tmp_path: Path, redis_aof: RedisProc) -> None:
    with redis.Redis(port=redis_aof.port) as c:
        assert c.config_get("appendonly")["appendonly"] == "yes"
        assert c.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    policy = REPO_ROOT / "policies" / "compose.yaml"
    with replica_processes(policy, redis_aof.url, len(GATEWAYS), tmp_path) as replicas:
        nginx = Nginx(tmp_path, {name: gw.port for name, gw in zip(GATEWAYS, replicas, strict=True)}).start()
        try:
            outcomes, killed_at = _traffic(f"http://127.0.0.1:{nginx.port}", replicas[1])
        finally:
            nginx.stop()
        survivor = _served_by(tmp_path / "gw0.log")
        victim = _served_by(tmp_path / "gw1.log")

    assert len(outcomes) == CLIENTS * REQUESTS
    ok = [o for o in outcomes if o.status == 200]
    failed = [o for o in outcomes if o.status != 200]
    # Both replicas served before the kill (round robin), only the survivor after it.
    before = [o for o in ok if o.ended < killed_at]
    assert {o.rid for o in before} & survivor and {o.rid for o in before} & victim
    after = [o for o in outcomes if o.started > killed_at]
    assert len(after) > CLIENTS * REQUESTS // 4
    assert all(o.status == 200 for o in after), [(o.rid, o.status) for o in after if o.status != 200]
    assert {o.rid for o in after} <= survivor
    # What failed was in flight when the replica died (at most one per client), nothing else.
    assert len(failed) <= CLIENTS
    assert all(o.started <= killed_at <= o.ended for o in failed), failed

    # Usage intact: every answered request has its final record, with the tokens the client was told.
    ledger = poll(
        lambda: (lambda got: got if {o.rid for o in ok if o.rid in survivor} <= set(got) else None)(_ledger(redis_aof)),
        timeout=20,
    )
    assert ledger, "the survivor's usage records did not all reach Redis"
    unwritten = [o for o in ok if o.rid not in ledger]
    assert all(o.rid in victim and killed_at - o.ended < WRITER_ROUND_S for o in unwritten), unwritten
    for o in ok:
        if o.rid in ledger:
            assert ledger[o.rid]["completion_tokens"] == o.completion_tokens, o.rid
            assert ledger[o.rid]["status"] == 200

    # The ledger survives a Redis restart: the committed AOF settings persist it.
    redis_aof.stop()
    redis_aof.start()
    assert _ledger(redis_aof) == ledger


def _traffic(base_url: str, victim: Any) -> tuple[list[Outcome], float]:
    """CLIENTS threads send REQUESTS chat requests each through nginx; the victim replica is SIGKILLed once
    KILL_AFTER requests were answered. Returns every outcome and the kill time (monotonic)."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    answered = threading.Event()
    killed: list[float] = []

    def client(n: int) -> None:
        with httpx.Client(base_url=base_url, headers={"authorization": f"Bearer {KEY}"}, timeout=30) as http:
            for i in range(REQUESTS):
                rid = f"failover-{n}-{i:03d}"
                body = {"model": "chat-edge", "messages": [{"role": "user", "content": f"question {rid}"}]}
                started = time.monotonic()
                try:
                    r = http.post("/v1/chat/completions", json=body, headers={"x-request-id": rid})
                    status, tokens = (
                        r.status_code,
                        (r.json().get("usage") or {}).get("completion_tokens") if r.status_code == 200 else None,
                    )
                except httpx.TransportError:
                    status, tokens = 0, None
                with lock:
                    outcomes.append(Outcome(rid, started, time.monotonic(), status, tokens))
                    if sum(o.status == 200 for o in outcomes) >= KILL_AFTER:
                        answered.set()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    assert answered.wait(120), "traffic did not start"
    assert victim.proc is not None
    os.killpg(victim.proc.pid, signal.SIGKILL)
    killed.append(time.monotonic())
    victim.proc.wait(10)
    for t in threads:
        t.join(300)
    return outcomes, killed[0]
