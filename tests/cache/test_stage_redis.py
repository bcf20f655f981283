"""The cache over a real Redis (a redis-server of the test's own on a free loopback port): two gateway
replicas share entries through it, exact and semantic; with Redis killed every request still succeeds
as a miss; a gateway whose policy needs an uninstalled optional module refuses to start, naming the extra."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from gateway.app import create_app
from gateway.settings import Settings
from tests.cache.echo_adapter import EchoFactory
from tests.cache.test_stage_in_process import POLICY, ask, content, fresh
from tests.harness.redis_proc import RedisProc


@contextlib.contextmanager
def replica(tmp_path: Path, name: str, cache_url: str) -> Iterator[TestClient[Any]]:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    app = create_app(
        Settings(
            policy_path=str(path),
            spool_dir=str(tmp_path / f"spool-{name}"),
            access_log="off",
            cache=cache_url,
            state_timeout_ms=200,
        ),
        factories={"echo": EchoFactory()},
    )
    with TestClient(app) as client:
        yield client


def test_two_replicas_share_entries_through_one_redis(tmp_path: Path) -> None:
    with RedisProc() as server, replica(tmp_path, "a", server.url) as a, replica(tmp_path, "b", server.url) as b:
        q = fresh()
        first = ask(a, "acme", q)
        assert first.headers["x-strait-cache"] == "miss"
        served = ask(b, "acme", q)
        assert served.headers["x-strait-cache"] == "hit"
        assert content(served) == content(first)
        ask(a, "acme", "Which planet in the solar system is the largest?")
        reworded = ask(b, "acme", "Which planet is the largest in the solar system?")
        assert reworded.headers["x-strait-cache"] == "semantic-hit"
        # Feedback on one replica removes the entry for both.
        ok = b.post(
            "/v1/cache/feedback",
            json={"id": reworded.json()["id"]},
            headers={"authorization": "Bearer sk-cache-acme-0001"},
        )
        assert ok.status_code == 200
        again = ask(a, "acme", "Which planet is the largest in the solar system?")
        assert again.headers["x-strait-cache"] == "miss"
        # Another tenant on another replica: still its own namespace.
        assert ask(b, "globex", q).headers["x-strait-cache"] == "miss"


def test_a_dead_cache_redis_is_a_miss_and_every_request_succeeds(tmp_path: Path) -> None:
    server = RedisProc().start()
    try:
        with replica(tmp_path, "a", server.url) as a:
            q = fresh()
            ask(a, "acme", q)
            assert ask(a, "acme", q).headers["x-strait-cache"] == "hit"
            server.kill()
            for stream in (False, True, False):
                r = ask(a, "acme", q, stream=stream)
                assert r.status_code == 200
                assert r.headers["x-strait-cache"] == "miss"
                assert r.text
            # A paraphrase (semantic path: the store fails after the embedding) is a miss too.
            r = ask(a, "acme", q.replace("about", "regarding"))
            assert r.status_code == 200 and r.headers["x-strait-cache"] == "miss"
            assert a.get("/readyz").status_code == 200
    finally:
        server.cleanup()


_HIDE_ONNXRUNTIME = """
import sys
sys.modules["onnxruntime"] = None  # as if the `cache` extra were not installed
from gateway.__main__ import main
sys.exit(main(["serve", "--policy", sys.argv[1], "--port", "1"]))
"""


def test_a_policy_needing_a_missing_extra_is_refused_at_start_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY.replace("adapter: echo", "adapter: simulated"))
    done = subprocess.run(
        [sys.executable, "-c", _HIDE_ONNXRUNTIME, str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert "onnxruntime" in done.stderr
    assert "pip install 'strait-gateway[cache]'" in done.stderr


def test_create_app_refuses_the_same_policy_without_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    from gateway.cache.errors import CacheDependencyError

    with pytest.raises(CacheDependencyError, match=r"strait-gateway\[cache\]"):
        create_app(
            Settings(policy_path=str(path), spool_dir=str(tmp_path / "spool")), factories={"echo": EchoFactory()}
        )
