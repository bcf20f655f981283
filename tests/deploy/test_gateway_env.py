"""A gateway replica started the way compose starts `gateway-1`: the Dockerfile's `strait serve` with the
compose service's own environment, only the network names mapped to loopback (redis, redis-cache and
otel-collector become a redis-server each with the committed settings and an OTLP receiver). Shows the
variables work together: ready by the image's HEALTHCHECK command, cache entries in the cache Redis and
nothing else there, usage in the state Redis, traces at the collector's endpoint, JSON logs."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.deploy.stack import DOCKER, gateway_env, host_port, interpolate, service
from tests.harness.otlp_receiver import OtlpReceiver
from tests.harness.procs import PYTHON, REPO_ROOT, ServerProcess, free_port
from tests.harness.redis_proc import RedisProc
from tests.harness.waiting import poll


def _redis(service_name: str, folder: Path) -> RedisProc:
    command = service(service_name)["command"]
    folder.mkdir()
    return RedisProc(extra_args=command[1:], workdir=folder)


@pytest.fixture()
def two_redis(tmp_path: Path) -> Iterator[tuple[RedisProc, RedisProc]]:
    state, cache = _redis("redis", tmp_path / "state"), _redis("redis-cache", tmp_path / "cache")
    state.start()
    try:
        cache.start()
        try:
            yield state, cache
        finally:
            cache.stop()
    finally:
        state.stop()


def test_a_replica_with_the_compose_environment(tmp_path: Path, two_redis: tuple[RedisProc, RedisProc]) -> None:
    state, cache = two_redis
    with OtlpReceiver() as receiver:
        env = {k: interpolate(v) for k, v in gateway_env("gateway-1").items()}
        # The compose network's names, on loopback.
        assert host_port(env["STRAIT_STATE"]) == ("redis", 6379)
        env["STRAIT_STATE"] = env["STRAIT_STATE"].replace("redis:6379", f"127.0.0.1:{state.port}")
        env["STRAIT_CACHE"] = env["STRAIT_CACHE"].replace("redis-cache:6379", f"127.0.0.1:{cache.port}")
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
        # ../policies is what compose mounts at /etc/strait/policies (a copy here, edited below); the image sets
        # the spool folder.
        mounted = tmp_path / "policies"
        shutil.copytree(REPO_ROOT / "policies", mounted)
        env["STRAIT_POLICY"] = env["STRAIT_POLICY"].replace("/etc/strait/policies", str(mounted))
        env["STRAIT_SPOOL_DIR"] = str(tmp_path / "spool")
        env["OTEL_BSP_SCHEDULE_DELAY"] = "100"  # export spans within 0.1 s rather than 5 s
        port = free_port()
        # The image's ENTRYPOINT + CMD, bound to loopback here.
        argv = [PYTHON, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", str(port)]
        with ServerProcess(argv, port, env=env, ready_path="/readyz", log_path=tmp_path / "gw.log") as gw:
            health = _healthcheck_command()
            assert subprocess.run(health, env={"STRAIT_PORT": str(port)}, timeout=30).returncode == 0
            headers = {"authorization": "Bearer sk-strait-demo"}
            body = {"model": "chat", "messages": [{"role": "user", "content": "compose?"}], "temperature": 0}
            first = httpx.post(gw.base_url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
            second = httpx.post(gw.base_url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
            assert first.status_code == second.status_code == 200
            assert second.headers["x-strait-cache"] == "hit"

            with redis.Redis(port=cache.port) as c:
                cache_keys = {k.decode() for k in c.keys("*")}
            assert cache_keys and all(k.startswith("strait:cache:") for k in cache_keys), cache_keys
            with redis.Redis(port=state.port) as s:
                assert not s.keys("strait:cache:*"), "cache entries landed in the state Redis"
                assert poll(lambda: s.xlen("strait:{t:demo}:ledger") >= 2, timeout=10)
            spans = poll(lambda: [sp for sp in receiver.snapshot() if sp.service == "strait"], timeout=20)
            assert spans, "no span reached the collector's endpoint"

            # An edit of the mounted policy is in force without a restart.
            policy = mounted / "compose.yaml"
            policy.write_text(
                policy.read_text().replace(
                    "  - name: chat-edge\n",
                    "  - name: chat-ops\n    models: [llama-3.1-8b-edge]\n  - name: chat-edge\n",
                )
            )

            def routes() -> set[str]:
                listed = httpx.get(gw.base_url + "/v1/models", headers=headers, timeout=10).json()["data"]
                return {m["id"] for m in listed}

            assert poll(lambda: "chat-ops" in routes(), timeout=20), "the edited policy was not reloaded"
        log = (tmp_path / "gw.log").read_text()
        json_lines = [line for line in log.splitlines() if line.startswith("{")]
        assert json_lines and all(json.loads(line) for line in json_lines)


def _healthcheck_command() -> list[str]:
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    cmd = json.loads(text.split("HEALTHCHECK", 1)[1].split("CMD", 1)[1].split("\n", 1)[0])
    assert cmd[0] == "python"
    return [PYTHON, *cmd[1:]]
