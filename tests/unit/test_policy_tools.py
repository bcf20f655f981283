"""`strait policy explain|test|diff|schema`: the offline tools platform teams gate policy changes with."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from gateway.policy.index import PolicyIndex
from gateway.policy.load import load_policy
from gateway.policy.replay import Replay, diff
from gateway.policy.tools import _clean_descriptions, schema

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ROOT / "policies"


def _strait(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=120)


def test_committed_schema_is_current() -> None:
    committed = json.loads((POLICIES / "schema.json").read_text())
    assert committed == json.loads(json.dumps(schema())), (
        "policies/schema.json is stale: run `strait policy schema > policies/schema.json`"
    )


def test_schema_descriptions_do_not_depend_on_docstring_indentation() -> None:
    # The same docstring as msgspec 0.22 (indented continuation), 0.23 and Python 3.13 (stripped) give it.
    one = "Where a tenant's requests may run.\nFail closed."
    for text in (
        "Where a tenant's requests may run.\n    Fail closed.\n    ",
        one,
        "\n  Where a tenant's requests may run.\n  Fail closed.\n",
    ):
        doc = {
            "$defs": {
                "C": {"description": text, "properties": {"description": {"type": "string", "default": " x\n  y"}}}
            },
            "anyOf": [{"description": text}],
        }
        assert _clean_descriptions(doc) == {
            "$defs": {
                "C": {"description": one, "properties": {"description": {"type": "string", "default": " x\n  y"}}}
            },
            "anyOf": [{"description": one}],
        }


def test_shipped_policy_tests_pass() -> None:
    out = _strait("policy", "test", str(POLICIES / "tests"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert " 0 failed" in out.stdout.splitlines()[-1]


def test_a_failing_case_fails_the_run(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(
        f"policy: {POLICIES / 'eu-sovereignty.yaml'}\n"
        "cases:\n"
        "  - name: wrong on purpose\n"
        "    tenant: health-eu\n"
        "    request: {model: chat, messages: [{role: user, content: x}]}\n"
        "    expect: {deployment: gpt-4o@openai-us}\n"
    )
    out = _strait("policy", "test", str(tmp_path))
    assert out.returncode == 1
    assert "FAIL" in out.stdout and "expected gpt-4o@openai-us, got mistral-small@gpu-frankfurt" in out.stdout


def test_explain_prints_every_candidate_with_its_reason(tmp_path: Path) -> None:
    req = tmp_path / "req.json"
    req.write_text(json.dumps({"model": "reasoning", "messages": [{"role": "user", "content": "hi"}]}))
    out = _strait(
        "policy",
        "explain",
        "--policy",
        str(POLICIES / "open-weights.yaml"),
        "--tenant",
        "research",
        "--request",
        str(req),
    )
    assert out.returncode == 0, out.stderr
    assert "deepseek-v3@deepseek-api" in out.stdout and "hosting jurisdiction CN is denied" in out.stdout
    assert out.stdout.strip().endswith("plan: qwen2.5-72b@gpu-eu -> deepseek-v3@gpu-us -> llama-3.3-70b@together")


def test_diff_shows_changed_decisions_and_why(tmp_path: Path) -> None:
    old_text = (POLICIES / "eu-sovereignty.yaml").read_text()
    new_file = tmp_path / "new.yaml"
    # The new version lets the EU tenant use providers that keep data for 30 days.
    new_file.write_text(old_text.replace("max_retention_days: 0", "max_retention_days: 30"))
    old = PolicyIndex(load_policy(POLICIES / "eu-sovereignty.yaml"))
    new = PolicyIndex(load_policy(new_file))
    replays = [
        Replay(tenant="health-eu", request={"model": "chat", "messages": [{"role": "user", "content": "x"}]}),
        Replay(
            tenant="health-eu",
            request={"model": "chat", "messages": [{"role": "user", "content": "x"}]},
            signals={"unhealthy": ["gpu-frankfurt"]},
        ),
        Replay(tenant="marketing-us", request={"model": "chat", "messages": [{"role": "user", "content": "x"}]}),
    ]
    report = diff(old, new, replays)
    assert (report.moved, report.total) == (1, 3)
    # Old policy: its only candidate is ejected, so it is tried anyway (panic mode); the new one has a fallback.
    lines = report.render()
    assert lines[1] == "1 of 3 requests move (33.3 %)"
    assert lines[2].startswith(
        "  1 x mistral-small@gpu-frankfurt -> mistral-small@mistral-api  (excluded: backend is ejected"
    )
    cases = tmp_path / "cases.jsonl"
    cases.write_text(
        "\n".join(json.dumps({"tenant": r.tenant, "request": r.request, "signals": r.signals}) for r in replays)
    )
    out = _strait("policy", "diff", str(POLICIES / "eu-sovereignty.yaml"), str(new_file), "--requests", str(cases))
    assert out.returncode == 0 and "1 of 3 requests move (33.3 %)" in out.stdout


def test_explain_takes_the_ingress_region_and_shows_hardware(tmp_path: Path) -> None:
    req = tmp_path / "req.json"
    req.write_text(json.dumps({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}))
    args = ["policy", "explain", "--policy", str(POLICIES / "eu-sovereignty.yaml"), "--tenant", "records-eu"]
    out = _strait(*args, "--request", str(req), "--region", "eu-west")
    assert out.returncode == 0, out.stderr
    assert "mistral-small@gpu-frankfurt: 8x H100 80GB" in out.stdout and "ingress region: eu-west" in out.stdout
    refused = _strait(*args, "--request", str(req), "--region", "us-east")
    assert refused.returncode == 2 and "403 ingress_region_not_allowed" in refused.stdout
