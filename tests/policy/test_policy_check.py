"""`strait policy check`: the empty-route analysis follows fallbacks, names the rule excluding each
candidate (a developer rule as a developer rule), and warnings can be silenced with a reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.__main__ import main
from gateway.policy.load import check_policy
from gateway.registry import discover_adapters

ADAPTERS = discover_adapters().keys()

BASE = """\
version: 1
operators:
  - {name: DeepSeek, headquarters: CN}
  - {name: us, headquarters: US}
backends:
  - {name: ds-api, adapter: simulated, tier: provider, hosting: {operator: DeepSeek, jurisdiction: CN}}
  - {name: us-gpu, adapter: simulated, tier: self-hosted, hosting: {operator: us, jurisdiction: US}}
models:
  - name: deepseek-v3
    origin: {developer: DeepSeek, country: US}
    deployments: [{backend: ds-api, upstream_model: deepseek-chat}]
  - name: llama
    origin: {developer: Meta, country: US}
    deployments: [{backend: us-gpu, upstream_model: llama}]
routes:
  - {name: cheap, models: [deepseek-v3]}
  - {name: local, models: [llama]}
tenants:
  - name: careful
    allowed_routes: ["*"]
    compliance:
      origin_rules: [{developers: [DeepSeek], allowed_tiers: [self-hosted]}]
  - name: eu
    allowed_routes: ["*"]
    compliance: {allowed_jurisdictions: [EU]}
"""


def _check(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    _, problems = check_policy(path, adapters=ADAPTERS)
    return [f"{p.severity}: {p.reason}" + (f" [{p.silenced_because}]" if p.silenced_because else "") for p in problems]


def test_a_developer_rule_is_named_and_worded_as_a_developer_rule(tmp_path: Path) -> None:
    got = _check(tmp_path, BASE)
    careful = [p for p in got if "tenant 'careful'" in p]
    assert careful == [
        "warning: tenant 'careful': compliance leaves route 'cheap' with no candidate (deepseek-v3@ds-api: "
        "origin_rules[0]: models developed by DeepSeek may run only on tiers ['self-hosted'])"
    ]


def test_every_setting_that_excludes_is_named(tmp_path: Path) -> None:
    got = _check(tmp_path, BASE)
    eu = sorted(p for p in got if "tenant 'eu'" in p)
    assert eu == [
        "warning: tenant 'eu': compliance leaves route 'cheap' with no candidate (deepseek-v3@ds-api: "
        "allowed_jurisdictions: hosting jurisdiction CN is not in the allowed ['EU'])",
        "warning: tenant 'eu': compliance leaves route 'local' with no candidate (llama@us-gpu: "
        "allowed_jurisdictions: hosting jurisdiction US is not in the allowed ['EU'])",
    ]


def test_a_fallback_that_serves_the_tenant_ends_the_warning(tmp_path: Path) -> None:
    got = _check(
        tmp_path,
        BASE.replace("{name: cheap, models: [deepseek-v3]}", "{name: cheap, models: [deepseek-v3], fallback: [local]}"),
    )
    assert not [p for p in got if "tenant 'careful'" in p]
    assert len([p for p in got if "tenant 'eu'" in p]) == 2  # the fallback is outside the EU too


SILENCES = """\
silenced_warnings:
  - {warning: empty_route, tenant: eu, reason: "the EU tenant only uses routes we host in the EU later"}
  - {warning: empty_route, route: cheap, tenant: careful, reason: "careful never calls cheap"}
"""


def test_warnings_are_silenced_per_tenant_or_route_with_the_reason(tmp_path: Path) -> None:
    got = _check(tmp_path, BASE + SILENCES)
    assert [p.split(":", 1)[0] for p in got] == ["silenced"] * 3
    assert all(p.endswith("]") for p in got)
    assert "[careful never calls cheap]" in next(p for p in got if "'careful'" in p)


def test_a_silence_matching_nothing_is_a_warning_and_unknown_names_are_errors(tmp_path: Path) -> None:
    extra = SILENCES + (
        "  - {warning: retry_budget, route: local, reason: stale}\n"
        "  - {warning: empty_route, tenant: nobody, reason: typo}\n"
        "  - {warning: empty_route, reason: too broad}\n"
    )
    got = _check(tmp_path, BASE + extra)
    assert "warning: silenced warning retry_budget matches no warning (remove it, or fix its tenant/route)" in got
    assert "error: silenced warning empty_route: unknown tenant 'nobody'" in got
    assert "error: silenced warning empty_route: name the tenant or the route it covers" in got


def test_a_silence_needs_a_reason(tmp_path: Path) -> None:
    got = _check(tmp_path, BASE + "silenced_warnings: [{warning: empty_route, tenant: eu, reason: ''}]\n")
    assert got and got[0].startswith("error: silenced_warnings[0].reason: Expected `str` of length >= 1")


def test_check_cli_hides_silenced_warnings_unless_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(BASE + SILENCES)
    assert main(["policy", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [f"{path}: ok (3 warnings silenced)"]
    assert main(["policy", "check", "--show-silenced", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("silenced warning: tenant ") == 3 and "[silenced: careful never calls cheap]" in out


FIVE_EYES = """\
blocs:
  - {name: FIVE_EYES, members: [US, GB, CA, AU, NZ]}
"""


def test_user_blocs_are_read_by_the_checks_as_by_the_engine(tmp_path: Path) -> None:
    """`strait policy check` expands a policy's own blocs (FIVE_EYES) exactly as the engine does."""
    impossible = BASE.replace(
        "compliance: {allowed_jurisdictions: [EU]}",
        "compliance: {allowed_jurisdictions: [US], denied_jurisdictions: [FIVE_EYES], "
        "allowed_origin_countries: [FIVE_EYES], denied_origin_countries: [US, GB, CA, AU, NZ]}",
    )
    got = _check(tmp_path, FIVE_EYES + impossible)
    assert "error: tenant 'eu': impossible constraints: every allowed jurisdiction is also denied" in got
    assert "error: tenant 'eu': impossible constraints: every allowed origin country is also denied" in got
    # The origin rule reaches llama (US, inside FIVE_EYES) by its country, and names it so.
    ruled = BASE.replace(
        "origin_rules: [{developers: [DeepSeek], allowed_tiers: [self-hosted]}]",
        "origin_rules: [{origin_countries: [FIVE_EYES], allowed_tiers: [provider]}]",
    )
    got = _check(tmp_path, FIVE_EYES + ruled)
    assert (
        "warning: tenant 'careful': compliance leaves route 'local' with no candidate (llama@us-gpu: "
        "origin_rules[0]: US-origin models may run only on tiers ['provider'])"
    ) in got
    # A user bloc that is not contradicted is not reported.
    fine = BASE.replace("compliance: {allowed_jurisdictions: [EU]}", "compliance: {allowed_jurisdictions: [FIVE_EYES]}")
    got = _check(tmp_path, FIVE_EYES + fine)
    assert not [p for p in got if "tenant 'eu'" in p and "impossible" in p]
    assert not [p for p in got if "tenant 'eu'" in p and "'local'" in p]  # llama@us-gpu is inside FIVE_EYES
