"""Policies at enterprise size: the loader and `policy check` do work per distinct compliance envelope,
not per tenant; the C-accelerated YAML parser keeps every file:line; the index is built once per load."""

from __future__ import annotations

import gc
import textwrap
from pathlib import Path

import msgspec
import pytest
import yaml

from gateway.policy import compile as compile_module
from gateway.policy import load as load_module
from gateway.policy.index import PolicyIndex
from gateway.policy.load import check_policy
from gateway.policy.model import PolicySet
from gateway.registry import discover_adapters
from loadtest.policy_scale import BACKENDS, COMPLIANCES, MODELS, ROUTES, TENANTS, build_policy, write_policy

ADAPTERS = discover_adapters().keys()


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_generated_policy_loads_with_its_declared_size(tmp_path: Path) -> None:
    path = write_policy(2, tmp_path)
    policy, problems = check_policy(path, adapters=ADAPTERS)
    assert policy is not None, [str(p) for p in problems]
    assert (len(policy.backends), len(policy.models), len(policy.routes), len(policy.tenants)) == (
        2 * BACKENDS,
        2 * MODELS,
        2 * ROUTES,
        2 * TENANTS,
    )
    assert all(len(r.models) == 6 for r in policy.routes)


def test_compliance_is_judged_once_per_envelope_and_deployment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The S=50 load took 459 s when every tenant x route x candidate was judged; now it is envelopes x
    deployments, however many tenants and routes share them."""
    size = 3
    path = write_policy(size, tmp_path)
    calls = 0
    judge = compile_module.compliance_reason

    def counted(*args: object) -> str | None:
        nonlocal calls
        calls += 1
        return judge(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(compile_module, "compliance_reason", counted)
    policy, problems = check_policy(path, adapters=ADAPTERS)
    assert policy is not None, [str(p) for p in problems]
    deployments = sum(len(m.deployments) for m in policy.models)
    envelopes = len(COMPLIANCES) + 1  # the open tenant's empty compliance is judged apart
    assert calls <= envelopes * deployments
    index = PolicyIndex.of(policy)
    per_tenant = len(policy.tenants) * sum(len(index.candidates[(r.name, "chat")].targets) for r in policy.routes)
    assert per_tenant > 50 * calls  # what judging every tenant x route x candidate cost


def test_the_index_checked_is_the_index_served() -> None:
    built = build_policy(1)
    one = msgspec.convert(built, PolicySet)
    other = msgspec.convert(built, PolicySet)
    first = PolicyIndex.of(one)
    assert PolicyIndex.of(one) is first
    assert PolicyIndex.of(other) is not first  # equal but another load: built again


def test_collector_is_resumed_after_a_load_even_a_failed_one(tmp_path: Path) -> None:
    assert gc.isenabled()
    check_policy(_write(tmp_path, "version: 1\nbackends: [\n"), adapters=ADAPTERS)
    assert gc.isenabled()
    gc.disable()
    try:
        check_policy(write_policy(1, tmp_path), adapters=ADAPTERS)
        assert not gc.isenabled()  # a caller's own choice is left as it was
    finally:
        gc.enable()


def test_libyaml_parser_is_used_and_keeps_lines(tmp_path: Path) -> None:
    assert load_module._SafeLoader is yaml.CSafeLoader
    path = _write(
        tmp_path,
        """\
        version: 1
        backends:
          - name: a
            adapter: simulated
          - name: b
            adapter: simulated
            tier: orbit
        """,
    )
    _, problems = check_policy(path, adapters=ADAPTERS)
    assert [(p.line, p.col) for p in problems] == [(7, 11)]
    assert "orbit" in problems[0].reason or "tier" in problems[0].reason


def test_data_shortcut_gives_what_the_safe_constructor_gives() -> None:
    text = textwrap.dedent(
        """\
        base: &b {x: 1, y: [true, null, 2.5, "3"]}
        merged:
          <<: *b
          z: 2026-12-07
        1: one
        list: [a, {b: c}]
        """
    )
    loader = load_module._SafeLoader(text)
    try:
        root = loader.get_single_node()
        assert root is not None
        got = load_module._construct(loader, root)
    finally:
        loader.dispose()
    assert got == yaml.safe_load(text)


POLICY_WITH_FALLBACK = """\
version: 1
backends:
  - {name: us, adapter: simulated, hosting: {jurisdiction: US, retention_days: 0}}
  - {name: de, adapter: simulated, hosting: {jurisdiction: DE, retention_days: 0}}
models:
  - {name: us-model, origin: {developer: Meta, country: US}, deployments: [{backend: us, upstream_model: x}]}
  - {name: de-model, origin: {developer: Meta, country: US}, deployments: [{backend: de, upstream_model: y}]}
routes:
  - {name: main, models: [us-model]FALLBACK}
  - {name: eu, models: [de-model]}
tenants:
  - {name: eu-only, allowed_routes: [main], compliance: {allowed_jurisdictions: [EU]}}
"""


def test_a_route_served_through_its_fallback_is_not_empty(tmp_path: Path) -> None:
    policy, problems = check_policy(
        _write(tmp_path, POLICY_WITH_FALLBACK.replace("FALLBACK", ", fallback: [eu]")), adapters=ADAPTERS
    )
    assert policy is not None
    assert problems == []


def test_a_route_without_a_compliant_candidate_anywhere_is_reported(tmp_path: Path) -> None:
    policy, problems = check_policy(_write(tmp_path, POLICY_WITH_FALLBACK.replace("FALLBACK", "")), adapters=ADAPTERS)
    assert policy is None
    assert [p.severity for p in problems] == ["error"]
    assert "compliance leaves route 'main' with no candidate" in problems[0].reason
    assert (
        "us-model@us: allowed_jurisdictions: hosting jurisdiction US is not in the allowed ['EU']" in problems[0].reason
    )


def test_the_same_files_checked_again_are_not_loaded_again(tmp_path: Path) -> None:
    """`strait serve` checks its policy, then the app loads it in the same process: one load."""
    path = write_policy(1, tmp_path)
    first, _ = check_policy(path, adapters=ADAPTERS)
    again, _ = check_policy(path, adapters=ADAPTERS)
    assert first is not None and again is first
    assert check_policy(path, adapters=ADAPTERS, fresh=True)[0] is not first
    # Same size, other content (a price digit): loaded again whatever the file's timestamps say.
    text = path.read_text()
    changed = text.replace("input_per_mtok: 1.", "input_per_mtok: 2.", 1)
    assert changed != text and len(changed) == len(text)
    path.write_text(changed)
    reloaded, _ = check_policy(path, adapters=ADAPTERS)
    assert reloaded is not None and reloaded is not first and reloaded != first
    assert check_policy(path, adapters=["simulated"])[0] is not reloaded  # other adapters: checked again
