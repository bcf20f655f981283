"""docker/Dockerfile read as Docker would run it: two stages, installs only from hashed locks, an unprivileged
user, a HEALTHCHECK on /readyz, and an entry point whose command and flags `strait serve` really has."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

from gateway.settings import Settings
from tests.deploy.stack import DOCKER
from tests.harness.procs import PYTHON, REPO_ROOT

DOCKERFILE = (DOCKER / "Dockerfile").read_text()


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _final_stage() -> list[tuple[str, str]]:
    steps = _instructions()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def test_two_stages_on_a_slim_python_base() -> None:
    froms = [rest for word, rest in _instructions() if word == "FROM"]
    assert len(froms) == 2 and froms[0].endswith(" AS build")
    base = next(rest for word, rest in _instructions() if word == "ARG" and rest.startswith("PYTHON_IMAGE="))
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.1[1-3]-slim(-\w+)?", base)
    # The runtime stage takes only the built venv from the build stage.
    copies = [rest for word, rest in _final_stage() if word == "COPY"]
    assert [c for c in copies if c.startswith("--from=")] == ["--from=build /opt/strait /opt/strait"]


def test_dependencies_come_only_from_hashed_locks_that_agree_with_the_runtime_lock() -> None:
    installs = [rest for word, rest in _instructions() if word == "RUN" and "pip install" in rest]
    assert installs
    for run in installs:
        for cmd in re.split(r"&&", run):
            if "pip install" in cmd:
                assert "--require-hashes" in cmd or "--no-deps" in cmd, cmd
    lock = next(rest for word, rest in _instructions() if word == "ARG" and rest.startswith("LOCK="))
    image_lock = REPO_ROOT / lock.split("=", 1)[1]
    pins = _pins(image_lock)
    run_pins = _pins(REPO_ROOT / "requirements" / "run.txt")
    assert pins and all(run_pins.get(name) == version for name, version in pins.items()), (
        "image lock drifted from run.txt"
    )
    # Every requirement carries hashes, and the semantic-cache stack (190 MB) is left out of the image.
    text = image_lock.read_text()
    entries = re.findall(r"^[a-z0-9][^\n]*==.*?(?=^[a-z0-9]|\Z)", text, re.M | re.S)
    assert len(entries) == len(pins) and all("--hash=sha256:" in entry for entry in entries)
    assert not {"onnxruntime", "numpy", "tokenizers"} & set(pins)
    for copied in re.findall(r"COPY (requirements/\S+(?: requirements/\S+)*) requirements/", DOCKERFILE):
        assert all((REPO_ROOT / f).is_file() for f in copied.split()), copied


def _pins(path: Path) -> dict[str, str]:
    text = path.read_text()
    return dict(re.findall(r"^([a-z0-9][a-z0-9._-]*)==([^\s;]+)", text, re.M))


def test_runs_as_an_unprivileged_user_with_a_readyz_healthcheck() -> None:
    final = _final_stage()
    users = [rest for word, rest in final if word == "USER"]
    assert users and users[-1] not in {"root", "0"}
    assert any(word == "RUN" and "useradd" in rest and users[-1] in rest for word, rest in final)
    health = next(rest for word, rest in final if word == "HEALTHCHECK")
    assert "/readyz" in health and "STRAIT_PORT" in health
    readyz = (REPO_ROOT / "gateway" / "api" / "routes.py").read_text()
    assert '@get("/readyz")' in readyz
    # The health check's command runs: it exits non-zero when nothing answers on the port.
    cmd = json.loads(health.split("CMD", 1)[1])
    probe = subprocess.run([PYTHON, *cmd[1:]], env={"STRAIT_PORT": "1"}, capture_output=True, timeout=30)
    assert probe.returncode != 0


def test_entrypoint_is_strait_serve_and_every_flag_and_variable_exists() -> None:
    final = _final_stage()
    entry = json.loads(next(rest for word, rest in final if word == "ENTRYPOINT"))
    cmd = json.loads(next(rest for word, rest in final if word == "CMD"))
    assert entry == ["strait", "serve"]
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["strait"] == "gateway.__main__:main"
    help_text = subprocess.run(
        [PYTHON, "-m", "gateway", "serve", "--help"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    flags = [a for a in cmd if a.startswith("--")]
    assert flags and all(re.search(rf"\s{re.escape(f)}\b", help_text) for f in flags), flags
    # The ENV the image sets are settings the gateway reads, valid together; its default policy ships.
    env_line = next(rest for word, rest in final if word == "ENV" and "STRAIT_" in rest)
    env = dict(re.findall(r"(STRAIT_\w+)=(\S+)", env_line))
    settings = Settings.from_env(env)
    assert settings.port == 8080 and settings.spool_dir == "/var/lib/strait/spool"
    policy = settings.policy_path
    assert policy.startswith("/etc/strait/policies/") and (REPO_ROOT / "policies" / policy.rsplit("/", 1)[1]).is_file()
    assert "COPY policies /etc/strait/policies" in DOCKERFILE
