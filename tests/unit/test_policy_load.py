"""Policy files: valid ones load; every broken one is refused with file:line:col and a reason (golden corpus)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.policy.index import PolicyIndex, key_digest, key_problem
from gateway.policy.load import PolicyError, check_policy, load_policy
from gateway.registry import discover_adapters

ROOT = Path(__file__).resolve().parents[2]
BROKEN = ROOT / "tests" / "fixtures" / "policies" / "broken"
ADAPTERS = discover_adapters().keys()


def _expected() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (BROKEN / "EXPECTED.txt").read_text().splitlines():
        if line.strip():
            out.setdefault(line.split(":", 1)[0], []).append(line)
    return out


@pytest.mark.parametrize("name", sorted(p.name for p in BROKEN.glob("*.yaml")))
def test_broken_policy_is_refused_with_place_and_reason(name: str) -> None:
    path = BROKEN / name
    policy, problems = check_policy(path, adapters=ADAPTERS)
    assert policy is None
    got = [str(p).replace(str(BROKEN) + "/", "") for p in problems]
    assert got == _expected()[name]


def test_every_broken_file_has_a_golden_line() -> None:
    assert set(_expected()) == {p.name for p in BROKEN.glob("*.yaml")}


@pytest.mark.parametrize("path", sorted((ROOT / "policies").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_policies_load(path: Path) -> None:
    policy = load_policy(path, adapters=ADAPTERS)
    assert policy.routes and policy.backends


def test_demo_key_is_stored_as_digest_only() -> None:
    text = (ROOT / "policies" / "demo.yaml").read_text()
    policy = load_policy(ROOT / "policies" / "demo.yaml", adapters=ADAPTERS)
    index = PolicyIndex(policy)
    assert key_digest("sk-strait-demo") in index.principals
    assert 'digest: "sk-strait-demo' not in text


def test_directory_of_files_merges_and_refuses_duplicates(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("backends:\n  - {name: edge, adapter: simulated}\n")
    (tmp_path / "b.yaml").write_text(
        "models:\n  - name: m\n    deployments: [{backend: edge, upstream_model: x}]\nroutes:\n  - {name: r, models: [m]}\n"
    )
    merged = load_policy(tmp_path, adapters=ADAPTERS)
    assert [r.name for r in merged.routes] == ["r"]
    (tmp_path / "c.yaml").write_text("backends:\n  - {name: edge, adapter: simulated}\n")
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path, adapters=ADAPTERS)
    assert str(info.value) == f"{tmp_path}/c.yaml:2:12: duplicate backend name 'edge' (first in {tmp_path}/a.yaml)"


def test_cli_check_exit_codes_and_keys_hash(tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "gateway", "policy", "check", *map(str, sorted((ROOT / "policies").glob("*.yaml")))],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "gateway", "policy", "check", str(BROKEN / "unknown_model.yaml")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1
    assert bad.stdout.strip().endswith("unknown_model.yaml:9:17: route 'r': unknown model 'ghost'")
    hashed = subprocess.run(
        [sys.executable, "-m", "gateway", "keys", "hash"], input="sk-strait-demo\n", capture_output=True, text=True
    )
    assert hashed.stdout.strip() == key_digest("sk-strait-demo")


def test_serve_refuses_a_bad_policy_before_binding(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--policy", str(BROKEN / "unknown_key.yaml"), "--port", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "unknown_key.yaml:5:5: backends[0]: Object contains unknown field `tierr`" in out.stderr


def test_keys_hash_refuses_keys_that_could_never_authenticate() -> None:
    """Headers are latin-1 without spaces or control characters: such a key's digest would never match."""
    for key in ("sk-caf\u00e9-key", "sk key", "sk-\tkey", "sk-\x7fkey", "\u043a\u043b\u044e\u0447"):
        out = subprocess.run(
            [sys.executable, "-m", "gateway", "keys", "hash", key], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 1, key
        assert out.stdout == "" and "printable ASCII" in out.stderr
    ok = subprocess.run(
        [sys.executable, "-m", "gateway", "keys", "hash", "sk-Good_key.1~!"], capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0 and ok.stdout.strip() == key_digest("sk-Good_key.1~!")


@given(st.text(min_size=1, max_size=40))
@settings(max_examples=300, deadline=None)
def test_a_key_is_accepted_exactly_when_it_is_printable_ascii(key: str) -> None:
    assert (key_problem(key) is None) == all(0x21 <= ord(c) <= 0x7E for c in key)
