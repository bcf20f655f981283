"""`nginx -t` (Debian's nginx) on the committed load-balancer config, with only the compose network's names
and the listen port changed for loopback."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.deploy.stack import GATEWAYS, NGINX_CONF, nginx_for_loopback, nginx_upstream_servers, tool
from tests.harness.procs import free_port


def _nginx_t(conf: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("nginx"), "-t", "-p", str(tmp), "-c", str(conf), "-g", f"pid {tmp / 'nginx.pid'};"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_nginx_accepts_the_load_balancer_config(tmp_path: Path) -> None:
    text = NGINX_CONF.read_text()
    assert nginx_upstream_servers(text) == [f"{g}:8080" for g in GATEWAYS]
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_for_loopback(text, free_port(), {g: free_port() for g in GATEWAYS}, tmp_path))
    checked = _nginx_t(conf, tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "syntax is ok" in checked.stderr and "test is successful" in checked.stderr
    # And nginx -t does refuse a broken one (a directive it does not know).
    conf.write_text(conf.read_text().replace("proxy_buffering off;", "proxy_buffering offf;"))
    assert _nginx_t(conf, tmp_path).returncode != 0
