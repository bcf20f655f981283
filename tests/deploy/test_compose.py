"""docker/compose.yaml without a Docker engine: the Compose Specification's JSON schema, `docker-compose
config` (Debian's Compose v1), every file it mounts or builds from, and the names, ports and variables its
services share (nginx, Prometheus, Grafana, the collector, Redis and the gateways must agree)."""

from __future__ import annotations

import json
import re
import subprocess

import jsonschema
import pytest
import yaml

from gateway.settings import Settings
from tests.deploy.stack import (
    COMPOSE_FILE,
    DOCKER,
    GATEWAYS,
    NGINX_CONF,
    PROMETHEUS_CONF,
    compose,
    gateway_env,
    host_port,
    interpolate,
    nginx_upstream_servers,
    service,
    tool,
)
from tests.harness.procs import PYTHON, REPO_ROOT

PROFILES = ("gpu", "providers")
POLICY_FILES = ("compose.yaml", "compose-gpu.yaml", "compose-providers.yaml")


def test_compose_file_is_valid_against_the_compose_specification_schema() -> None:
    schema = json.loads((DOCKER / "schema" / "compose-spec.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(compose()))
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors]
    # The validator does reject what the specification forbids (a guard against a schema that accepts all).
    for broken_service in ({"imagee": "a"}, {"image": "a", "depends_on": {"b": {"condition": "maybe"}}}):
        broken = {**compose(), "services": {"x": broken_service}}
        assert list(jsonschema.Draft7Validator(schema).iter_errors(broken)), broken_service


@pytest.mark.parametrize(
    "profiles", [(), ("gpu",), ("providers",), PROFILES], ids=["default", "gpu", "providers", "all"]
)
def test_docker_compose_config_accepts_every_profile(profiles: tuple[str, ...]) -> None:
    argv = [tool("docker-compose"), "-f", str(COMPOSE_FILE)]
    for p in profiles:
        argv += ["--profile", p]
    out = subprocess.run([*argv, "config"], capture_output=True, text=True, cwd=DOCKER, timeout=120)
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    services = set(resolved["services"])
    assert {"redis", "redis-cache", *GATEWAYS, "lb", "otel-collector", "prometheus", "grafana"} <= services
    # Compose v1 prints every service whatever the profiles; the profiled ones carry theirs.
    assert resolved["services"]["vllm"]["profiles"] == ["gpu"]
    assert resolved["services"]["providers-preflight"]["profiles"] == ["providers"]
    # Compose resolved the policy path from the default (no docker/.env in a clean clone).
    assert resolved["services"]["gateway-1"]["environment"]["STRAIT_POLICY"] == "/etc/strait/policies/compose.yaml"


def test_every_file_compose_mounts_or_builds_from_exists() -> None:
    checked = 0
    for name, svc in compose()["services"].items():
        build = svc.get("build")
        if build:
            context = (DOCKER / build["context"]).resolve()
            assert context == REPO_ROOT
            assert (context / build["dockerfile"]).is_file(), name
            checked += 1
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name} mounts {source}, which does not exist"
                checked += 1
            else:
                assert source in compose()["volumes"], f"{name} uses undeclared volume {source}"
    assert checked >= 8
    assert (DOCKER / ".env.example").is_file()
    assert "docker/.env" in (REPO_ROOT / ".gitignore").read_text().splitlines()


def test_the_gateways_run_two_replicas_on_the_shared_redis_and_a_cache_redis_of_its_own() -> None:
    state = service("redis")["command"]
    assert state[0] == "redis-server"
    settings = dict(zip(state[1::2], state[2::2], strict=True))
    assert settings["--appendonly"] == "yes" and settings["--maxmemory-policy"] == "noeviction"
    cache = dict(zip(service("redis-cache")["command"][1::2], service("redis-cache")["command"][2::2], strict=True))
    assert cache["--maxmemory-policy"] == "allkeys-lru" and cache["--maxmemory"]
    for name in GATEWAYS:
        env = gateway_env(name)
        assert host_port(env["STRAIT_STATE"]) == ("redis", 6379)
        assert host_port(env["STRAIT_CACHE"]) == ("redis-cache", 6379)
        assert env["STRAIT_REPLICAS"] == str(len(GATEWAYS))
        # Every STRAIT_ variable is one the gateway reads, with a valid value.
        resolved = {k: interpolate(v) for k, v in env.items()}
        known = set(re.findall(r'"(STRAIT_\w+)"', (REPO_ROOT / "gateway" / "settings.py").read_text()))
        assert {k for k in resolved if k.startswith("STRAIT_")} <= known
        settings = Settings.from_env(resolved)
        assert settings.cache_url.startswith("redis://redis-cache")
        assert service(name)["stop_grace_period"] == "30s" and settings.shutdown_grace_s < 30
    # Each replica keeps its own spool volume.
    spools = [v for name in GATEWAYS for v in service(name)["volumes"] if v.endswith(":/var/lib/strait/spool")]
    assert len(set(spools)) == len(GATEWAYS)


