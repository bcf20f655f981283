"""The console behind the compose stack's load balancer, for real on loopback: Debian's nginx with the
committed docker/nginx.conf in front of two `strait serve` replicas (the stack's policy, one redis-server).

A console session lives in the replica that opened it; nginx keeps one browser on one replica for /ui and
/admin (ip_hash), while model requests still go round robin. And the login form's post passes its Origin
check through the proxy (the Host header keeps its port). Before: the login was refused ("The form
expired") and, once in, every other page load landed on the replica that knew no session."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from tests.deploy.stack import GATEWAYS
from tests.deploy.test_failover import Nginx, redis_aof  # noqa: F401 - the fixture, shared
from tests.harness.gateway import replica_processes
from tests.harness.procs import REPO_ROOT
from tests.harness.redis_proc import RedisProc

ADMIN = "sk-strait-admin-demo"  # policies/compose.yaml's demo admin key
KEY = "sk-strait-demo"


def _cookie(response: httpx.Response, name: str) -> str:
    for header in response.headers.get_list("set-cookie"):
        if header.startswith(name + "="):
            return header.split(";", 1)[0]
    raise AssertionError(f"no {name} cookie in {response.headers}")


def test_a_console_login_through_the_load_balancer_holds_on_every_page(tmp_path: Path, redis_aof: RedisProc) -> None:  # noqa: F811
    policy = REPO_ROOT / "policies" / "compose.yaml"
    with replica_processes(policy, redis_aof.url, len(GATEWAYS), tmp_path) as replicas:
        nginx = Nginx(tmp_path, {name: gw.port for name, gw in zip(GATEWAYS, replicas, strict=True)}).start()
        try:
            base = f"http://127.0.0.1:{nginx.port}"
            with httpx.Client(base_url=base, timeout=30, follow_redirects=False) as client:
                form = client.get("/ui/login")
                assert form.status_code == 200
                token = re.search(r'name="csrf" value="([^"]+)"', form.text)
                assert token is not None
                # As a browser posts the form: its Origin, the login cookie (httpx keeps no Secure cookie
                # over plain http, a browser does on 127.0.0.1: sent by hand).
                login = client.post(
                    "/ui/login",
                    data={"csrf": token.group(1), "key": ADMIN},
                    headers={"origin": base, "cookie": _cookie(form, "strait_console_login")},
                )
                assert login.status_code == 303 and login.headers["location"] == "/ui", login.text
                session = _cookie(login, "strait_console")
                pages = [client.get(path, headers={"cookie": session}) for path in ["/ui", "/ui/tenants"] * 6]
                assert [p.status_code for p in pages] == [200] * 12, [p.headers.get("location") for p in pages]
                overview = client.get("/admin/api/overview", headers={"cookie": session})
                assert overview.status_code == 200 and overview.json()["routes"]
                # Model requests are still spread over both replicas (round robin).
                served = set()
                for _ in range(6):
                    r = client.post(
                        "/v1/chat/completions",
                        json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]},
                        headers={"authorization": f"Bearer {KEY}"},
                    )
                    assert r.status_code == 200, r.text
                    served.add(r.headers["x-strait-request-id"])
                logs = [(tmp_path / f"gw{i}.log").read_text() for i in range(len(replicas))]
                assert all(any(rid in log for rid in served) for log in logs), "one replica served every request"
        finally:
            nginx.stop()
