"""The deployment files under docker/ as the tests read them: compose, nginx, Prometheus and Grafana config,
the tools that check them (found on PATH or in /usr/sbin; tests skip, naming the Debian package, without one),
and the PromQL metric names a rule or panel reads."""

from __future__ import annotations

import re
import shutil
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.procs import REPO_ROOT

DOCKER = REPO_ROOT / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
NGINX_CONF = DOCKER / "nginx.conf"
PROMETHEUS_CONF = DOCKER / "prometheus" / "prometheus.yml"
ALERTS = DOCKER / "prometheus" / "alerts.yaml"
ALERT_TESTS = DOCKER / "prometheus" / "alerts.test.yaml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "strait.json"
GATEWAYS = ("gateway-1", "gateway-2")

# Which Debian package brings each tool (`make deploy-tools` installs them).
PACKAGES = {"promtool": "prometheus", "nginx": "nginx-light", "docker-compose": "docker-compose"}


def tool(name: str) -> str:
    """The tool's path, or skip the test saying which Debian package `make` would have installed."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if found is None:
        pytest.skip(f"{name} not installed: `make deploy-tools` (apt-get install {PACKAGES[name]})")
    return found


@cache
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return data


def service(name: str) -> dict[str, Any]:
    svc: dict[str, Any] = compose()["services"][name]
    return svc


def gateway_env(name: str = "gateway-1") -> dict[str, str]:
    return {k: str(v) for k, v in service(name)["environment"].items()}


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's ${NAME:-default} and ${NAME} (what `docker compose` does with docker/.env)."""
    env = env or {}

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(3) or ""
        return env.get(name) or default

    return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", sub, value)


def host_port(url_or_target: str) -> tuple[str, int]:
    m = re.match(r"^(?:\w[\w+.-]*://)?([\w.-]+):(\d+)", url_or_target)
    assert m, f"no host:port in {url_or_target!r}"
    return m.group(1), int(m.group(2))


def nginx_upstream_servers(text: str) -> list[str]:
    block = re.search(r"upstream\s+strait\s*\{(.*?)\}", text, re.S)
    assert block, "nginx.conf has no `upstream strait` block"
    return re.findall(r"^\s*server\s+([\w.:-]+)", block.group(1), re.M)


def nginx_for_loopback(text: str, listen_port: int, servers: dict[str, int], tmp: Path) -> str:
    """The committed config with only what a compose network gives changed: every `server gateway-N:8080`
    (in each upstream) becomes 127.0.0.1:<its test port>, `listen 8080` a free loopback port; nginx's own files go to `tmp`."""
    out = text
    for name, port in servers.items():
        out, n = re.subn(rf"server\s+{re.escape(name)}:8080", f"server 127.0.0.1:{port}", out)
        assert n >= 1, f"nginx.conf has no `server {name}:8080`"
    out, n = re.subn(r"listen\s+8080;", f"listen 127.0.0.1:{listen_port};", out)
    assert n == 1, "nginx.conf does not listen on 8080"
    temp = "\n".join(
        f"  {kind}_temp_path {tmp / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    out, n = re.subn(r"http\s*\{", "http {\n" + temp, out, count=1)
    assert n == 1
    return out


# PromQL words that are not metric names: operators, modifiers, and names followed by "(" (functions and
# aggregations) are dropped by the tokenizer below.
_PROMQL_WORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: strings, label matchers {..}, ranges [..] and the label
    lists of by/without/on/ignoring/group_* (..) removed, then every identifier not called as a function."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\b\d+(\.\d+)?([eE][+-]?\d+)?[smhdwy]?\b", " ", text)  # numbers and durations
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = m.group(0)
        following = text[m.end() :].lstrip()
        if word in _PROMQL_WORDS or following.startswith("("):
            continue
        if word.lower() in {"inf", "nan"}:
            continue
        names.add(word)
    return names


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def exported_names(metrics_text: str) -> set[str]:
    """Every series name a /metrics page can carry: each family's samples as prometheus_client writes them
    (counter: _total, _created; histogram: _bucket, _count, _sum, _created; gauge: itself), whether or not
    it has samples yet."""
    names: set[str] = set()
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created")}
    for line in metrics_text.splitlines():
        m = re.match(r"# TYPE (\S+) (\S+)", line)
        if m:
            family, kind = m.groups()
            names.add(family)
            names.update(family + s for s in suffixes.get(kind, ()))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names
