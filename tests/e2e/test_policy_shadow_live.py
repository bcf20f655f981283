"""A real `strait serve --shadow-policy` with the feature log on: the live policy answers, the shadow
one only counts and logs its disagreements, and the feature log replays through `strait policy diff`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.harness.gateway import gateway_process
from tests.harness.procs import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "policies" / "demo.yaml"
KEY = "sk-strait-demo"


@pytest.fixture(scope="module")
def shadowed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path, Path]]:
    folder = tmp_path_factory.mktemp("shadow")
    candidate = folder / "candidate.yaml"
    # The candidate moves `chat` to the cloud model only; `chat-cloud` is the same in both.
    candidate.write_text(
        DEMO.read_text().replace("    models: [llama-3.1-8b-edge, frontier-cloud]\n", "    models: [frontier-cloud]\n")
    )
    features = folder / "features.jsonl"
    proc = gateway_process(DEMO, log_path=folder / "gateway.log", env={"STRAIT_FEATURE_LOG": str(features)})
    proc.argv += ["--shadow-policy", str(candidate)]
    with proc as gw:
        yield gw, candidate, features


def _metric(gw: ServerProcess, result: str) -> float:
    text = httpx.get(gw.base_url + "/metrics", timeout=10).text
    m = re.search(rf'^strait_shadow_decisions_total{{result="{result}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_shadow_counts_and_logs_disagreements_without_acting(shadowed: tuple[ServerProcess, Path, Path]) -> None:
    gw, candidate, features = shadowed
    client = openai.OpenAI(base_url=gw.base_url + "/v1", api_key=KEY, max_retries=0)
    messages = [{"role": "user", "content": "hello"}]
    for _ in range(3):
        reply = client.chat.completions.with_raw_response.create(model="chat", messages=messages)  # type: ignore[arg-type]
        assert reply.headers["x-strait-deployment"] == "llama-3.1-8b-edge@edge-box"  # the live policy acts
    client.chat.completions.create(model="chat-cloud", messages=messages)  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=messages)  # type: ignore[arg-type]
    assert _metric(gw, "disagree") == 3
    assert _metric(gw, "agree") == 2  # chat-cloud, and the refusal of an unknown route
    log = gw.read_log()
    assert "shadow policy disagrees: request " in log
    assert "route chat: live llama-3.1-8b-edge@edge-box, shadow frontier-cloud@cloud-api" in log
    assert KEY not in log and "hello" not in log

    lines = [json.loads(line) for line in features.read_text().splitlines()]
    assert [(x["route"], x.get("deployment")) for x in lines] == [
        ("chat", "llama-3.1-8b-edge@edge-box"),
        ("chat", "llama-3.1-8b-edge@edge-box"),
        ("chat", "llama-3.1-8b-edge@edge-box"),
        ("chat-cloud", "frontier-cloud@cloud-api"),
        ("nope", None),
    ]
    assert all(x["tenant"] == "demo" and "hello" not in json.dumps(x) for x in lines)

    out = subprocess.run(
        [sys.executable, "-m", "gateway", "policy", "diff", str(DEMO), str(candidate), "--requests", str(features)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "3 of 5 requests move (60.0 %)" in out
    assert "  3 x llama-3.1-8b-edge@edge-box -> frontier-cloud@cloud-api" in out