def test_policies_are_mounted_and_every_policy_the_stack_can_load_is_valid() -> None:
    for name in GATEWAYS:
        assert "../policies:/etc/strait/policies:ro" in service(name)["volumes"]
    template = gateway_env()["STRAIT_POLICY"]
    assert interpolate(template) == "/etc/strait/policies/compose.yaml"
    example = dict(
        line.split("=", 1) for line in (DOCKER / ".env.example").read_text().splitlines() if re.match(r"^\w+=", line)
    )
    assert example["STRAIT_POLICY_FILE"] in POLICY_FILES
    paths = [
        REPO_ROOT / "policies" / interpolate(template, {"STRAIT_POLICY_FILE": f}).rsplit("/", 1)[1]
        for f in POLICY_FILES
    ]
    check = subprocess.run(
        [PYTHON, "-m", "gateway", "policy", "check", *map(str, paths)], capture_output=True, text=True, timeout=120
    )
    assert check.returncode == 0, check.stdout + check.stderr
    # Keys a policy names (api_key: env:NAME) reach the gateways by name and are in the env template.
    for path in paths:
        for key in re.findall(r"api_key:\s*env:(\w+)", path.read_text()):
            assert gateway_env()[key] == f"${{{key}:-}}"
            assert key in example
    # The gpu policy routes to the stack's vLLM service on the port it serves.
    gpu = yaml.safe_load((REPO_ROOT / "policies" / "compose-gpu.yaml").read_text())
    vllm_url = next(b["base_url"] for b in gpu["backends"] if b["name"] == "vllm")
    command = service("vllm")["command"]
    assert host_port(vllm_url) == ("vllm", int(command[command.index("--port") + 1]))
    assert service("vllm")["profiles"] == ["gpu"]
    assert any(b.get("tier") == "provider" for b in gpu["backends"])
    assert "spillover" in gpu["routes"][0]


def test_load_balancer_prometheus_collector_and_grafana_agree_on_names_and_ports() -> None:
    port = 8080  # the gateways' STRAIT_PORT (Dockerfile) and what nginx and Prometheus reach
    assert "STRAIT_PORT=8080" in (DOCKER / "Dockerfile").read_text()
    assert nginx_upstream_servers(NGINX_CONF.read_text()) == [f"{g}:{port}" for g in GATEWAYS]
    assert service("lb")["ports"] == ["127.0.0.1:8080:8080"]
    assert re.search(r"listen\s+8080;", NGINX_CONF.read_text())
    published = [p.rsplit(":", 2)[-2] for svc in compose()["services"].values() for p in svc.get("ports", [])]
    assert len(published) == len(set(published)), "a host port is published twice"

    prom = yaml.safe_load(PROMETHEUS_CONF.read_text())
    jobs = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]] for job in prom["scrape_configs"]
    }
    assert jobs["strait"] == [f"{g}:{port}" for g in GATEWAYS]
    collector = yaml.safe_load((DOCKER / "otel-collector.yaml").read_text())
    telemetry_port = host_port(collector["service"]["telemetry"]["metrics"]["address"])[1]
    assert jobs["otel-collector"] == [f"otel-collector:{telemetry_port}"]
    assert prom["rule_files"] == ["/etc/prometheus/alerts.yaml"]
    assert "./prometheus/alerts.yaml:/etc/prometheus/alerts.yaml:ro" in service("prometheus")["volumes"]

    # Traces: the gateways' OTLP endpoint is the collector's OTLP/HTTP receiver, in its traces pipeline.
    otlp_http = host_port(collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"])[1]
    assert host_port(gateway_env()["OTEL_EXPORTER_OTLP_ENDPOINT"]) == ("otel-collector", otlp_http)
    assert "otlp" in collector["service"]["pipelines"]["traces"]["receivers"]
    assert service("otel-collector")["image"].startswith("otel/opentelemetry-collector-contrib:")

    # Grafana: the provisioned datasource is this Prometheus, the provider reads the mounted dashboards.
    ds = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yaml").read_text())["datasources"][0]
    assert host_port(ds["url"]) == ("prometheus", 9090) and ds["uid"] == "prometheus"
    provider = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/strait.yaml").read_text())["providers"][0]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in service("grafana")["volumes"])
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    home = service("grafana")["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(provider["options"]["path"] + "/")
    assert (DOCKER / "grafana/dashboards" / home.rsplit("/", 1)[1]).is_file()
